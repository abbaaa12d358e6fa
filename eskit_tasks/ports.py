"""The ports the core depends on. Adapters live in :mod:`eskit_tasks.stores`.

A compaction spans both ports: the snapshot store writes and reads back the snapshot,
the event store deletes the events it covers. Both ports of one backend share one
database (``SqlSnapshotStore(store.engine)``), which is what lets the delete check
the snapshot and the fencing token in the same transaction.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from eskit_tasks.domain.events import NewEvent, RecordedEvent
from eskit_tasks.domain.result import HeldBack
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
        archive: The trash bin's entry holding exactly the events to delete (None: not
            archived); recorded in the audit row.
        run_id: The run this compaction belongs to (None: none), for the audit row.
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
    archive: ArchiveRef | None = None
    run_id: str | None = None


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A consumer of the store and how far it has read.

    Args:
        consumer: Its name.
        position: The position of the last event it has processed.
        stream_types: The stream types it reads (None: all of them). Compaction keeps,
            in those streams, every event above ``position``.
        updated_at: When the checkpoint last moved.
    """

    consumer: str
    position: int
    stream_types: tuple[str, ...] | None
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class ArchivedEvent:
    """An event exactly as the store held it, as the archive keeps it: the stored JSON
    text of ``data`` and ``metadata`` (not re-encoded), so a restore puts back the
    very bytes that were deleted.

    Args:
        version: The event's version in its stream.
        type: The event's name.
        data: The stored JSON text of the payload.
        metadata: The stored JSON text of the metadata.
        recorded_at: When the store first committed it (aware, UTC).
        position: Its global position in the store.
    """

    version: int
    type: str
    data: str
    metadata: str
    recorded_at: datetime
    position: int


@dataclass(frozen=True, slots=True)
class ArchiveRef:
    """Where an archive put the events of one compaction.

    Args:
        uri: The entry's address in the archive (a ``file://`` URL for the local one).
        sha256: Hex sha256 of the entry's bytes as written.
        events: How many events the entry holds.
    """

    uri: str
    sha256: str
    events: int


