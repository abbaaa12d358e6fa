"""The SQL snapshot store: snapshots in the event store's database, so the delete
transaction can check the snapshot and the fencing token together."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from eskit_tasks.domain.events import label_of
from eskit_tasks.ports import Snapshot, StoredSnapshot, StreamInfo
from eskit_tasks.stores._rules import check_snapshot_save
from eskit_tasks.stores.driver_errors import mask_url
from eskit_tasks.stores.engine import reading, writing
from eskit_tasks.stores.schema import ensure_schema, snapshots, stream_row, streams

_SNAPSHOT_COLUMNS = (
    snapshots.c.version,
    snapshots.c.state,
    snapshots.c.state_hash,
    snapshots.c.verified,
    snapshots.c.created_at,
    snapshots.c.fingerprint,
    snapshots.c.state_version,
)


def _snapshot(row: Sequence[Any]) -> Snapshot:
    version, state, digest, verified, created_at, fingerprint, state_version = row
    return Snapshot(
        int(version),
        state.encode(),
        digest,
        bool(verified),
        created_at,
        fingerprint,
        None if state_version is None else int(state_version),
    )


class SqlSnapshotStore:
    """Snapshot store in the event store's database; see :class:`eskit_tasks.ports.SnapshotStore`.

    Args:
        engine: The event store's engine (``SqlSnapshotStore(store.engine)``).
        create_tables: Create the tables if they are missing and check their layout
            (once per engine).
    """

    def __init__(self, engine: Engine, *, create_tables: bool = True) -> None:
        self.engine = engine
        if create_tables:
            ensure_schema(engine)

    def __repr__(self) -> str:
        return f"SqlSnapshotStore({mask_url(self.engine.url)!r})"

    @contextmanager
    def _locked(
        self, action: str, stream_type: str, stream_id: str, *, durable: bool = True
    ) -> Iterator[tuple[Connection, int | None, StreamInfo | None]]:
        """A write transaction holding the stream's row lock: the connection, the
        stream's key and its bookkeeping (None, None: no such stream)."""
        label = label_of(stream_type, stream_id)
        with writing(self.engine, f"{action} of {label}", durable=durable) as conn:
            pk, info = stream_row(conn, stream_type, stream_id, lock=True)
            yield conn, pk, info

    def save(
        self, stream_type: str, stream_id: str, snapshot: Snapshot, *, fence_token: int
    ) -> None:
        label = label_of(stream_type, stream_id)
        # Not flushed to disk on commit (PostgreSQL): an unverified snapshot counts only
        # once the delete transaction, whose durable commit flushes the WAL before it,
        # has checked it; one a crash undid is found missing there, and nothing is deleted.
        with self._locked("save a snapshot", stream_type, stream_id, durable=False) as (
            conn,
            pk,
            info,
        ):
            check_snapshot_save(label, info, snapshot.version, fence_token)
            # An unverified leftover at this version (a crashed or failed compaction) is
            # replaced; verified snapshots only exist at the compaction point, below us.
            conn.execute(_delete_unverified(pk, snapshot.version))
            conn.execute(
                snapshots.insert().values(
                    stream_pk=pk,
                    version=snapshot.version,
                    state=snapshot.state.decode(),
                    state_hash=snapshot.state_hash,
                    verified=False,
                    fence_token=fence_token,
                    created_at=snapshot.created_at,
                    fingerprint=snapshot.fingerprint,
                    state_version=snapshot.state_version,
                )
            )

    def discard(self, stream_type: str, stream_id: str, version: int, *, fence_token: int) -> None:
        with self._locked("discard a snapshot", stream_type, stream_id) as (conn, pk, info):
            if info is None or info.fence_token != fence_token:
                return  # a newer compaction owns the stream and its own snapshot
            conn.execute(_delete_unverified(pk, version))

    def read(self, stream_type: str, stream_id: str, version: int) -> Snapshot | None:
        return self._one(stream_type, stream_id, snapshots.c.version == version)

    def latest(self, stream_type: str, stream_id: str) -> Snapshot | None:
        return self._one(stream_type, stream_id, snapshots.c.verified.is_(True))

    def _one(self, stream_type: str, stream_id: str, condition: Any) -> Snapshot | None:
        query = (
            sa.select(*_SNAPSHOT_COLUMNS)
            .join(streams, streams.c.pk == snapshots.c.stream_pk)
            .where(
                streams.c.stream_type == stream_type, streams.c.stream_id == stream_id, condition
            )
            .order_by(snapshots.c.version.desc())
            .limit(1)
        )
        label = label_of(stream_type, stream_id)
        with reading(self.engine, f"read a snapshot of {label}") as conn:
            row = conn.execute(query).one_or_none()
        return None if row is None else _snapshot(row)

    def verified_snapshots(
        self, *, after: int = 0, limit: int = 500, stream_types: Sequence[str] | None = None
    ) -> list[StoredSnapshot]:
        """A keyset page over the compacted streams' key; each one's verified snapshot,
        which a committed compaction leaves at the compaction point (and only there), or
        None where it is missing."""
        query = (
            sa.select(
                streams.c.pk,
                streams.c.stream_type,
                streams.c.stream_id,
                streams.c.compacted_through,
                *_SNAPSHOT_COLUMNS,
            )
            .outerjoin(
                snapshots,
                sa.and_(
                    snapshots.c.stream_pk == streams.c.pk,
                    snapshots.c.version == streams.c.compacted_through,
                    snapshots.c.verified.is_(True),
                ),
            )
            .where(streams.c.pk > after, streams.c.compacted_through > 0)
            .order_by(streams.c.pk)
            .limit(limit)
        )
        if stream_types is not None:
            query = query.where(streams.c.stream_type.in_(list(stream_types)))
        with reading(self.engine, "list verified snapshots") as conn:
            rows = conn.execute(query).all()
        return [
            StoredSnapshot(
                int(r[0]), r[1], r[2], int(r[3]), None if r[4] is None else _snapshot(r[4:])
            )
            for r in rows
        ]


def _delete_unverified(pk: int | None, version: int) -> sa.Delete:
    return sa.delete(snapshots).where(
        snapshots.c.stream_pk == pk,
        snapshots.c.version == version,
        snapshots.c.verified.is_(False),
    )
