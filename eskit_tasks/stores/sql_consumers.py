"""Consumers' checkpoints in SQL, and how the delete transaction reads them.

The gate (no event above a reading consumer's checkpoint is deleted) is decided inside
the delete transaction, so it must see every consumer that exists when the delete
commits. A checkpoint that moves *forward* only allows more, and takes no lock. A
consumer that *registers* (or widens its scope) could allow less: on PostgreSQL it
takes an exclusive advisory lock, and every delete transaction a shared one before it
reads the checkpoints. So a registration waits for deletes in flight and a delete waits
for a registration in flight: the delete either sees the new consumer, or the consumer
registered after the delete committed (and its events were already gone when it came).
On SQLite one writer at a time gives the same order.
"""

from __future__ import annotations

from collections.abc import Sequence

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from eskit_tasks.ports import Checkpoint
from eskit_tasks.stores._rules import Reader, lowest_reader
from eskit_tasks.stores.engine import clock_expression
from eskit_tasks.stores.schema import checkpoints, events, streams

#: Key of the advisory lock between consumers that register and delete transactions.
CONSUMERS_LOCK_KEY = 0x65736B6974636B70  # "eskitckp"


def _scope_text(scope: tuple[str, ...] | None) -> str | None:
    return None if scope is None else orjson.dumps(list(scope)).decode()


def _scope(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(orjson.loads(text))


def save(conn: Connection, consumer: str, position: int, scope: tuple[str, ...] | None) -> int:
    """Move ``consumer`` forward to ``position`` (never back) or register it, in ``conn``'s
    write transaction; return the stored position. ``scope`` None keeps the scope of a
    known consumer (every type for a new one)."""
    c = checkpoints.c
    now = clock_expression(conn.engine)
    known = conn.execute(
        sa.select(c.position, c.stream_types).where(c.consumer == consumer)
    ).one_or_none()
    if known is not None and (scope is None or _scope(known[1]) == scope):
        if position <= known[0]:
            return int(known[0])
        conn.execute(
            sa.update(checkpoints)
            .where(c.consumer == consumer)
            .values(position=_larger(conn, c.position, position), updated_at=now)
        )
        return int(conn.execute(sa.select(c.position).where(c.consumer == consumer)).scalar_one())
    # A new consumer, or a new scope: it may hold back a delete in flight (module doc).
    if not _sqlite(conn):
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(CONSUMERS_LOCK_KEY)))
        known = conn.execute(
            sa.select(c.position, c.stream_types).where(c.consumer == consumer)
        ).one_or_none()
    if known is None:
        conn.execute(
            checkpoints.insert().values(
                consumer=consumer,
                position=position,
                stream_types=_scope_text(scope),
                updated_at=now,
            )
        )
        return position
    stored = max(int(known[0]), position)
    conn.execute(
        sa.update(checkpoints)
        .where(c.consumer == consumer)
        .values(position=stored, stream_types=_scope_text(scope), updated_at=now)
    )
    return stored


def listed(conn: Connection) -> list[Checkpoint]:
    c = checkpoints.c
    rows = conn.execute(
        sa.select(c.consumer, c.position, c.stream_types, c.updated_at).order_by(c.consumer)
    )
    return [Checkpoint(r[0], int(r[1]), _scope(r[2]), r[3]) for r in rows]


def readers(conn: Connection, *, in_delete: bool = False) -> list[Reader]:
    """Every consumer as the gate sees it; ``in_delete``: inside a delete transaction,
    after the shared lock that orders it with registrations (module doc)."""
    if in_delete and not _sqlite(conn):
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock_shared(CONSUMERS_LOCK_KEY)))
    c = checkpoints.c
    rows = conn.execute(sa.select(c.consumer, c.position, c.stream_types))
    return [(r[0], int(r[1]), _scope(r[2])) for r in rows]


def newest_read(conn: Connection, pk: int, through_version: int, position: int) -> int | None:
    """The highest live version of stream ``pk`` at or below ``through_version`` whose
    position is at or below ``position`` (positions grow with versions, so this is a
    backward scan of the stream's key that stops at the first hit)."""
    e = events.c
    found = conn.execute(
        sa.select(e.version)
        .where(e.stream_pk == pk, e.version <= through_version, e.position <= position)
        .order_by(e.version.desc())
        .limit(1)
    ).scalar_one_or_none()
    return None if found is None else int(found)


def position_of(conn: Connection, pk: int, version: int) -> int | None:
    e = events.c
    found = conn.execute(
        sa.select(e.position).where(e.stream_pk == pk, e.version == version)
    ).scalar_one_or_none()
    return None if found is None else int(found)


def readable_filter(found: list[Reader]) -> sa.ColumnElement[bool] | None:
    """For the candidate query: streams whose oldest live event every consumer reading
    them has passed (None: no consumer, no filter). Streams held back entirely are left
    out, so runs do not spin on them. A stream whose oldest live event is missing (a
    damaged stream) stays in: its compaction reports the gap."""
    if not found:
        return None
    s, e = streams.c, events.c
    first = sa.func.coalesce(
        sa.select(e.position)
        .where(e.stream_pk == s.pk, e.version == s.compacted_through + 1)
        .scalar_subquery(),
        0,
    )
    scoped = sorted({t for _, _, scope in found if scope is not None for t in scope})
    branches: list[sa.ColumnElement[bool]] = []
    for stream_type in scoped:
        reader = lowest_reader(found, stream_type)
        assert reader is not None  # a scope names it
        branches.append(sa.and_(s.stream_type == stream_type, first <= reader.position))
    everyone = min((position for _, position, scope in found if scope is None), default=None)
    rest = s.stream_type.not_in(scoped)
    branches.append(rest if everyone is None else sa.and_(rest, first <= everyone))
    return sa.or_(*branches)


def lag(conn: Connection, position: int, stream_types: Sequence[str] | None) -> int:
    e = events.c
    query = sa.select(sa.func.count()).select_from(events).where(e.position > position)
    if stream_types is not None:
        query = query.join(streams, streams.c.pk == e.stream_pk).where(
            streams.c.stream_type.in_(list(stream_types))
        )
    return int(conn.execute(query).scalar_one())


def _larger(conn: Connection, column: sa.ColumnElement[int], value: int) -> sa.ColumnElement[int]:
    """The larger of a column and a value (two concurrent moves never go backwards)."""
    if _sqlite(conn):
        return sa.func.max(column, value)
    return sa.func.greatest(column, value)


def _sqlite(conn: Connection) -> bool:
    return conn.dialect.name == "sqlite"
