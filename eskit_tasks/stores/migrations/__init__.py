"""The eskit tables' migrations (Alembic), shipped inside the package.

Applied by :func:`eskit_tasks.stores.migrate.upgrade` (``eskit-tasks init-db``), with
the revision kept in ``eskit_alembic_version`` — a table of its own, so an application
that runs Alembic for its own tables in the same database is not disturbed. There is no
``alembic.ini``: :mod:`eskit_tasks.stores.migrate` configures Alembic in code.

    0001  the first layout
    0002  schema markers on snapshots (fingerprint, state_version)
"""
