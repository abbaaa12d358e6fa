"""Damage a bundled store's stream on purpose, from outside the store.

What the contract suites need to prove that a store, and the compactor above it, notice
damage: an event whose payload is not JSON, a gap in the versions, a clock that went
backwards, a snapshot changed or deleted by hand. Each function takes one of the
bundled stores (memory or SQL, an event store or a snapshot store of that database) and
changes its rows directly, the way an operator's mistake or a broken disk would; the
stores themselves carry no such methods.

For your own adapter, write the same five functions against its storage and give them
to :class:`eskit_tasks.testing.contracts.Stores`.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from eskit_tasks.stores.memory import InMemoryDatabase
from eskit_tasks.stores.schema import events, snapshots, streams


def corrupt_event(store: object, stream_type: str, stream_id: str, version: int, raw: str) -> None:
    """Replace an event's stored payload text with ``raw`` (e.g. text that is not JSON)."""
    db = _database(store)
    if isinstance(db, InMemoryDatabase):
        with db.lock:
            db.streams[(stream_type, stream_id)].events[version].data = raw
        return
    _update_row(db, events, stream_type, stream_id, version, data=raw)


def remove_event(store: object, stream_type: str, stream_id: str, version: int) -> None:
    """Delete one stored event, leaving a gap in the versions."""
    _remove(store, events, stream_type, stream_id, version)


def set_recorded_at(
    store: object, stream_type: str, stream_id: str, version: int, moment: datetime
) -> None:
    """Rewrite an event's timestamp (clock skew between the writers' hosts)."""
    db = _database(store)
    if isinstance(db, InMemoryDatabase):
        with db.lock:
            db.streams[(stream_type, stream_id)].events[version].recorded_at = moment
        return
    _update_row(db, events, stream_type, stream_id, version, recorded_at=moment)


def tamper_snapshot(
    store: object, stream_type: str, stream_id: str, version: int, state: bytes
) -> None:
    """Rewrite a stored snapshot's ``state`` bytes, its stored hash left alone."""
    db = _database(store)
    if isinstance(db, InMemoryDatabase):
        with db.lock:
            stored = db.streams[(stream_type, stream_id)].snapshots
            snap, token = stored[version]
            stored[version] = (replace(snap, state=state), token)
        return
    _update_row(db, snapshots, stream_type, stream_id, version, state=state.decode())


def remove_snapshot(store: object, stream_type: str, stream_id: str, version: int) -> None:
    """Delete a stored snapshot, verified or not."""
    _remove(store, snapshots, stream_type, stream_id, version)


def _remove(store: object, table: sa.Table, stream_type: str, stream_id: str, version: int) -> None:
    """Delete one stream's event or snapshot (``table``) at ``version``."""
    db = _database(store)
    if isinstance(db, InMemoryDatabase):
        with db.lock:
            stream = db.streams[(stream_type, stream_id)]
            del (stream.events if table is events else stream.snapshots)[version]
        return
    with db.begin() as conn:
        conn.execute(sa.delete(table).where(_row(conn, table, stream_type, stream_id, version)))


def _database(store: object) -> InMemoryDatabase | Engine:
    """The database behind a bundled store (its ``engine``)."""
    db = getattr(store, "engine", None)
    if not isinstance(db, InMemoryDatabase | Engine):
        raise TypeError(
            f"{store!r} is not one of eskit-tasks' stores; damage your own adapter's "
            "storage with functions of your own"
        )
    return db


def _row(
    conn: Connection, table: sa.Table, stream_type: str, stream_id: str, version: int
) -> sa.ColumnElement[bool]:
    """The condition picking one stream's row at ``version`` in ``table`` (events or
    snapshots: both are keyed by the stream's key and a version)."""
    pk = conn.execute(
        sa.select(streams.c.pk).where(
            streams.c.stream_type == stream_type, streams.c.stream_id == stream_id
        )
    ).scalar_one()
    return sa.and_(table.c.stream_pk == pk, table.c.version == version)


def _update_row(
    engine: Engine, table: sa.Table, stream_type: str, stream_id: str, version: int, **values: Any
) -> None:
    with engine.begin() as conn:
        row = _row(conn, table, stream_type, stream_id, version)
        conn.execute(sa.update(table).where(row).values(**values))
