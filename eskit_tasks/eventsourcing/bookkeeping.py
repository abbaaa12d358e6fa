"""eskit-tasks' bookkeeping of an application's aggregates, in the side tables of its
database: the compaction point (what the guard reads), fencing tokens, the audit log.
Rows are keyed by ``(application name, str(aggregate id))``."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from eskit_tasks.errors import ConfigurationError
from eskit_tasks.eventsourcing.target import Target
from eskit_tasks.stores import migrate
from eskit_tasks.stores.engine import reading, writing
from eskit_tasks.stores.schema import compaction_log, stream_row, streams


def token_of(target: Target, stream_id: str) -> int | None:
    """The stream's fencing token now (None: no row, or unreadable)."""
    try:
        with reading(target.engine, "read the fencing token") as conn:
            info = stream_row(conn, target.name, stream_id)[1]
    except Exception:
        return None
    return None if info is None else info.fence_token


def point(target: Target, stream_id: str) -> int:
    """The stream's compaction point, without writing anything (0: none yet)."""
    if migrate.status(target.engine).state == "empty":
        return 0
    with reading(target.engine, "read the compaction point") as conn:
        info = stream_row(conn, target.name, stream_id)[1]
    return 0 if info is None else info.compacted_through


def fence(target: Target, stream_id: str) -> tuple[int, int]:
    """Take a new fencing token for the stream; return its compaction point and token."""
    name = target.name
    with writing(target.engine, f"take a fencing token for {name}/{stream_id}") as conn:
        pk, _ = stream_row(conn, name, stream_id, lock=True)
        if pk is None:
            conn.execute(
                streams.insert().values(
                    stream_type=name,
                    stream_id=stream_id,
                    head_version=0,
                    compacted_through=0,
                    fence_token=0,
                    created_at=datetime.now(UTC),
                )
            )
            pk, _ = stream_row(conn, name, stream_id, lock=True)
        assert pk is not None
        conn.execute(
            sa.update(streams)
            .where(streams.c.pk == pk)
            .values(fence_token=streams.c.fence_token + 1)
        )
        _, info = stream_row(conn, name, stream_id)
        assert info is not None
        return info.compacted_through, info.fence_token


def logged(target: Target, compaction_id: str, stream_id: str) -> dict[str, Any] | None:
    """The result fields of this aggregate's committed compaction under
    ``compaction_id``.

    Raises:
        ConfigurationError: the id names a compaction of another stream.
    """
    if migrate.status(target.engine).state == "empty":
        return None
    c = compaction_log.c
    with reading(target.engine, "read the audit log") as conn:
        row = conn.execute(
            sa.select(
                c.stream_type,
                c.stream_id,
                c.from_version,
                c.through_version,
                c.head_version,
                c.state_hash,
                c.events_deleted,
                c.bytes_reclaimed,
            ).where(c.compaction_id == compaction_id)
        ).first()
    if row is None:
        return None
    if (row.stream_type, row.stream_id) != (target.name, stream_id):
        raise ConfigurationError(
            f"compaction id {compaction_id!r} is already in the audit log, for "
            f"{row.stream_type}/{row.stream_id}; give each compaction its own id; "
            "nothing was deleted"
        )
    return {
        "compacted_through_before": row.from_version - 1,
        "snapshot_version": row.through_version,
        "head_version": row.head_version,
        "events_retained": row.head_version - row.through_version,
        "state_hash": row.state_hash,
        "events_deleted": row.events_deleted,
        "bytes_reclaimed": row.bytes_reclaimed,
    }
