"""Adapters for the ports: SQL (PostgreSQL, SQLite) and in-memory."""

from eskit_tasks.stores.memory import InMemoryDatabase, InMemoryEventStore, InMemorySnapshotStore
from eskit_tasks.stores.sql import SqlEventStore, SqlSnapshotStore

__all__ = [
    "InMemoryDatabase",
    "InMemoryEventStore",
    "InMemorySnapshotStore",
    "SqlEventStore",
    "SqlSnapshotStore",
]
