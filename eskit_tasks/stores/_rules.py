"""Rules both store families share, so the in-memory store cannot drift from SQL.

Each store finds the facts its own way (a dict lookup, a locked row); what the facts
must be, what is refused with which error, how a stored row becomes an event and what
the audit row says are decided here, once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any, Protocol, TypeVar

import orjson

from eskit_tasks.domain.codec import dumps
from eskit_tasks.domain.events import NewEvent, RecordedEvent, label_of
from eskit_tasks.domain.fold import Evolve, evolve_error, fold_events
from eskit_tasks.domain.result import HeldBack
from eskit_tasks.errors import (
    CompactionError,
    ConcurrencyError,
    ConfigurationError,
    DeletionMismatchError,
    EventDecodeError,
    FencedError,
    HeldBackError,
    RestoreError,
    StoreError,
)
from eskit_tasks.ports import DeletionPlan

#: Versions are 64-bit signed integers in the database.
MAX_VERSION = 2**63
#: Approximate per-row overhead (key, version, type name, timestamp) added to payload sizes.
ROW_OVERHEAD_BYTES = 48

#: A stored event as both stores hand it to :func:`decode_events`:
#: (version, type, data JSON, metadata JSON, raw timestamp, position).
StoredRow = tuple[int, str, str, str, Any, int]
#: A stored row as a read hands it over: metadata may come as None for the empty object
#: ``{}`` (the SQL read asks for it so: no string is made for it).
ReadRow = tuple[int, str, str, str | None, Any, int]

#: The stored size of empty metadata, ``{}``, when a read gives it as None.
EMPTY_METADATA_BYTES = 2


class StreamRow(Protocol):
    """A stream's bookkeeping as a store holds it (a :class:`~eskit_tasks.ports.StreamInfo`,
    the in-memory store's own record)."""

    @property
    def head_version(self) -> int: ...
    @property
    def compacted_through(self) -> int: ...
    @property
    def fence_token(self) -> int: ...


Row = TypeVar("Row", bound=StreamRow)

# -- appending -------------------------------------------------------------------------


def check_aware(moment: datetime) -> None:
    """Reject a naive datetime: eskit-tasks compares instants, never wall-clock readings."""
    if not isinstance(moment, datetime) or moment.utcoffset() is None:
        raise ConfigurationError(f"expected a timezone-aware datetime, got {moment!r}")


def check_expected_version(expected_version: object) -> None:
    """Reject an expected_version that is not an int >= 0, before any I/O."""
    if (
        isinstance(expected_version, bool)
        or not isinstance(expected_version, int)
        or not 0 <= expected_version < MAX_VERSION
    ):
        raise ConfigurationError(
            f"expected_version must be an int from 0 to {MAX_VERSION - 1}, got {expected_version!r}"
        )


def encode_events(label: str, events_: Sequence[NewEvent]) -> list[tuple[str, str, str]]:
    """Encode payloads before any I/O; a non-serialisable payload is a ConfigurationError."""
    rows = []
    for n, ev in enumerate(events_, start=1):
        if not isinstance(ev, NewEvent):
            raise ConfigurationError(f"append to {label}: item {n} is not a NewEvent: {ev!r}")
        try:
            rows.append((ev.type, dumps(ev.data), dumps(ev.metadata)))
        except TypeError as exc:
            raise ConfigurationError(
                f"append to {label}: event {n} ({ev.type}) is not JSON-serialisable: {exc}"
            ) from None
    return rows


def conflict(label: str, expected: int, actual: int) -> ConcurrencyError:
    return ConcurrencyError(
        f"{label}: expected version {expected}, but the head is {actual}; "
        "reload the stream and decide again"
    )


# -- reading ---------------------------------------------------------------------------


