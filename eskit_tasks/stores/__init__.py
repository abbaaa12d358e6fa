"""Adapters for the ports: SQL (PostgreSQL, SQLite) and in-memory.

* :mod:`~eskit_tasks.stores.sql` — ``SqlEventStore``; :mod:`~eskit_tasks.stores.sql_snapshots`
  — ``SqlSnapshotStore``; :mod:`~eskit_tasks.stores.schema` — the tables, their creation
  and the layout check;
* :mod:`~eskit_tasks.stores.engine` — engines per dialect and their transactions;
  :mod:`~eskit_tasks.stores.reads` — the hot read path, in pages;
  :mod:`~eskit_tasks.stores.driver_errors` — driver errors translated into
  :mod:`eskit_tasks.errors`, passwords masked;
* :mod:`~eskit_tasks.stores.memory` — the in-memory stores, for tests and prototypes;
* :mod:`~eskit_tasks.stores._rules` — what both families check and build the same way
  (the delete transaction's checks, the audit row, event decoding).

Imports the domain and the ports; never Celery or Redis.
"""

from eskit_tasks.stores.memory import InMemoryDatabase, InMemoryEventStore, InMemorySnapshotStore
from eskit_tasks.stores.sql import SqlEventStore, SqlSnapshotStore

__all__ = [
    "InMemoryDatabase",
    "InMemoryEventStore",
    "InMemorySnapshotStore",
    "SqlEventStore",
    "SqlSnapshotStore",
]
