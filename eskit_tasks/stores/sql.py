"""The SQL event store and snapshot store (PostgreSQL via psycopg 3, or SQLite).

Hot path: events are stored as JSON text and read with a streamed cursor in pages of
``page_size`` rows, decoded with orjson. Memory is bounded by the page size, whatever
the length of the stream.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection, Engine

from eskit_tasks.domain.events import NewEvent, RecordedEvent, label_of
from eskit_tasks.errors import (
    CompactionError,
    ConfigurationError,
    DeletionMismatchError,
    EventDecodeError,
    FencedError,
)
from eskit_tasks.ports import (
    Candidate,
    CompactionRecord,
    DeletionPlan,
    Snapshot,
    StoredSnapshot,
    StreamInfo,
)
from eskit_tasks.stores import dialects
from eskit_tasks.stores._rules import (
    ROW_OVERHEAD_BYTES,
    check_aware,
    check_expected_version,
    check_fence,
    conflict,
    encode_events,
)
from eskit_tasks.stores.schema import (
    compaction_log,
    events,
    layout_differences,
    metadata,
    snapshots,
    streams,
)

#: Rows fetched per round trip when streaming events.
DEFAULT_PAGE_SIZE = 5000


# Engines whose tables were created or checked already (once per engine, not per store).
_checked_engines: weakref.WeakSet[Engine] = weakref.WeakSet()


def _ensure_schema(engine: Engine) -> None:
    """Create the missing tables and refuse existing ones of another layout."""
    if engine in _checked_engines:
        return
    with dialects.translate_errors(engine, "open the event store"):
        dialects.create_tables(engine, metadata, layout_differences)
    _checked_engines.add(engine)


def _stream_pk(conn: Connection, stream_type: str, stream_id: str, *, lock: bool = False) -> Any:
    query = sa.select(
        streams.c.pk, streams.c.head_version, streams.c.compacted_through, streams.c.fence_token
    ).where(streams.c.stream_type == stream_type, streams.c.stream_id == stream_id)
    if lock:
        query = query.with_for_update()
    return conn.execute(query).one_or_none()


_AUDIT_QUERY = sa.select(
    compaction_log.c.compaction_id,
    compaction_log.c.stream_type,
    compaction_log.c.stream_id,
    compaction_log.c.from_version,
    compaction_log.c.through_version,
    compaction_log.c.snapshot_version,
    compaction_log.c.head_version,
    compaction_log.c.state_hash,
    compaction_log.c.events_deleted,
    compaction_log.c.bytes_reclaimed,
    compaction_log.c.fence_token,
    compaction_log.c.compacted_at,
)


class SqlEventStore:
    """Event store on PostgreSQL or SQLite; see :class:`eskit_tasks.ports.EventStore`.

    Args:
        engine: A SQLAlchemy engine, best made by :meth:`from_url`, which configures
            SQLite for concurrent readers (WAL) and serialised writers.
        create_tables: Create the tables if they are missing and check the layout of
            those that exist (:class:`~eskit_tasks.errors.TableLayoutError` if it is not
            this version's). False: no I/O here, for engines already checked.
        page_size: Rows per fetch when streaming events.
    """

    def __init__(
        self, engine: Engine, *, create_tables: bool = True, page_size: int = DEFAULT_PAGE_SIZE
    ) -> None:
        if page_size < 1:
            raise ConfigurationError(f"page_size must be at least 1, got {page_size}")
        self.engine = engine
        self.page_size = page_size
        if create_tables:
            _ensure_schema(engine)

    @classmethod
    def from_url(
        cls, url: str | URL, *, page_size: int = DEFAULT_PAGE_SIZE, **engine_kwargs: Any
    ) -> SqlEventStore:
        """Connect to ``url`` (``sqlite:///file.db`` or ``postgresql+psycopg://...``) and
        create the tables if they are missing.

        Raises:
            DatabaseUnavailableError: the database cannot be reached (message names the
                host; the password is masked).
            ConfigurationError: the URL is malformed or names an unsupported database.
        """
        engine = dialects.create_engine(url, **engine_kwargs)
        try:
            return cls(engine, page_size=page_size)
        except BaseException:
            engine.dispose()  # e.g. TableLayoutError: no pooled connection is left behind
            raise

    def __repr__(self) -> str:
        return f"SqlEventStore({dialects.mask_url(self.engine.url)!r})"

    # -- writing -----------------------------------------------------------------------

    def append(
        self,
        stream_type: str,
        stream_id: str,
        events_: Sequence[NewEvent],
        *,
        expected_version: int,
    ) -> int:
        """Append events after ``expected_version``; see :class:`~eskit_tasks.ports.EventStore`.

        Raises:
            ConcurrencyError: the head is not ``expected_version`` (0: the stream exists).
        """
        check_expected_version(expected_version)
        label = label_of(stream_type, stream_id)
        rows = encode_events(label, events_)
        now = dialects.clock_expression(self.engine)
        new_head = expected_version + len(rows)
        with dialects.translate_errors(self.engine, f"append to {label}"):
            if not rows:
                actual = self.head_version(stream_type, stream_id)
                if actual != expected_version:
                    raise conflict(label, expected_version, actual)
                return actual
            with dialects.write_transaction(self.engine) as conn:
                if expected_version == 0:
                    insert = dialects.insert_ignoring_conflicts(self.engine, streams).values(
                        stream_type=stream_type,
                        stream_id=stream_id,
                        head_version=new_head,
                        created_at=now,
                    )
                    pk = conn.execute(insert.returning(streams.c.pk)).scalar_one_or_none()
                else:
                    pk = conn.execute(
                        sa.update(streams)
                        .where(
                            streams.c.stream_type == stream_type,
                            streams.c.stream_id == stream_id,
                            streams.c.head_version == expected_version,
                        )
                        .values(head_version=new_head)
                        .returning(streams.c.pk)
                    ).scalar_one_or_none()
                if pk is not None:
                    conn.execute(
                        events.insert().values(recorded_at=now),
                        [
                            {
                                "stream_pk": pk,
                                "version": expected_version + i,
                                "type": t,
                                "data": d,
                                "metadata": m,
                            }
                            for i, (t, d, m) in enumerate(rows, start=1)
                        ],
                    )
            if pk is None:
                raise conflict(label, expected_version, self.head_version(stream_type, stream_id))
        return new_head

    # -- reading -----------------------------------------------------------------------

    def head_version(self, stream_type: str, stream_id: str) -> int:
        info = self.stream_info(stream_type, stream_id)
        return 0 if info is None else info.head_version

    def stream_info(self, stream_type: str, stream_id: str) -> StreamInfo | None:
        with (
            dialects.translate_errors(self.engine, f"read {label_of(stream_type, stream_id)}"),
            self.engine.connect() as conn,
        ):
            row = _stream_pk(conn, stream_type, stream_id)
        return None if row is None else StreamInfo(row[1], row[2], row[3])

    def read(
        self,
        stream_type: str,
        stream_id: str,
        *,
        from_version: int = 1,
        to_version: int | None = None,
    ) -> Iterator[RecordedEvent]:
        """Yield live events oldest first, streamed ``page_size`` rows at a time.

        One SELECT serves the whole iteration, so the events come from one consistent
        view: a compaction committing meanwhile removes a prefix or nothing.

        Raises:
            EventDecodeError: a payload is not valid JSON (names stream and version).
        """
        return self._stream(stream_type, stream_id, from_version, to_version)

    def _stream(
        self, stream_type: str, stream_id: str, from_version: int, to_version: int | None
    ) -> Iterator[RecordedEvent]:
        label = label_of(stream_type, stream_id)
        loads = orjson.loads
        with (
            dialects.translate_errors(self.engine, f"read {label}"),
            self.engine.connect() as conn,
            conn.begin(),
        ):
            pages, to_datetime = dialects.stream_events(
                conn, stream_type, stream_id, from_version, to_version, self.page_size
            )
            event, overhead = RecordedEvent, ROW_OVERHEAD_BYTES  # locals: read per row
            # Events appended together share one timestamp: convert each distinct one once.
            last_raw: Any = None
            recorded_at: datetime = datetime.min
            # closing(): an abandoned read closes its cursor before the connection goes.
            with contextlib.closing(pages):
                for page in pages:
                    for version, type_, data, meta, raw_ts in page:
                        if raw_ts != last_raw:
                            last_raw, recorded_at = raw_ts, to_datetime(raw_ts)
                        try:
                            payload = loads(data)
                            meta_obj = {} if meta == "{}" else loads(meta)
                        except orjson.JSONDecodeError as exc:
                            raise EventDecodeError(
                                f"{label} version {version}: stored payload is not valid "
                                f"JSON ({exc})",
                                stream_type=stream_type,
                                stream_id=stream_id,
                                version=version,
                            ) from None
                        yield event(
                            version,
                            type_,
                            payload,
                            meta_obj,
                            recorded_at,
                            len(data) + len(meta) + overhead,
                        )

    def oldest_version_after(
        self, stream_type: str, stream_id: str, cutoff: datetime
    ) -> int | None:
        check_aware(cutoff)
        query = (
            sa.select(sa.func.min(events.c.version))
            .join(streams, streams.c.pk == events.c.stream_pk)
            .where(
                streams.c.stream_type == stream_type,
                streams.c.stream_id == stream_id,
                events.c.recorded_at > cutoff,
            )
        )
        with (
            dialects.translate_errors(self.engine, f"read {label_of(stream_type, stream_id)}"),
            self.engine.connect() as conn,
        ):
            value = conn.execute(query).scalar_one_or_none()
        return None if value is None else int(value)

    def now(self) -> datetime:
        clock = dialects.clock_expression(self.engine)
        if isinstance(clock, datetime):
            return clock
        with (
            dialects.translate_errors(self.engine, "read the database clock"),
            self.engine.connect() as conn,
        ):
            value: datetime = conn.execute(sa.select(clock)).scalar_one()
        return value

    def candidates(
        self,
        *,
        after: int = 0,
        limit: int = 500,
        min_live_events: int = 1,
        stream_types: Sequence[str] | None = None,
        until: int | None = None,
    ) -> list[Candidate]:
        """A keyset page over the streams' primary key; see the port."""
        s = streams.c
        live = (s.head_version - s.compacted_through).label("live")
        query = (
            sa.select(s.pk, s.stream_type, s.stream_id, live)
            .where(s.pk > after, s.head_version - s.compacted_through >= min_live_events)
            .order_by(s.pk)
            .limit(limit)
        )
        if stream_types is not None:
            query = query.where(s.stream_type.in_(list(stream_types)))
        if until is not None:
            query = query.where(s.pk <= until)
        with (
            dialects.translate_errors(self.engine, "list candidate streams"),
            self.engine.connect() as conn,
        ):
            return [Candidate(int(r[0]), r[1], r[2], int(r[3])) for r in conn.execute(query)]

    def max_stream_key(self) -> int:
        with (
            dialects.translate_errors(self.engine, "list candidate streams"),
            self.engine.connect() as conn,
        ):
            return int(conn.execute(sa.select(sa.func.max(streams.c.pk))).scalar_one() or 0)

    def compaction_log(
        self, stream_type: str | None = None, stream_id: str | None = None, *, limit: int = 100
    ) -> list[CompactionRecord]:
        c = compaction_log.c
        query = _AUDIT_QUERY.order_by(c.id.desc()).limit(limit)
        if stream_type is not None:
            query = query.where(c.stream_type == stream_type)
        if stream_id is not None:
            query = query.where(c.stream_id == stream_id)
        with (
            dialects.translate_errors(self.engine, "read the compaction log"),
            self.engine.connect() as conn,
        ):
            return [CompactionRecord(**row._mapping) for row in conn.execute(query)]

    def find_compaction(self, compaction_id: str) -> CompactionRecord | None:
        """The audit row of ``compaction_id``; see the port."""
        with (
            dialects.translate_errors(self.engine, "read the compaction log"),
            self.engine.connect() as conn,
        ):
            row = conn.execute(
                _AUDIT_QUERY.where(compaction_log.c.compaction_id == compaction_id)
            ).one_or_none()
        return None if row is None else CompactionRecord(**row._mapping)

    # -- compaction --------------------------------------------------------------------

    def acquire_fence(self, stream_type: str, stream_id: str) -> StreamInfo | None:
        with (
            dialects.translate_errors(
                self.engine, f"take a fencing token for {label_of(stream_type, stream_id)}"
            ),
            dialects.write_transaction(self.engine) as conn,
        ):
            row = conn.execute(
                sa.update(streams)
                .where(streams.c.stream_type == stream_type, streams.c.stream_id == stream_id)
                .values(fence_token=streams.c.fence_token + 1)
                .returning(
                    streams.c.head_version, streams.c.compacted_through, streams.c.fence_token
                )
            ).one_or_none()
        return None if row is None else StreamInfo(row[0], row[1], row[2])

    def commit_compaction(self, plan: DeletionPlan) -> int:
        """Delete events 1..C in one transaction, checking everything first.

        Raises:
            FencedError: a newer compaction took the token, or moved the compaction point.
            DeletionMismatchError: snapshot missing/different, or the row count differs.
        """
        label = label_of(plan.stream_type, plan.stream_id)
        c = plan.through_version
        with (
            dialects.translate_errors(self.engine, f"delete compacted events of {label}"),
            dialects.write_transaction(self.engine) as conn,
        ):
            row = _stream_pk(conn, plan.stream_type, plan.stream_id, lock=True)
            if row is None:
                raise DeletionMismatchError(f"{label}: the stream no longer exists")
            pk, head, compacted_through, token = row
            check_fence(label, plan, token, compacted_through)
            if c > head:
                raise DeletionMismatchError(f"{label}: cannot compact through {c}, head is {head}")
            snap = conn.execute(
                sa.select(snapshots.c.state_hash).where(
                    snapshots.c.stream_pk == pk, snapshots.c.version == c
                )
            ).scalar_one_or_none()
            if snap != plan.state_hash:
                raise DeletionMismatchError(
                    f"{label}: the snapshot at version {c} is "
                    f"{'missing' if snap is None else 'different from the verified one'}; "
                    "nothing deleted"
                )
            deleted = conn.execute(
                sa.delete(events).where(events.c.stream_pk == pk, events.c.version <= c)
            ).rowcount
            if deleted != plan.expected_deleted:
                raise DeletionMismatchError(
                    f"{label}: deleting versions up to {c} would remove {deleted} events, "
                    f"the plan says {plan.expected_deleted}; rolled back, nothing deleted"
                )
            conn.execute(
                sa.update(snapshots)
                .where(snapshots.c.stream_pk == pk, snapshots.c.version == c)
                .values(verified=True)
            )
            conn.execute(
                sa.delete(snapshots).where(snapshots.c.stream_pk == pk, snapshots.c.version < c)
            )
            conn.execute(
                compaction_log.insert().values(
                    compaction_id=plan.compaction_id,
                    stream_pk=pk,
                    stream_type=plan.stream_type,
                    stream_id=plan.stream_id,
                    from_version=compacted_through + 1,
                    through_version=c,
                    snapshot_version=c,
                    head_version=plan.head_version,
                    state_hash=plan.state_hash,
                    events_deleted=deleted,
                    bytes_reclaimed=plan.bytes_reclaimed,
                    fence_token=plan.fence_token,
                    compacted_at=dialects.clock_expression(self.engine),
                )
            )
            conn.execute(sa.update(streams).where(streams.c.pk == pk).values(compacted_through=c))
        return int(deleted)


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
            _ensure_schema(engine)

    def __repr__(self) -> str:
        return f"SqlSnapshotStore({dialects.mask_url(self.engine.url)!r})"

    def save(
        self, stream_type: str, stream_id: str, snapshot: Snapshot, *, fence_token: int
    ) -> None:
        label = label_of(stream_type, stream_id)
        with (
            dialects.translate_errors(self.engine, f"save a snapshot of {label}"),
            dialects.write_transaction(self.engine) as conn,
        ):
            row = _stream_pk(conn, stream_type, stream_id, lock=True)
            if row is None:
                raise CompactionError(f"{label}: cannot snapshot a stream that does not exist")
            pk, _head, compacted_through, token = row
            if token != fence_token:
                raise FencedError(
                    f"{label}: fencing token {fence_token} is stale (current {token}); "
                    "a newer compaction owns the stream, snapshot not written"
                )
            if snapshot.version <= compacted_through:
                raise FencedError(
                    f"{label}: already compacted through {compacted_through}; a snapshot at "
                    f"{snapshot.version} would not be newer, not written"
                )
            # An unverified leftover at this version (a crashed or failed compaction) is
            # replaced; verified snapshots only exist at the compaction point, below us.
            conn.execute(
                sa.delete(snapshots).where(
                    snapshots.c.stream_pk == pk,
                    snapshots.c.version == snapshot.version,
                    snapshots.c.verified.is_(False),
                )
            )
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
        with (
            dialects.translate_errors(
                self.engine, f"read a snapshot of {label_of(stream_type, stream_id)}"
            ),
            self.engine.connect() as conn,
        ):
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
        with (
            dialects.translate_errors(self.engine, "list verified snapshots"),
            self.engine.connect() as conn,
        ):
            rows = conn.execute(query).all()
        return [
            StoredSnapshot(
                int(r[0]), r[1], r[2], int(r[3]), None if r[4] is None else _snapshot(r[4:])
            )
            for r in rows
        ]

    def discard(self, stream_type: str, stream_id: str, version: int, *, fence_token: int) -> None:
        label = label_of(stream_type, stream_id)
        with (
            dialects.translate_errors(self.engine, f"discard a snapshot of {label}"),
            dialects.write_transaction(self.engine) as conn,
        ):
            row = _stream_pk(conn, stream_type, stream_id, lock=True)
            if row is None or row[3] != fence_token:
                return  # a newer compaction owns the stream and its own snapshot
            conn.execute(
                sa.delete(snapshots).where(
                    snapshots.c.stream_pk == row[0],
                    snapshots.c.version == version,
                    snapshots.c.verified.is_(False),
                )
            )