def decode_events(
    stream_type: str,
    stream_id: str,
    rows: Iterable[ReadRow],
    to_datetime: Callable[[Any], datetime],
) -> Iterator[RecordedEvent]:
    """Decode stored rows into events, lazily; ``to_datetime`` turns a row's raw
    timestamp into an aware datetime.

    This is the hot loop of every replay: names are bound to locals, and events appended
    together (one timestamp) have it converted once.

    Raises:
        EventDecodeError: a payload is not valid JSON (names stream and version).
    """
    loads, new, overhead = orjson.loads, tuple.__new__, ROW_OVERHEAD_BYTES
    event = RecordedEvent
    last_raw: Any = None
    recorded_at: datetime = datetime.min
    for version, type_, data, meta, raw_ts, position in rows:
        if raw_ts != last_raw:
            last_raw, recorded_at = raw_ts, to_datetime(raw_ts)
        try:
            payload = loads(data)
            meta_obj = {} if meta is None or meta == "{}" else loads(meta)
        except orjson.JSONDecodeError as exc:
            raise _decode_error(stream_type, stream_id, version, exc) from None
        # tuple.__new__: half the cost of the named tuple's own constructor (a Python
        # function); every field is given.
        yield new(
            event,
            (
                version,
                type_,
                payload,
                meta_obj,
                recorded_at,
                len(data) + (EMPTY_METADATA_BYTES if meta is None else len(meta)) + overhead,
                position,
                stream_type,
                stream_id,
            ),
        )


def fold_pages(
    stream_type: str,
    stream_id: str,
    pages: Iterable[Sequence[ReadRow]],
    to_datetime: Callable[[Any], datetime],
    evolve: Evolve,
    state: Any,
    after: int,
) -> tuple[Any, int, int]:
    """Decode and fold stored rows a page at a time: what :func:`decode_events` and
    :func:`~eskit_tasks.domain.fold.fold_events` do together, with the same checks and
    errors, at a fraction of the cost per event.

    The rows of a page come in strictly increasing version order (the primary key), so
    they are contiguous exactly when the first is the next version and the page spans
    as many versions as it holds rows: checked once per page. A page that fails the
    check is folded row by row, which reports the gap where it is.
    """
    loads, new, event, overhead = orjson.loads, tuple.__new__, RecordedEvent, ROW_OVERHEAD_BYTES
    empty = EMPTY_METADATA_BYTES
    version, stored = after, 0
    last_raw: Any = None
    recorded_at: datetime = datetime.min
    for rows in pages:
        if not rows:
            continue
        first = rows[0][0]
        if first != version + 1 or rows[-1][0] - first + 1 != len(rows):
            state, version, more = fold_events(
                evolve,
                state,
                decode_events(stream_type, stream_id, rows, to_datetime),
                after=version,
                stream_type=stream_type,
                stream_id=stream_id,
            )
            stored += more
            continue
        recorded: RecordedEvent | None = None
        try:
            for number, type_, data, meta, raw_ts, position in rows:
                if raw_ts != last_raw:
                    last_raw, recorded_at = raw_ts, to_datetime(raw_ts)
                size = len(data) + (empty if meta is None else len(meta)) + overhead
                recorded = new(
                    event,
                    (
                        number,
                        type_,
                        loads(data),
                        {} if meta is None else loads(meta),
                        recorded_at,
                        size,
                        position,
                        stream_type,
                        stream_id,
                    ),
                )
                state = evolve(state, recorded)
                stored += size
        except Exception as exc:
            if recorded is not None and recorded[0] == number:  # decoded: evolve raised
                raise evolve_error(stream_type, stream_id, recorded, exc) from exc
            if isinstance(exc, orjson.JSONDecodeError):
                raise _decode_error(stream_type, stream_id, number, exc) from None
            raise
        version = rows[-1][0]
    return state, version, stored


def _decode_error(
    stream_type: str, stream_id: str, version: int, exc: Exception
) -> EventDecodeError:
    return EventDecodeError(
        f"{label_of(stream_type, stream_id)} version {version}: stored payload is "
        f"not valid JSON ({exc})",
        stream_type=stream_type,
        stream_id=stream_id,
        version=version,
    )


# -- consumers -------------------------------------------------------------------------


def check_reachable(consumer: str, position: int, last: int) -> None:
    """A consumer cannot have read past the newest position handed out: refuse a
    checkpoint beyond it (a version or a count given instead of a position, most likely),
    which would let compactions delete events the consumer has never seen."""
    if position > last:
        raise ConfigurationError(
            f"consumer {consumer!r}: position {position} is beyond the newest position this "
            f"store has handed out ({last}); a checkpoint is the position of an event the "
            "consumer has processed (RecordedEvent.position from read_all), not a version "
            "or a count. Nothing was saved."
        )


