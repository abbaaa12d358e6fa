"""Test helpers shipped with the package (the top layer: it may import every other one).

* :mod:`eskit_tasks.testing.contracts` — the contract test suites of the ports (and of
  the Compactor on them): subclass them to check your own adapter, as ``tests/`` runs
  them on the memory, SQLite and PostgreSQL stores;
* :mod:`eskit_tasks.testing.damage` — damage a bundled store's rows on purpose (a
  corrupt payload, a missing event, a tampered snapshot), from outside the store;
* :mod:`eskit_tasks.testing.deciders` — the deciders the contract suites compact;
* :mod:`eskit_tasks.testing.services` — scratch PostgreSQL databases, private
  ``redis-server`` processes and real ``celery worker`` processes, for tests, the soak
  and the benchmarks alike.

The contract suites need pytest, a development dependency: install ``eskit-tasks[dev]``
or pytest to use these. They are the only modules of the package that import it.
"""
