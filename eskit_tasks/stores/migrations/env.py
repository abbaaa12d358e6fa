"""Alembic's environment for the eskit tables: always run on a connection that
:mod:`eskit_tasks.stores.migrate` opened, inside its transaction."""

from __future__ import annotations

from alembic import context

from eskit_tasks.stores.migrate import VERSION_TABLE

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    version_table=VERSION_TABLE,
    # One transaction for the whole upgrade, on SQLite too (Alembic's SQLite default is
    # not transactional): a failed step leaves the tables as they were.
    transactional_ddl=True,
)
with context.begin_transaction():
    context.run_migrations()
