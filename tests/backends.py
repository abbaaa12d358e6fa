"""The three backends every contract runs on, as mixins providing a ``stores`` fixture."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from eskit_tasks import (
    EventStore,
    InMemoryEventStore,
    InMemorySnapshotStore,
    SnapshotStore,
    SqlEventStore,
    SqlSnapshotStore,
)
from eskit_tasks.stores.memory import InMemoryDatabase
from eskit_tasks.stores.schema import events, metadata, snapshots, streams


@dataclass
class Stores:
    """A backend under test: the two ports plus ways to damage a stream on purpose."""

    events: EventStore
    snapshots: SnapshotStore
    corrupt_event: Callable[[str, str, int, str], None]
    remove_event: Callable[[str, str, int], None]
    set_recorded_at: Callable[[str, str, int, datetime], None]
    url: str | None = None
    #: Rewrite a stored snapshot's ``state`` bytes by hand, its hash left alone.
    tamper_snapshot: Callable[[str, str, int, bytes], None] = lambda *_: None
    #: Delete a stored snapshot row by hand.
    remove_snapshot: Callable[[str, str, int], None] = lambda *_: None


def _sql_stores(url: str) -> tuple[Stores, SqlEventStore]:
    store = SqlEventStore.from_url(url)
    engine = store.engine

    def _pk(conn: Any, stream_type: str, stream_id: str) -> int:
        return conn.execute(
            sa.select(streams.c.pk).where(
                streams.c.stream_type == stream_type, streams.c.stream_id == stream_id
            )
        ).scalar_one()

    def corrupt(stream_type: str, stream_id: str, version: int, raw: str) -> None:
        with engine.begin() as conn:
            pk = _pk(conn, stream_type, stream_id)
            conn.execute(
                sa.update(events)
                .where(events.c.stream_pk == pk, events.c.version == version)
                .values(data=raw)
            )

    def remove(stream_type: str, stream_id: str, version: int) -> None:
        with engine.begin() as conn:
            pk = _pk(conn, stream_type, stream_id)
            conn.execute(
                sa.delete(events).where(events.c.stream_pk == pk, events.c.version == version)
            )

    def set_recorded_at(stream_type: str, stream_id: str, version: int, moment: datetime) -> None:
        with engine.begin() as conn:
            pk = _pk(conn, stream_type, stream_id)
            conn.execute(
                sa.update(events)
                .where(events.c.stream_pk == pk, events.c.version == version)
                .values(recorded_at=moment)
            )

    def tamper(stream_type: str, stream_id: str, version: int, state: bytes) -> None:
        with engine.begin() as conn:
            pk = _pk(conn, stream_type, stream_id)
            conn.execute(
                sa.update(snapshots)
                .where(snapshots.c.stream_pk == pk, snapshots.c.version == version)
                .values(state=state.decode())
            )

    def remove_snapshot(stream_type: str, stream_id: str, version: int) -> None:
        with engine.begin() as conn:
            pk = _pk(conn, stream_type, stream_id)
            conn.execute(
                sa.delete(snapshots).where(
                    snapshots.c.stream_pk == pk, snapshots.c.version == version
                )
            )

    found = Stores(
        store,
        SqlSnapshotStore(engine),
        corrupt,
        remove,
        set_recorded_at,
        url,
        tamper,
        remove_snapshot,
    )
    return found, store


def _remove_in_memory(db: InMemoryDatabase) -> Callable[[str, str, int], None]:
    def remove(stream_type: str, stream_id: str, version: int) -> None:
        with db.lock:
            del db.streams[(stream_type, stream_id)].snapshots[version]

    return remove


def _tamper_in_memory(db: InMemoryDatabase) -> Callable[[str, str, int, bytes], None]:
    def tamper(stream_type: str, stream_id: str, version: int, state: bytes) -> None:
        with db.lock:
            stored = db.streams[(stream_type, stream_id)].snapshots
            snap, token = stored[version]
            stored[version] = (replace(snap, state=state), token)

    return tamper


class MemoryBackend:
    backend = "memory"

    @pytest.fixture
    def stores(self) -> Stores:
        store = InMemoryEventStore()
        return Stores(
            store,
            InMemorySnapshotStore(store.engine),
            store.engine.corrupt_event,
            store.engine.remove_event,
            store.engine.set_recorded_at,
            tamper_snapshot=_tamper_in_memory(store.engine),
            remove_snapshot=_remove_in_memory(store.engine),
        )


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