def check_checkpoint(
    consumer: object, position: object, stream_types: Sequence[str] | None
) -> tuple[str, ...] | None:
    """Reject a bad checkpoint before any I/O; return the scope as a sorted tuple."""
    if not isinstance(consumer, str) or not consumer:
        raise ConfigurationError(f"a consumer's name must be a non-empty string, got {consumer!r}")
    if (
        isinstance(position, bool)
        or not isinstance(position, int)
        or not 0 <= position < MAX_VERSION
    ):
        raise ConfigurationError(
            f"consumer {consumer!r}: position must be an int from 0 to {MAX_VERSION - 1}, "
            f"got {position!r}"
        )
    if stream_types is None:
        return None
    if isinstance(stream_types, str) or not all(isinstance(t, str) for t in stream_types):
        raise ConfigurationError(
            f"consumer {consumer!r}: stream_types must be a list of stream type names, "
            f"got {stream_types!r}"
        )
    if not stream_types:
        raise ConfigurationError(
            f"consumer {consumer!r}: stream_types is empty; give None to cover every type"
        )
    return tuple(sorted(set(stream_types)))


def check_position(what: str, value: object) -> None:
    """Reject a position (or count) that is not an int >= 0, before any I/O."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < MAX_VERSION:
        raise ConfigurationError(
            f"{what} must be an int from 0 to {MAX_VERSION - 1}, got {value!r}"
        )


#: A consumer as the gate sees it: (name, position, scope or None for every type).
Reader = tuple[str, int, "tuple[str, ...] | None"]


def lowest_reader(readers: Iterable[Reader], stream_type: str) -> HeldBack | None:
    """The consumer with the lowest checkpoint among those that read ``stream_type``
    (ties: the first name), None when no consumer reads it."""
    found: HeldBack | None = None
    for name, position, scope in sorted(readers):
        if scope is not None and stream_type not in scope:
            continue
        if found is None or position < found.position:
            found = HeldBack(consumer=name, position=position)
    return found


def gated_cut(
    through_version: int,
    compacted_through: int,
    reader: HeldBack | None,
    newest_read: int | None,
) -> tuple[int, HeldBack | None]:
    """The cut the consumers allow: ``through_version`` when no consumer reads the
    stream or ``newest_read`` (the highest live version at or below it whose position
    the reader has passed) is it; else that version (the compaction point when none)."""
    if reader is None or newest_read == through_version:
        return through_version, None
    return (compacted_through if newest_read is None else newest_read), reader


def check_consumers(
    label: str, plan: DeletionPlan, reader: HeldBack | None, cut_position: int | None
) -> None:
    """Inside the delete transaction: the newest event to delete must be at or below
    the lowest checkpoint of the consumers reading the stream, as they are now."""
    if reader is None:
        return
    if cut_position is None or cut_position > reader.position:
        raise HeldBackError(
            f"{label}: consumer {reader.consumer!r} is at position {reader.position}, below "
            f"version {plan.through_version} (position {cut_position}); its checkpoint "
            "moved back or it registered during this compaction: nothing deleted",
            consumer=reader.consumer,
            position=reader.position,
        )


def check_restore_target(label: str, stream: Row | None, compacted_through: int) -> Row:
    """A restore goes to an existing stream still compacted through where the archives
    end (a compaction since would have deleted events the archives do not hold)."""
    if stream is None:
        raise RestoreError(f"restore {label}: the stream does not exist; nothing changed")
    if stream.compacted_through != compacted_through:
        raise RestoreError(
            f"restore {label}: the stream is compacted through {stream.compacted_through}, "
            f"the archives cover 1..{compacted_through}; nothing changed (run restore again)"
        )
    return stream


def check_restored(label: str, compacted_through: int, restored: int, last_version: int) -> None:
    """A restore puts back exactly versions 1..compacted_through."""
    if restored != compacted_through or last_version != compacted_through:
        raise RestoreError(
            f"restore {label}: the archives hold {restored} events ending at version "
            f"{last_version}, expected versions 1..{compacted_through}; nothing changed"
        )


# -- snapshots -------------------------------------------------------------------------


def check_snapshot_save(
    label: str, stream: Row | None, snapshot_version: int, fence_token: int
) -> Row:
    """A snapshot is written only to an existing stream, under its current fencing
    token, and above its compaction point.

    Returns:
        ``stream``, known to exist.
    """
    if stream is None:
        raise CompactionError(f"{label}: cannot snapshot a stream that does not exist")
    if stream.fence_token != fence_token:
        raise FencedError(
            f"{label}: fencing token {fence_token} is stale (current {stream.fence_token}); "
            "a newer compaction owns the stream, snapshot not written"
        )
    if snapshot_version <= stream.compacted_through:
        raise FencedError(
            f"{label}: already compacted through {stream.compacted_through}; a snapshot at "
            f"{snapshot_version} would not be newer, not written"
        )
    return stream


# -- the delete transaction ------------------------------------------------------------


def check_commit(label: str, plan: DeletionPlan, stream: Row | None) -> Row:
    """The checks on the stream's row before anything is deleted: it exists, the plan's
    token is current, its compaction point has not moved, the cut is not beyond the head.

    Returns:
        ``stream``, known to exist.
    """
    if stream is None:
        raise DeletionMismatchError(f"{label}: the stream no longer exists")
    if stream.fence_token != plan.fence_token:
        raise FencedError(
            f"{label}: fencing token {plan.fence_token} is stale (current "
            f"{stream.fence_token}); a newer compaction owns the stream, nothing deleted"
        )
    if stream.compacted_through != plan.compacted_through_before:
        raise FencedError(
            f"{label}: compacted through {stream.compacted_through} since this compaction "
            f"planned from {plan.compacted_through_before}; nothing deleted"
        )
    if plan.through_version > stream.head_version:
        raise DeletionMismatchError(
            f"{label}: cannot compact through {plan.through_version}, head is {stream.head_version}"
        )
    return stream


def check_snapshot(label: str, plan: DeletionPlan, stored_hash: str | None) -> None:
    """The snapshot at the cut must be stored, with the hash the compaction verified."""
    if stored_hash != plan.state_hash:
        raise DeletionMismatchError(
            f"{label}: the snapshot at version {plan.through_version} is "
            f"{'missing' if stored_hash is None else 'different from the verified one'}; "
            "nothing deleted"
        )


def check_deleted(label: str, plan: DeletionPlan, deleted: int) -> None:
    """Exactly the planned rows go (the transaction is rolled back otherwise), and the
    archive, when there is one, holds exactly as many."""
    if plan.archive is not None and plan.archive.events != deleted:
        raise DeletionMismatchError(
            f"{label}: the archive entry {plan.archive.uri} holds {plan.archive.events} "
            f"events, the delete would remove {deleted}; rolled back, nothing deleted"
        )
    if deleted != plan.expected_deleted:
        raise DeletionMismatchError(
            f"{label}: deleting versions up to {plan.through_version} would remove {deleted} "
            f"events, the plan says {plan.expected_deleted}; rolled back, nothing deleted"
        )


def check_new_compaction_id(label: str, plan: DeletionPlan, already_logged: bool) -> None:
    """A compaction id names one deletion: one already in the audit log is refused (the
    SQL log's unique key stays as the backstop for two such deletes at once)."""
    if already_logged:
        raise StoreError(
            f"delete compacted events of {label} failed: compaction id "
            f"{plan.compaction_id!r} is already in the audit log; give each compaction "
            "its own id"
        )


def audit_fields(plan: DeletionPlan, stream: StreamRow, deleted: int) -> dict[str, Any]:
    """The audit row of a committed deletion, but for its ``compacted_at`` (each store
    stamps that with its own clock): a :class:`~eskit_tasks.ports.CompactionRecord`'s
    fields, named as the ``eskit_compaction_log`` columns."""
    return {
        "compaction_id": plan.compaction_id,
        "stream_type": plan.stream_type,
        "stream_id": plan.stream_id,
        "from_version": stream.compacted_through + 1,
        "through_version": plan.through_version,
        "snapshot_version": plan.through_version,
        "head_version": plan.head_version,
        "state_hash": plan.state_hash,
        "events_deleted": deleted,
        "bytes_reclaimed": plan.bytes_reclaimed,
        "fence_token": plan.fence_token,
        "archive_uri": None if plan.archive is None else plan.archive.uri,
        "archive_sha256": None if plan.archive is None else plan.archive.sha256,
        "run_id": plan.run_id,
    }
