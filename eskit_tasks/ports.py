"""The ports the core depends on. Adapters live in :mod:`eskit_tasks.stores`.

A compaction spans both ports: the snapshot store writes and reads back the snapshot,
the event store deletes the events it covers. Both ports of one backend share one
database (``SqlSnapshotStore(store.engine)``), which is what lets the delete check
the snapshot and the fencing token in the same transaction.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from eskit_tasks.domain.events import NewEvent, RecordedEvent
from eskit_tasks.domain.schema import UNRECORDED, SchemaMarker


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """A stream's bookkeeping row.

    Args:
        head_version: Version of the newest event ever appended; never decreases.
        compacted_through: Events at or below this version have been deleted (0: never).
        fence_token: Monotonic counter; bumped by every compaction that starts.
    """

    head_version: int
    compacted_through: int
    fence_token: int


@dataclass(frozen=True, slots=True)
class Candidate:
    """A stream a fan-out may compact.

    Args:
        key: The stream's position in the candidate order (its surrogate key); pass the
            last one seen as ``after`` to get the next page.
        stream_type: The stream's type.
        stream_id: The stream's id.
        live_events: Events appended since the last compaction (head - compaction point).
    """

    key: int
    stream_type: str
    stream_id: str
    live_events: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A stored state at a version.

    Args:
        version: The stream version the state includes.
        state: Canonical JSON bytes of the state.
        state_hash: sha256 of ``state``.
        verified: True once a compaction proved it and deleted the events it covers.
            Readers only ever use verified snapshots.
        created_at: When it was written.
        fingerprint: The state schema's fingerprint when it was written
            (:func:`~eskit_tasks.domain.schema.schema_fingerprint`).
        state_version: The ``state_version`` the decider declared then (None: none).
    """

    version: int
    state: bytes
    state_hash: str
    verified: bool
    created_at: datetime
    fingerprint: str = UNRECORDED
    state_version: int | None = None

    @property
    def marker(self) -> SchemaMarker:
        """Which state schema wrote this snapshot."""
        return SchemaMarker(self.fingerprint, self.state_version)


@dataclass(frozen=True, slots=True)
class StoredSnapshot:
    """A compacted stream's verified snapshot, as :meth:`SnapshotStore.verified_snapshots`
    pages them.

    Args:
        key: The stream's key (pass the last one as ``after`` for the next page).
        stream_type: The stream's type.
        stream_id: The stream's id.
        compacted_through: The stream's compaction point, where the snapshot must be.
        snapshot: The snapshot; None when it is missing (the row was removed by hand):
            the stream can no longer be loaded.
    """

    key: int
    stream_type: str
    stream_id: str
    compacted_through: int
    snapshot: Snapshot | None


@dataclass(frozen=True, slots=True)
class DeletionPlan:
    """Everything the delete transaction checks before it commits.

    Args:
        stream_type: The stream's type.
        stream_id: The stream's id.
        fence_token: The token this compaction took; the delete fails if it is no longer current.
        compacted_through_before: The compaction point the plan was made from.
        through_version: C; events 1..C are gone after commit.
        head_version: The head when the plan was made (for the audit row).
        expected_deleted: Live events at or below C; the delete must remove exactly these.
        state_hash: Hash of the verified snapshot at C, which must be stored.
        bytes_reclaimed: Approximate stored size of the deleted events (for the audit row).
        compaction_id: Unique id of this compaction.
    """

    stream_type: str
    stream_id: str
    fence_token: int
    compacted_through_before: int
    through_version: int
    head_version: int
    expected_deleted: int
    state_hash: str
    bytes_reclaimed: int
    compaction_id: str


@dataclass(frozen=True, slots=True)
class CompactionRecord:
    """One row of the compaction audit log: a deletion that committed."""

    compaction_id: str
    stream_type: str
    stream_id: str
    from_version: int
    through_version: int
    snapshot_version: int
    head_version: int
    state_hash: str
    events_deleted: int
    bytes_reclaimed: int
    fence_token: int
    compacted_at: datetime


