"""In-memory event and snapshot stores: the ports without I/O, for tests and demos.

They keep the SQL stores' semantics exactly — payloads are stored as JSON text and
decoded on every read, the head survives compaction, fencing and verification flags
work the same — so the core's tests run against them unchanged.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from eskit_tasks.domain.events import NewEvent, RecordedEvent, label_of
from eskit_tasks.domain.result import HeldBack
from eskit_tasks.errors import RestoreError
from eskit_tasks.ports import (
    ArchivedEvent,
    Candidate,
    Checkpoint,
    CompactionRecord,
    DeletionPlan,
    Snapshot,
    StoredSnapshot,
    StreamInfo,
)
from eskit_tasks.stores._rules import (
    Reader,
    StoredRow,
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
    check_restore_target,
    check_restored,
    check_snapshot,
    check_snapshot_save,
    conflict,
    decode_events,
    encode_events,
    gated_cut,
    lowest_reader,
)

Key = tuple[str, str]


@dataclass
class _Record:
    type: str
    data: str
    metadata: str
    recorded_at: datetime
    position: int


@dataclass
class _Stream:
    key: int
    head_version: int
    compacted_through: int = 0
    fence_token: int = 0
    events: dict[int, _Record] = field(default_factory=dict)
    snapshots: dict[int, tuple[Snapshot, int]] = field(default_factory=dict)

    def info(self) -> StreamInfo:
        return StreamInfo(self.head_version, self.compacted_through, self.fence_token)


class InMemoryDatabase:
    """What an in-memory event store and snapshot store share (like one SQL database)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.streams: dict[Key, _Stream] = {}
        self.log: list[CompactionRecord] = []
        # The audit rows by compaction id (the SQL table's unique index).
        self.log_by_id: dict[str, CompactionRecord] = {}
        self.next_key = 0
        # The last position handed out, and where each live event is by position.
        self.last_position = 0
        self.by_position: dict[int, tuple[Key, int]] = {}
        self.checkpoints: dict[str, Checkpoint] = {}

    def readers(self) -> list[Reader]:
        return [(c.consumer, c.position, c.stream_types) for c in self.checkpoints.values()]