class Archive(Protocol):
    """The trash bin: a durable copy of the events a compaction deletes, written before
    the delete commits, so they can be put back (:func:`eskit_tasks.restore`).

    An implementation must guarantee:

    * ``write`` returns only once the entry is durable (on a local disk: written to a
      temporary name, fsynced, renamed, the directory fsynced) and its checksum
      recorded; a failure raises :class:`~eskit_tasks.errors.ArchiveError`.
    * ``write`` never touches an entry written under another ``(compaction_id,
      fence_token)``: two copies of one compaction (a redelivered task, a retry after a
      crash) hold different fencing tokens, and the entry of the copy that commits must
      survive the stale one's write. Writing the same pair again replaces that entry.
    * ``read`` yields exactly the events written, in version order, after checking the
      checksum; a missing or altered entry raises ``ArchiveError`` before the first event.
    * ``discard`` removes an entry whose delete was refused (it is called only then).
    """

    def write(
        self,
        *,
        compaction_id: str,
        fence_token: int,
        stream_type: str,
        stream_id: str,
        events: Iterable[ArchivedEvent],
    ) -> ArchiveRef:
        """Store ``events`` (oldest first) durably as the entry of this attempt of the
        compaction (its id and the fencing token it holds)."""
        ...

    def read(self, ref: ArchiveRef) -> Iterator[ArchivedEvent]:
        """Yield the entry's events, oldest first, after verifying its checksum."""
        ...

    def discard(self, ref: ArchiveRef) -> None:
        """Remove the entry of a delete that did not commit; missing is not an error."""
        ...


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
    archive_uri: str | None = None
    """Where the trash bin keeps the deleted events (None: not archived)."""
    archive_sha256: str | None = None
    """The archive entry's checksum, as the archive confirmed it before the delete."""
    restored_at: datetime | None = None
    """When :func:`eskit_tasks.restore` put these events back (None: still deleted)."""
    run_id: str | None = None
    """The run that made this compaction (None: a compaction outside any run)."""

    @property
    def archive(self) -> ArchiveRef | None:
        """The archive entry of this deletion, None when it was not archived."""
        if self.archive_uri is None or self.archive_sha256 is None:
            return None
        return ArchiveRef(self.archive_uri, self.archive_sha256, self.events_deleted)


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
    * Every event gets a ``position``, unique in the store and strictly increasing in
      commit order: a reader that has seen position p never later finds a new event
      below p (``read_all``). Only ``restore_events`` puts events back below, at the
      positions they had.
    * ``commit_compaction`` also refuses, inside its transaction, to delete an event
      above the lowest checkpoint of the consumers covering the stream type, read in
      that transaction (:class:`~eskit_tasks.errors.HeldBackError`); a consumer that
      registers meanwhile is either seen there or registers after the delete.
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
        self,
        stream_type: str | None = None,
        stream_id: str | None = None,
        *,
        limit: int = 100,
        run_id: str | None = None,
    ) -> list[CompactionRecord]:
        """Return the newest audit rows first, optionally for one stream or one run."""
        ...

    def find_compaction(self, compaction_id: str) -> CompactionRecord | None:
        """Return the audit row of ``compaction_id``, None if no such deletion committed.

        This settles a delete whose outcome is unknown (the COMMIT's reply was lost, or the
        worker died after it). Ask after a write to the stream (``acquire_fence``): a
        delete still in flight then either has committed already (it held the stream's
        row, and the fence waited for its COMMIT) or can no longer commit (it meets the
        newer token at its own fence and rolls back), so that "not found" is final.
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

    def stream_types_in_use(self, stream_types: Iterable[str]) -> set[str]:
        """Those of ``stream_types`` that have at least one stream here, with live events
        or compacted to none (a mistyped ``--stream-type`` has none). One indexed lookup
        per type, however many streams there are."""
        ...

    # -- the whole store, in commit order ----------------------------------------------

    def read_all(
        self, after_position: int = 0, limit: int | None = None
    ) -> Iterator[RecordedEvent]:
        """Yield live events of every stream with a position above ``after_position``, in
        position order, at most ``limit`` of them; lazily, a page at a time, so memory is
        bounded by the page size. Each event carries ``stream_type`` and ``stream_id``."""
        ...

    def last_position(self) -> int:
        """The highest position handed out so far (0: none)."""
        ...

    # -- consumers ---------------------------------------------------------------------

    def save_checkpoint(
        self, consumer: str, position: int, *, stream_types: Sequence[str] | None = None
    ) -> int:
        """Record that ``consumer`` has processed every event up to ``position``; return
        the stored position. A checkpoint never moves backwards: a lower position is
        ignored (the stored, higher one is returned). ``stream_types`` scopes the
        consumer (None: every type); it is set when the consumer first registers and
        replaced by a later call that gives it.

        Raises:
            ConfigurationError: an empty name, a negative position, a position above
                :meth:`last_position` (nothing was saved), an empty scope.
        """
        ...

    def checkpoints(self) -> dict[str, int]:
        """Every consumer's position."""
        ...

    def consumers(self) -> list[Checkpoint]:
        """Every consumer with its scope, by name."""
        ...

    def remove_checkpoint(self, consumer: str) -> bool:
        """Forget ``consumer`` (its events are no longer kept for it); False if unknown."""
        ...

    def deletable_through(
        self, stream_type: str, stream_id: str, through_version: int
    ) -> tuple[int, HeldBack | None]:
        """The highest version at or below ``through_version`` that every consumer
        covering ``stream_type`` has read, and the consumer with the lowest checkpoint
        when it is below ``through_version`` (None when no consumer holds anything back).
        With nothing deletable the version returned is the compaction point."""
        ...

    def events_after(self, position: int, stream_types: Sequence[str] | None = None) -> int:
        """How many live events (of ``stream_types``, None: all) lie above ``position``:
        a consumer's lag."""
        ...

    # -- the trash bin -----------------------------------------------------------------

    def export(
        self, stream_type: str, stream_id: str, from_version: int, to_version: int
    ) -> Iterator[ArchivedEvent]:
        """Yield the live events ``from_version..to_version`` exactly as stored (JSON text
        untouched), oldest first, with memory bounded by a page: what an archive keeps."""
        ...

    def restore_events(
        self,
        stream_type: str,
        stream_id: str,
        events: Iterable[ArchivedEvent],
        *,
        compacted_through: int,
        compaction_ids: Sequence[str],
    ) -> int:
        """Put archived events back in one transaction: every version ``1..compacted_through``
        exactly once, at its original position; then the compaction point is 0, the
        stream's snapshots are dropped (a full replay starts from version 1), its fencing
        token is bumped (a compaction in flight is stale), and the audit rows of
        ``compaction_ids`` are marked restored. The head version does not change.
        Returns the number of events put back.

        Raises:
            RestoreError: the stream does not exist, its compaction point is not
                ``compacted_through``, the events are not exactly versions
                ``1..compacted_through``, or a version or position is taken. Nothing
                was changed.
        """
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