class EventStore(Protocol):
    """Append-only streams with optimistic concurrency and fenced compaction.

    An implementation must guarantee:

    * ``append`` is atomic and checks ``expected_version`` against the head version,
      which is stored apart from the events: it survives the deletion of every event,
      so a compacted stream still rejects ``expected_version=0`` and stale versions.
    * ``read`` streams events in version order with memory bounded by a page size, and
      the events of one call come from one consistent view of the database.
    * ``acquire_fence`` increments the stream's token atomically; tokens never repeat.
    * ``commit_compaction`` is one transaction that commits all of it or nothing: token
      still current, compaction point unchanged, the verified snapshot present with the
      planned hash, exactly the planned rows deleted (of this stream only), the snapshot
      marked verified, older snapshots dropped, an audit row, the new compaction point.
    * Ids are data: any string is a valid stream type or id (PostgreSQL adds one limit:
      type and id together must fit its unique index, 2,600 bytes or more; a longer
      pair is refused with ConfigurationError and nothing is written).
    """

    def append(
        self,
        stream_type: str,
        stream_id: str,
        events: Sequence[NewEvent],
        *,
        expected_version: int,
    ) -> int:
        """Append ``events`` after ``expected_version`` (0: a new stream); return the new head."""
        ...

    def head_version(self, stream_type: str, stream_id: str) -> int:
        """Return the head version, 0 for a stream that does not exist."""
        ...

    def read(
        self,
        stream_type: str,
        stream_id: str,
        *,
        from_version: int = 1,
        to_version: int | None = None,
    ) -> Iterator[RecordedEvent]:
        """Yield the live events with ``from_version <= version <= to_version``, oldest first."""
        ...

    def stream_info(self, stream_type: str, stream_id: str) -> StreamInfo | None:
        """Return the stream's bookkeeping, None if it does not exist."""
        ...

    def oldest_version_after(
        self, stream_type: str, stream_id: str, cutoff: datetime
    ) -> int | None:
        """Return the oldest live version recorded after ``cutoff``, None if there is none.

        The age rule keeps this version and everything after it. Asking for the first
        *young* event, not the last old one, keeps the cut safe when timestamps are not
        monotonic (clock skew): an old-looking event after a young one is kept too.

        Raises:
            ConfigurationError: ``cutoff`` is naive.
        """
        ...

    def now(self) -> datetime:
        """The current time on the clock that stamps ``recorded_at`` (the database's)."""
        ...

    def acquire_fence(self, stream_type: str, stream_id: str) -> StreamInfo | None:
        """Take a new fencing token; return the bookkeeping with it (None: no such stream)."""
        ...

    def commit_compaction(self, plan: DeletionPlan) -> int:
        """Delete what ``plan`` covers in one transaction; return the rows deleted.

        Raises:
            FencedError: the token is no longer current or the compaction point moved.
            DeletionMismatchError: the snapshot is missing or differs, or the row count
                differs from the plan. Nothing was changed.
        """
        ...

    def compaction_log(
        self, stream_type: str | None = None, stream_id: str | None = None, *, limit: int = 100
    ) -> list[CompactionRecord]:
        """Return the newest audit rows first, optionally for one stream."""
        ...

    def find_compaction(self, compaction_id: str) -> CompactionRecord | None:
        """Return the audit row of ``compaction_id``, None if no such deletion committed.

        This settles a delete whose outcome is unknown (the COMMIT's reply was lost, or the
        worker died after it). Ask after a write to the stream (``acquire_fence``), which
        waits for a delete still in flight, so that "not found" is final.
        """
        ...

    def candidates(
        self,
        *,
        after: int = 0,
        limit: int = 500,
        min_live_events: int = 1,
        stream_types: Sequence[str] | None = None,
        until: int | None = None,
    ) -> list[Candidate]:
        """Return up to ``limit`` streams with at least ``min_live_events`` live events,
        in key order with ``after < key <= until`` (a keyset page: no OFFSET; ``until``
        bounds how many keys one page examines when few streams qualify)."""
        ...

    def max_stream_key(self) -> int:
        """The largest stream key (0 when there are no streams): where paging ends."""
        ...


class SnapshotStore(Protocol):
    """Snapshots of stream states, written by compactions and read by ``load_state``.

    An implementation must guarantee:

    * ``save`` writes an *unverified* snapshot only while ``fence_token`` is the
      stream's current token, and never replaces a verified snapshot nor writes
      below one (:class:`~eskit_tasks.errors.FencedError` otherwise).
    * ``latest`` returns only verified snapshots: an unproven state is never read.
    * ``read`` returns exactly the bytes that were stored (for read-back verification).
    """

    def save(
        self, stream_type: str, stream_id: str, snapshot: Snapshot, *, fence_token: int
    ) -> None:
        """Store ``snapshot`` as unverified under the fencing token."""
        ...

    def read(self, stream_type: str, stream_id: str, version: int) -> Snapshot | None:
        """Return the snapshot at ``version``, verified or not."""
        ...

    def latest(self, stream_type: str, stream_id: str) -> Snapshot | None:
        """Return the newest verified snapshot, None if there is none."""
        ...

    def discard(self, stream_type: str, stream_id: str, version: int, *, fence_token: int) -> None:
        """Remove the unverified snapshot at ``version`` (after a failed verification)."""
        ...

    def verified_snapshots(
        self, *, after: int = 0, limit: int = 500, stream_types: Sequence[str] | None = None
    ) -> list[StoredSnapshot]:
        """Each compacted stream's verified snapshot (None where it is missing), in stream
        key order after ``after`` (a keyset page of at most ``limit``), for checks over
        the whole store."""
        ...