class InMemoryEventStore:
    """Event store in process memory; see :class:`eskit_tasks.ports.EventStore`.

    Args:
        engine: The database to use; a new one by default. Pass ``store.engine`` to
            :class:`InMemorySnapshotStore`, as with the SQL stores.
    """

    def __init__(self, engine: InMemoryDatabase | None = None) -> None:
        self.engine = engine or InMemoryDatabase()

    def append(
        self,
        stream_type: str,
        stream_id: str,
        events_: Sequence[NewEvent],
        *,
        expected_version: int,
    ) -> int:
        check_expected_version(expected_version)
        label = label_of(stream_type, stream_id)
        rows = encode_events(label, events_)
        now = datetime.now(UTC)
        db = self.engine
        with db.lock:
            stream = db.streams.get((stream_type, stream_id))
            actual = 0 if stream is None else stream.head_version
            if actual != expected_version:
                raise conflict(label, expected_version, actual)
            if not rows:
                return actual
            if stream is None:
                db.next_key += 1
                stream = db.streams[(stream_type, stream_id)] = _Stream(db.next_key, 0)
            for i, (t, d, m) in enumerate(rows, start=expected_version + 1):
                db.last_position += 1
                stream.events[i] = _Record(t, d, m, now, db.last_position)
                db.by_position[db.last_position] = ((stream_type, stream_id), i)
            stream.head_version = expected_version + len(rows)
            return stream.head_version

    def head_version(self, stream_type: str, stream_id: str) -> int:
        info = self.stream_info(stream_type, stream_id)
        return 0 if info is None else info.head_version

    def stream_info(self, stream_type: str, stream_id: str) -> StreamInfo | None:
        with self.engine.lock:
            s = self.engine.streams.get((stream_type, stream_id))
            return None if s is None else s.info()

    def read(
        self,
        stream_type: str,
        stream_id: str,
        *,
        from_version: int = 1,
        to_version: int | None = None,
    ) -> Iterator[RecordedEvent]:
        with self.engine.lock:
            s = self.engine.streams.get((stream_type, stream_id))
            view = _sorted_range(s, from_version, to_version)
        return decode_events(stream_type, stream_id, view, _as_is)

    def oldest_version_after(
        self, stream_type: str, stream_id: str, cutoff: datetime
    ) -> int | None:
        check_aware(cutoff)
        with self.engine.lock:
            s = self.engine.streams.get((stream_type, stream_id))
            if s is None:
                return None
            young = [v for v, r in s.events.items() if r.recorded_at > cutoff]
            return min(young) if young else None

    def now(self) -> datetime:
        return datetime.now(UTC)

    def acquire_fence(self, stream_type: str, stream_id: str) -> StreamInfo | None:
        with self.engine.lock:
            s = self.engine.streams.get((stream_type, stream_id))
            if s is None:
                return None
            s.fence_token += 1
            return s.info()

    def commit_compaction(self, plan: DeletionPlan) -> int:
        label = label_of(plan.stream_type, plan.stream_id)
        c = plan.through_version
        db = self.engine
        with db.lock:
            s = check_commit(label, plan, db.streams.get((plan.stream_type, plan.stream_id)))
            snap = s.snapshots.get(c)
            check_snapshot(label, plan, None if snap is None else snap[0].state_hash)
            doomed = [v for v in s.events if v <= c]
            check_deleted(label, plan, len(doomed))
            at_cut = s.events.get(c)
            check_consumers(
                label,
                plan,
                lowest_reader(db.readers(), plan.stream_type),
                None if at_cut is None else at_cut.position,
            )
            check_new_compaction_id(label, plan, plan.compaction_id in db.log_by_id)
            for v in doomed:
                del db.by_position[s.events.pop(v).position]
            kept, token = s.snapshots[c]
            s.snapshots = {c: (replace(kept, verified=True), token)}
            record = CompactionRecord(
                **audit_fields(plan, s, len(doomed)), compacted_at=datetime.now(UTC)
            )
            db.log.append(record)
            db.log_by_id[record.compaction_id] = record
            s.compacted_through = c
            return len(doomed)

    def find_compaction(self, compaction_id: str) -> CompactionRecord | None:
        with self.engine.lock:
            return self.engine.log_by_id.get(compaction_id)

    def candidates(
        self,
        *,
        after: int = 0,
        limit: int = 500,
        min_live_events: int = 1,
        stream_types: Sequence[str] | None = None,
        until: int | None = None,
    ) -> list[Candidate]:
        types = None if stream_types is None else set(stream_types)
        with self.engine.lock:
            readers = self.engine.readers()
            found = [
                Candidate(s.key, t, i, s.head_version - s.compacted_through)
                for (t, i), s in self.engine.streams.items()
                if s.key > after
                and (until is None or s.key <= until)
                and s.head_version - s.compacted_through >= min_live_events
                and (types is None or t in types)
                and _first_is_read(s, lowest_reader(readers, t))
            ]
        return sorted(found, key=lambda c: c.key)[:limit]

    def max_stream_key(self) -> int:
        with self.engine.lock:
            return self.engine.next_key

    def stream_types_in_use(self, stream_types: Iterable[str]) -> set[str]:
        wanted = set(stream_types)
        with self.engine.lock:
            return {t for t, _ in self.engine.streams if t in wanted}

    def compaction_log(
        self,
        stream_type: str | None = None,
        stream_id: str | None = None,
        *,
        limit: int = 100,
        run_id: str | None = None,
    ) -> list[CompactionRecord]:
        with self.engine.lock:
            rows = [
                r
                for r in reversed(self.engine.log)
                if (stream_type is None or r.stream_type == stream_type)
                and (stream_id is None or r.stream_id == stream_id)
                and (run_id is None or r.run_id == run_id)
            ]
        return list(itertools.islice(rows, limit))

    # -- the whole store, in commit order ----------------------------------------------

    def read_all(
        self, after_position: int = 0, limit: int | None = None, *, page_size: int = 1000
    ) -> Iterator[RecordedEvent]:
        check_position("after_position", after_position)
        if limit is not None:
            check_position("limit", limit)
        return self._read_all(after_position, limit, page_size)

    def _read_all(
        self, after_position: int, limit: int | None, page_size: int
    ) -> Iterator[RecordedEvent]:
        left = limit
        while left is None or left > 0:
            take = page_size if left is None else min(page_size, left)
            with self.engine.lock:
                db = self.engine
                page = sorted(p for p in db.by_position if p > after_position)[:take]
                rows = []
                for p in page:
                    key, version = db.by_position[p]
                    r = db.streams[key].events[version]
                    rows.append((key, (version, r.type, r.data, r.metadata, r.recorded_at, p)))
            for (t, i), row in rows:
                yield from decode_events(t, i, [row], _as_is)
            if len(page) < take:
                return
            after_position = page[-1]
            if left is not None:
                left -= len(page)

    def last_position(self) -> int:
        with self.engine.lock:
            return self.engine.last_position

    # -- consumers ---------------------------------------------------------------------

    def save_checkpoint(
        self, consumer: str, position: int, *, stream_types: Sequence[str] | None = None
    ) -> int:
        scope = check_checkpoint(consumer, position, stream_types)
        with self.engine.lock:
            check_reachable(consumer, position, self.engine.last_position)
            known = self.engine.checkpoints.get(consumer)
            if known is not None:
                position = max(position, known.position)
                scope = known.stream_types if stream_types is None else scope
            self.engine.checkpoints[consumer] = Checkpoint(
                consumer, position, scope, datetime.now(UTC)
            )
            return position

    def checkpoints(self) -> dict[str, int]:
        with self.engine.lock:
            return {c.consumer: c.position for c in self.consumers()}

    def consumers(self) -> list[Checkpoint]:
        with self.engine.lock:
            return sorted(self.engine.checkpoints.values(), key=lambda c: c.consumer)

    def remove_checkpoint(self, consumer: str) -> bool:
        with self.engine.lock:
            return self.engine.checkpoints.pop(consumer, None) is not None

    def deletable_through(
        self, stream_type: str, stream_id: str, through_version: int
    ) -> tuple[int, HeldBack | None]:
        with self.engine.lock:
            s = self.engine.streams.get((stream_type, stream_id))
            reader = lowest_reader(self.engine.readers(), stream_type)
            if s is None:
                return through_version, None
            newest_read = None
            if reader is not None:
                read = [
                    v
                    for v, r in s.events.items()
                    if v <= through_version and r.position <= reader.position
                ]
                newest_read = max(read, default=None)
            return gated_cut(through_version, s.compacted_through, reader, newest_read)

    def events_after(self, position: int, stream_types: Sequence[str] | None = None) -> int:
        with self.engine.lock:
            return sum(
                1
                for p, ((t, _), _) in self.engine.by_position.items()
                if p > position and (stream_types is None or t in stream_types)
            )

    # -- the trash bin -----------------------------------------------------------------

    def export(
        self, stream_type: str, stream_id: str, from_version: int, to_version: int
    ) -> Iterator[ArchivedEvent]:
        with self.engine.lock:
            s = self.engine.streams.get((stream_type, stream_id))
            view = _sorted_range(s, from_version, to_version)
        for version, type_, data, meta, recorded_at, position in view:
            yield ArchivedEvent(version, type_, data, meta, recorded_at, position)

    def restore_events(
        self,
        stream_type: str,
        stream_id: str,
        events: Iterable[ArchivedEvent],
        *,
        compacted_through: int,
        compaction_ids: Sequence[str],
    ) -> int:
        label = label_of(stream_type, stream_id)
        db = self.engine
        with db.lock:
            s = check_restore_target(
                label, db.streams.get((stream_type, stream_id)), compacted_through
            )
            staged: dict[int, _Record] = {}
            last = 0
            for e in events:
                if e.version != last + 1 or e.version in s.events or e.position in db.by_position:
                    raise RestoreError(
                        f"restore {label}: version {e.version} (position {e.position}) "
                        f"{'is not the next version' if e.version != last + 1 else 'is taken'}"
                        "; nothing changed"
                    )
                staged[e.version] = _Record(e.type, e.data, e.metadata, e.recorded_at, e.position)
                last = e.version
            check_restored(label, compacted_through, len(staged), last)
            for v, r in staged.items():
                s.events[v] = r
                db.by_position[r.position] = ((stream_type, stream_id), v)
            s.compacted_through = 0
            s.fence_token += 1
            s.snapshots = {}
            now = datetime.now(UTC)
            for cid in compaction_ids:
                done = replace(db.log_by_id[cid], restored_at=now)
                db.log_by_id[cid] = done
                db.log = [done if r.compaction_id == cid else r for r in db.log]
            return len(staged)


