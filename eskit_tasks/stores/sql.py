"""The SQL event store (PostgreSQL via psycopg 3, or SQLite).

Its neighbours do the rest: :mod:`.engine` sets the engine up, :mod:`.reads` is the
hot read path (streamed, ``page_size`` rows at a time, decoded with orjson),
:mod:`.driver_errors` turns driver errors into eskit errors, :mod:`.schema` holds the
tables and :mod:`._rules` the checks shared with the in-memory store. The snapshot store
is in :mod:`.sql_snapshots` (importable from here too).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine

from eskit_tasks.domain.events import NewEvent, RecordedEvent, label_of
from eskit_tasks.domain.result import HeldBack
from eskit_tasks.errors import ConfigurationError, DeletionMismatchError, FencedError
from eskit_tasks.ports import (
    ArchivedEvent,
    Candidate,
    Checkpoint,
    CompactionRecord,
    DeletionPlan,
    StreamInfo,
)
from eskit_tasks.stores import positions, sql_consumers, sql_trash
from eskit_tasks.stores._rules import (
    audit_fields,
    check_aware,
    check_checkpoint,
    check_commit,
    check_consumers,
    check_deleted,
    check_expected_version,
    check_new_compaction_id,
    check_position,
    check_reachable,
    check_snapshot,
    conflict,
    encode_events,
    gated_cut,
    lowest_reader,
)
from eskit_tasks.stores.driver_errors import mask_url, translate_errors
from eskit_tasks.stores.engine import (
    clock_expression,
    create_engine,
    insert_ignoring_conflicts,
    reading,
    write_transaction,
    writing,
)
from eskit_tasks.stores.reads import StreamRead, read_all_events
from eskit_tasks.stores.schema import (
    checkpoints,
    compaction_log,
    ensure_schema,
    events,
    snapshots,
    stream_row,
    streams,
)
from eskit_tasks.stores.sql_snapshots import SqlSnapshotStore

__all__ = ["DEFAULT_PAGE_SIZE", "SqlEventStore", "SqlSnapshotStore"]

#: Rows fetched per round trip when streaming events.
DEFAULT_PAGE_SIZE = 5000

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
    compaction_log.c.archive_uri,
    compaction_log.c.archive_sha256,
    compaction_log.c.restored_at,
    compaction_log.c.run_id,
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
            ensure_schema(engine)

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
        engine = create_engine(url, **engine_kwargs)
        try:
            return cls(engine, page_size=page_size)
        except BaseException:
            engine.dispose()  # e.g. TableLayoutError: no pooled connection is left behind
            raise

    def __repr__(self) -> str:
        return f"SqlEventStore({mask_url(self.engine.url)!r})"

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
        now = clock_expression(self.engine)
        new_head = expected_version + len(rows)
        with translate_errors(self.engine, f"append to {label}"):
            if not rows:
                actual = self.head_version(stream_type, stream_id)
                if actual != expected_version:
                    raise conflict(label, expected_version, actual)
                return actual
            with write_transaction(self.engine) as conn:
                if expected_version == 0:
                    insert = insert_ignoring_conflicts(self.engine, streams).values(
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
                    # Last: positions are handed out in commit order (see .positions).
                    first = positions.take(conn, len(rows)) - 1
                    conn.execute(
                        events.insert().values(recorded_at=now),
                        [
                            {
                                "stream_pk": pk,
                                "version": expected_version + i,
                                "type": t,
                                "data": d,
                                "metadata": m,
                                "position": first + i,
                            }
                            for i, (t, d, m) in enumerate(rows, start=1)
                        ],
                    )
            if pk is None:
                actual = self.head_version(stream_type, stream_id)
                raise conflict(label, expected_version, actual)
        return new_head

    # -- reading -----------------------------------------------------------------------

    def head_version(self, stream_type: str, stream_id: str) -> int:
        info = self.stream_info(stream_type, stream_id)
        return 0 if info is None else info.head_version

    def stream_info(self, stream_type: str, stream_id: str) -> StreamInfo | None:
        label = label_of(stream_type, stream_id)
        with reading(self.engine, f"read {label}") as conn:
            _, info = stream_row(conn, stream_type, stream_id)
        return info

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
        return StreamRead(
            self.engine, stream_type, stream_id, from_version, to_version, self.page_size
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
        label = label_of(stream_type, stream_id)
        with reading(self.engine, f"read {label}") as conn:
            value = conn.execute(query).scalar_one_or_none()
        return None if value is None else int(value)

    def now(self) -> datetime:
        clock = clock_expression(self.engine)
        if isinstance(clock, datetime):
            return clock
        with reading(self.engine, "read the database clock") as conn:
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
        with reading(self.engine, "list candidate streams") as conn:
            readable = sql_consumers.readable_filter(sql_consumers.readers(conn))
            if readable is not None:  # leave out streams that consumers hold back entirely
                query = query.where(readable)
            return [Candidate(int(r[0]), r[1], r[2], int(r[3])) for r in conn.execute(query)]

    def max_stream_key(self) -> int:
        with reading(self.engine, "list candidate streams") as conn:
            return int(conn.execute(sa.select(sa.func.max(streams.c.pk))).scalar_one() or 0)

    def stream_types_in_use(self, stream_types: Iterable[str]) -> set[str]:
        found: set[str] = set()
        with reading(self.engine, "look up stream types") as conn:
            for stream_type in set(stream_types):
                one = sa.select(streams.c.pk).where(streams.c.stream_type == stream_type).limit(1)
                if conn.execute(one).first() is not None:
                    found.add(stream_type)
        return found

    def compaction_log(
        self,
        stream_type: str | None = None,
        stream_id: str | None = None,
        *,
        limit: int = 100,
        run_id: str | None = None,
    ) -> list[CompactionRecord]:
        c = compaction_log.c
        query = _AUDIT_QUERY.order_by(c.id.desc()).limit(limit)
        if stream_type is not None:
            query = query.where(c.stream_type == stream_type)
        if stream_id is not None:
            query = query.where(c.stream_id == stream_id)
        if run_id is not None:
            query = query.where(c.run_id == run_id)
        with reading(self.engine, "read the compaction log") as conn:
            return [CompactionRecord(**row._mapping) for row in conn.execute(query)]

    def find_compaction(self, compaction_id: str) -> CompactionRecord | None:
        """The audit row of ``compaction_id``; see the port."""
        query = _AUDIT_QUERY.where(compaction_log.c.compaction_id == compaction_id)
        with reading(self.engine, "read the compaction log") as conn:
            row = conn.execute(query).one_or_none()
        return None if row is None else CompactionRecord(**row._mapping)

    # -- the whole store, in commit order ----------------------------------------------

    def read_all(
        self, after_position: int = 0, limit: int | None = None
    ) -> Iterator[RecordedEvent]:
        """Yield live events of every stream in position order; see the port.

        Raises:
            ConfigurationError: ``after_position`` or ``limit`` is not an int >= 0.
        """
        check_position("after_position", after_position)
        if limit is not None:
            check_position("limit", limit)
        return read_all_events(self.engine, after_position, limit, self.page_size)

    def last_position(self) -> int:
        with reading(self.engine, "read the last position") as conn:
            return positions.last_taken(conn)

    # -- consumers ---------------------------------------------------------------------

    def save_checkpoint(
        self, consumer: str, position: int, *, stream_types: Sequence[str] | None = None
    ) -> int:
        """Record a consumer's position (never backwards); see the port."""
        scope = check_checkpoint(consumer, position, stream_types)
        with writing(self.engine, f"save the checkpoint of consumer {consumer!r}") as conn:
            check_reachable(consumer, position, positions.last_taken(conn))
            return sql_consumers.save(conn, consumer, position, scope)

    def checkpoints(self) -> dict[str, int]:
        return {c.consumer: c.position for c in self.consumers()}

    def consumers(self) -> list[Checkpoint]:
        with reading(self.engine, "read the consumers' checkpoints") as conn:
            return sql_consumers.listed(conn)

    def remove_checkpoint(self, consumer: str) -> bool:
        with writing(self.engine, f"remove consumer {consumer!r}") as conn:
            gone = conn.execute(
                sa.delete(checkpoints).where(checkpoints.c.consumer == consumer)
            ).rowcount
        return bool(gone)

    def deletable_through(
        self, stream_type: str, stream_id: str, through_version: int
    ) -> tuple[int, HeldBack | None]:
        label = label_of(stream_type, stream_id)
        with reading(self.engine, f"read the consumers of {label}") as conn:
            reader = lowest_reader(sql_consumers.readers(conn), stream_type)
            if reader is None:  # no consumer reads this type: nothing holds the cut back
                return through_version, None
            pk, info = stream_row(conn, stream_type, stream_id)
            if pk is None or info is None:
                return through_version, None
            newest = sql_consumers.newest_read(conn, pk, through_version, reader.position)
        return gated_cut(through_version, info.compacted_through, reader, newest)

    def events_after(self, position: int, stream_types: Sequence[str] | None = None) -> int:
        with reading(self.engine, "count the events after a checkpoint") as conn:
            return sql_consumers.lag(conn, position, stream_types)

    # -- the trash bin -----------------------------------------------------------------

    def export(
        self, stream_type: str, stream_id: str, from_version: int, to_version: int
    ) -> Iterator[ArchivedEvent]:
        """The stored rows ``from_version..to_version``, untouched, streamed a page at a
        time from one statement; see the port."""
        return sql_trash.export(
            self.engine, stream_type, stream_id, from_version, to_version, self.page_size
        )

    def restore_events(
        self,
        stream_type: str,
        stream_id: str,
        events_: Iterable[ArchivedEvent],
        *,
        compacted_through: int,
        compaction_ids: Sequence[str],
    ) -> int:
        """Put archived events back in one transaction; see the port."""
        return sql_trash.restore_events(
            self.engine,
            stream_type,
            stream_id,
            events_,
            compacted_through=compacted_through,
            compaction_ids=compaction_ids,
        )

    # -- compaction --------------------------------------------------------------------

    def acquire_fence(self, stream_type: str, stream_id: str) -> StreamInfo | None:
        label = label_of(stream_type, stream_id)
        with writing(self.engine, f"take a fencing token for {label}") as conn:
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

        Writers do not wait for the delete (on PostgreSQL). The stream's row is read
        without a lock at the start, for an early refusal; the checks and the DELETE run
        holding no lock an append needs; the fence is the final conditional UPDATE of
        the stream's row (:meth:`_take_the_cut`), and the row lock it takes is held only
        from there to COMMIT, for a few single-row statements. Why that is as safe as
        locking the row first is written at :meth:`_take_the_cut` and in
        docs/architecture.md. On SQLite the write transaction (``BEGIN IMMEDIATE``)
        holds the database's one write lock throughout: there, writers do wait.

        Raises:
            FencedError: a newer compaction took the token, or moved the compaction point.
            DeletionMismatchError: snapshot missing/different, or the row count differs.
        """
        label = label_of(plan.stream_type, plan.stream_id)
        c = plan.through_version
        with writing(self.engine, f"delete compacted events of {label}") as conn:
            # An early, cheap refusal, without a row lock (a plain SELECT locks nothing):
            # what it finds is checked again, under the lock, by _take_the_cut.
            pk, found = stream_row(conn, plan.stream_type, plan.stream_id)
            stream = check_commit(label, plan, found)
            assert pk is not None  # check_commit found the row
            at_cut = (snapshots.c.stream_pk == pk, snapshots.c.version == c)
            hash_at_cut = sa.select(snapshots.c.state_hash).where(*at_cut)
            stored_hash = conn.execute(hash_at_cut).scalar_one_or_none()
            check_snapshot(label, plan, stored_hash)
            # The consumers lock (shared) is held from here to COMMIT: a registration in
            # flight is waited for, and a later one waits for this transaction. Appends
            # never take it.
            check_consumers(
                label,
                plan,
                lowest_reader(sql_consumers.readers(conn, in_delete=True), plan.stream_type),
                sql_consumers.position_of(conn, pk, c),
            )
            logged = conn.execute(
                sa.select(compaction_log.c.compaction_id).where(
                    compaction_log.c.compaction_id == plan.compaction_id
                )
            ).first()
            # The long statement: row locks on the deleted events only. An append inserts
            # versions above the head (> C) at new positions, so it never meets them.
            deleted = int(
                conn.execute(
                    sa.delete(events).where(events.c.stream_pk == pk, events.c.version <= c)
                ).rowcount
            )
            self._take_the_cut(conn, label, plan, pk)
            # From here to COMMIT the stream's row is locked: short statements only.
            check_deleted(label, plan, deleted)
            check_new_compaction_id(label, plan, logged is not None)
            verified = conn.execute(
                sa.update(snapshots)
                .where(*at_cut, snapshots.c.state_hash == plan.state_hash)
                .values(verified=True)
            ).rowcount
            if verified != 1:  # cannot happen under the fence; refuse rather than trust it
                check_snapshot(label, plan, conn.execute(hash_at_cut).scalar_one_or_none())
                raise DeletionMismatchError(f"{label}: the snapshot at {c} moved; nothing deleted")
            conn.execute(
                sa.delete(snapshots).where(snapshots.c.stream_pk == pk, snapshots.c.version < c)
            )
            conn.execute(
                compaction_log.insert().values(
                    stream_pk=pk,
                    compacted_at=clock_expression(self.engine),
                    **audit_fields(plan, stream, deleted),
                )
            )
        return deleted

    @staticmethod
    def _take_the_cut(conn: sa.Connection, label: str, plan: DeletionPlan, pk: int) -> None:
        """The fence: move the compaction point to the cut only if the token is still
        ours and the point has not moved since the plan; else FencedError, and the whole
        transaction (the DELETE included) rolls back.

        Why this is enough, on PostgreSQL at READ COMMITTED: the UPDATE takes the row's
        lock (FOR NO KEY UPDATE, as every writer of the row does: appends, fences,
        snapshot writes, restores), waiting for a writer that holds it, and then
        evaluates its WHERE against the newest committed version of the row. A fence
        taken by a newer compaction, or a compaction point moved by another delete or a
        restore, at any moment before this UPDATE (while our DELETE ran included), is
        seen here; and none can happen after it, because the lock is held until COMMIT
        and every one of them writes this row. The token only grows, so "still ours"
        means no other compaction took it since ours; snapshots are written only under
        the current token, so the snapshot checked above is the one the row lock now
        protects. An append that committed meanwhile changed the head only: this UPDATE
        writes the compaction point alone, so the head it finds is the one it keeps.
        """
        s = streams.c
        taken = conn.execute(
            sa.update(streams)
            .where(
                s.pk == pk,
                s.fence_token == plan.fence_token,
                s.compacted_through == plan.compacted_through_before,
            )
            .values(compacted_through=plan.through_version)
            .returning(s.pk)
        ).scalar_one_or_none()
        if taken is None:
            _, now = stream_row(conn, plan.stream_type, plan.stream_id)
            check_commit(label, plan, now)  # names what moved
            raise FencedError(f"{label}: the stream's row moved under this compaction")
