"""The trash bin's side of the SQL store: reading the rows a compaction is about to
delete exactly as stored, and putting archived rows back (``restore``)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from eskit_tasks.domain.events import label_of
from eskit_tasks.errors import RestoreError
from eskit_tasks.ports import ArchivedEvent
from eskit_tasks.stores._rules import check_restore_target, check_restored
from eskit_tasks.stores.engine import clock_expression, reading, writing
from eskit_tasks.stores.schema import compaction_log, events, snapshots, stream_row, streams

#: Archived events put back per INSERT during a restore.
RESTORE_BATCH = 1000


def export(
    engine: Engine,
    stream_type: str,
    stream_id: str,
    from_version: int,
    to_version: int,
    page_size: int,
) -> Iterator[ArchivedEvent]:
    """Yield the stored rows ``from_version..to_version`` of one stream, untouched (JSON
    text as stored), oldest first, from one statement fetched ``page_size`` at a time."""
    e = events.c
    query = (
        sa.select(e.version, e.type, e.data, e.metadata, e.recorded_at, e.position)
        .join(streams, streams.c.pk == e.stream_pk)
        .where(
            streams.c.stream_type == stream_type,
            streams.c.stream_id == stream_id,
            e.version >= from_version,
            e.version <= to_version,
        )
        .order_by(e.version)
    )
    label = label_of(stream_type, stream_id)
    with reading(engine, f"read {label} for the archive") as conn, conn.begin():
        result = conn.execution_options(stream_results=True, yield_per=page_size)
        for row in result.execute(query):
            yield ArchivedEvent(int(row[0]), row[1], row[2], row[3], row[4], int(row[5]))


def restore_events(
    engine: Engine,
    stream_type: str,
    stream_id: str,
    events_: Iterable[ArchivedEvent],
    *,
    compacted_through: int,
    compaction_ids: Sequence[str],
) -> int:
    """Put archived events back in one transaction; see
    :meth:`~eskit_tasks.ports.EventStore.restore_events`. Memory is bounded by
    :data:`RESTORE_BATCH` rows whatever the number of events."""
    label = label_of(stream_type, stream_id)
    e = events.c
    with writing(engine, f"restore {label}") as conn:
        pk, found = stream_row(conn, stream_type, stream_id, lock=True)
        check_restore_target(label, found, compacted_through)
        taken = conn.execute(
            sa.select(sa.func.count())
            .select_from(events)
            .where(e.stream_pk == pk, e.version <= compacted_through)
        ).scalar_one()
        if taken:
            raise RestoreError(
                f"restore {label}: {taken} events at or below version "
                f"{compacted_through} are live; they would be overwritten, nothing changed"
            )
        restored, last = 0, 0
        batch: list[dict[str, Any]] = []
        for ev in events_:
            if ev.version != last + 1:
                raise RestoreError(
                    f"restore {label}: the archives go from version {last} to "
                    f"{ev.version}; expected {last + 1}, nothing changed"
                )
            last = ev.version
            batch.append(
                {
                    "stream_pk": pk,
                    "version": ev.version,
                    "type": ev.type,
                    "data": ev.data,
                    "metadata": ev.metadata,
                    "recorded_at": ev.recorded_at,
                    "position": ev.position,
                }
            )
            if len(batch) == RESTORE_BATCH:
                restored += _put_back(conn, label, batch)
                batch = []
        if batch:
            restored += _put_back(conn, label, batch)
        check_restored(label, compacted_through, restored, last)
        conn.execute(
            sa.update(streams)
            .where(streams.c.pk == pk)
            .values(compacted_through=0, fence_token=streams.c.fence_token + 1)
        )
        conn.execute(sa.delete(snapshots).where(snapshots.c.stream_pk == pk))
        if compaction_ids:
            conn.execute(
                sa.update(compaction_log)
                .where(compaction_log.c.compaction_id.in_(list(compaction_ids)))
                .values(restored_at=clock_expression(engine))
            )
    return restored


def _put_back(conn: sa.Connection, label: str, batch: list[dict[str, Any]]) -> int:
    try:
        with conn.begin_nested():
            conn.execute(events.insert(), batch)
    except sa.exc.IntegrityError:
        raise RestoreError(
            f"restore {label}: an archived position between {batch[0]['position']} and "
            f"{batch[-1]['position']} is taken by another event; nothing changed"
        ) from None
    return len(batch)