class InMemorySnapshotStore:
    """Snapshot store in process memory; see :class:`eskit_tasks.ports.SnapshotStore`."""

    def __init__(self, engine: InMemoryDatabase) -> None:
        self.engine = engine

    def save(
        self, stream_type: str, stream_id: str, snapshot: Snapshot, *, fence_token: int
    ) -> None:
        label = label_of(stream_type, stream_id)
        with self.engine.lock:
            s = check_snapshot_save(
                label,
                self.engine.streams.get((stream_type, stream_id)),
                snapshot.version,
                fence_token,
            )
            s.snapshots[snapshot.version] = (replace(snapshot, verified=False), fence_token)

    def read(self, stream_type: str, stream_id: str, version: int) -> Snapshot | None:
        with self.engine.lock:
            s = self.engine.streams.get((stream_type, stream_id))
            hit = None if s is None else s.snapshots.get(version)
            return None if hit is None else hit[0]

    def latest(self, stream_type: str, stream_id: str) -> Snapshot | None:
        with self.engine.lock:
            s = self.engine.streams.get((stream_type, stream_id))
            if s is None:
                return None
            verified = [snap for snap, _ in s.snapshots.values() if snap.verified]
            return max(verified, key=lambda snap: snap.version) if verified else None

    def discard(self, stream_type: str, stream_id: str, version: int, *, fence_token: int) -> None:
        with self.engine.lock:
            s = self.engine.streams.get((stream_type, stream_id))
            if s is None or s.fence_token != fence_token:
                return
            hit = s.snapshots.get(version)
            if hit is not None and not hit[0].verified:
                del s.snapshots[version]

    def verified_snapshots(
        self, *, after: int = 0, limit: int = 500, stream_types: Sequence[str] | None = None
    ) -> list[StoredSnapshot]:
        types = None if stream_types is None else set(stream_types)
        with self.engine.lock:
            found = []
            for (t, i), s in self.engine.streams.items():
                if s.key > after and s.compacted_through > 0 and (types is None or t in types):
                    hit = s.snapshots.get(s.compacted_through)
                    snap = hit[0] if hit is not None and hit[0].verified else None
                    found.append(StoredSnapshot(s.key, t, i, s.compacted_through, snap))
        return sorted(found, key=lambda f: f.key)[:limit]


def _sorted_range(s: _Stream | None, lo: int, hi: int | None) -> list[StoredRow]:
    """The stored rows ``lo..hi``, copied out in version order (read under the lock)."""
    if s is None:
        return []
    return sorted(
        (v, r.type, r.data, r.metadata, r.recorded_at, r.position)
        for v, r in s.events.items()
        if v >= lo and (hi is None or v <= hi)
    )


def _first_is_read(s: _Stream, reader: HeldBack | None) -> bool:
    """True when the stream's oldest live event is one every consumer has read (or no
    consumer reads the stream): there is something a compaction may delete. True as well
    when that event is missing (a damaged stream): its compaction reports the gap."""
    if reader is None:
        return True
    first = s.events.get(s.compacted_through + 1)
    return first is None or first.position <= reader.position


def _as_is(moment: datetime) -> datetime:
    """The in-memory store keeps ``recorded_at`` as the aware datetime it stamped."""
    return moment
