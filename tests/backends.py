"""The three backends every contract runs on, as mixins providing a ``stores`` fixture.

The contracts themselves ship in :mod:`eskit_tasks.testing.contracts`; so do
:class:`Stores` and the damage hooks (:mod:`eskit_tasks.testing.damage`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from eskit_tasks import InMemoryEventStore, InMemorySnapshotStore, SqlEventStore, SqlSnapshotStore
from eskit_tasks.stores.schema import metadata
from eskit_tasks.testing.contracts import Stores

__all__ = ["BACKENDS", "MemoryBackend", "PostgresBackend", "SqliteBackend", "Stores"]


def _sql_stores(url: str) -> tuple[Stores, SqlEventStore]:
    store = SqlEventStore.from_url(url)
    return Stores.bundled(store, SqlSnapshotStore(store.engine), url), store


class MemoryBackend:
    backend = "memory"

    @pytest.fixture
    def stores(self) -> Stores:
        store = InMemoryEventStore()
        return Stores.bundled(store, InMemorySnapshotStore(store.engine))


class SqliteBackend:
    backend = "sqlite"

    @pytest.fixture
    def stores(self, tmp_path: Path) -> Iterator[Stores]:
        stores, store = _sql_stores(f"sqlite:///{tmp_path / 'events.db'}")
        yield stores
        store.engine.dispose()


class PostgresBackend:
    backend = "postgres"

    @pytest.fixture
    def stores(self, postgres_url: str) -> Iterator[Stores]:
        stores, store = _sql_stores(postgres_url)
        with store.engine.begin() as conn:
            names = ", ".join(t.name for t in metadata.sorted_tables)
            conn.exec_driver_sql(f"TRUNCATE {names} RESTART IDENTITY")
        yield stores
        store.engine.dispose()


BACKENDS = (MemoryBackend, SqliteBackend, PostgresBackend)
