"""Rebuilding a stream's state: the newest verified snapshot plus the events after it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from eskit_tasks.domain.codec import StateCodec, state_hash
from eskit_tasks.domain.decider import Decider
from eskit_tasks.domain.events import RecordedEvent, label_of
from eskit_tasks.domain.fold import FoldsItself, fold_events
from eskit_tasks.domain.schema import Upcaster
from eskit_tasks.errors import EskitError, SnapshotIntegrityError, VersionGapError
from eskit_tasks.ports import EventStore, Snapshot, SnapshotStore

S = TypeVar("S")

#: How often load_state starts over when a compaction removed the events it needed.
LOAD_RETRIES = 5


class _Retry(Exception):
    """The snapshot read was outdated by a compaction that committed meanwhile."""


def fold(
    decider: Decider[S],
    state: S,
    events: Iterable[RecordedEvent],
    *,
    after: int,
    stream_type: str,
    stream_id: str,
) -> tuple[S, int]:
    """Fold ``events`` into ``state``, which includes versions up to ``after``.

    Versions must continue at ``after + 1`` without a gap; the fold streams, holding one
    event at a time.

    Returns:
        The new state and the last version folded (``after`` when there are no events).

    Raises:
        VersionGapError: an event is not the next version.
        EvolveError: ``decider.evolve`` raised.
    """
    state, version, _ = fold_measured(
        decider, state, events, after=after, stream_type=stream_type, stream_id=stream_id
    )
    return state, version


def fold_measured(
    decider: Decider[S],
    state: S,
    events: Iterable[RecordedEvent],
    *,
    after: int,
    stream_type: str,
    stream_id: str,
) -> tuple[S, int, int]:
    """:func:`fold`, also returning the summed ``stored_bytes`` of the events folded.

    A store's read that folds itself (:class:`~eskit_tasks.domain.fold.FoldsItself`, the
    SQL store's) runs the fold a page at a time; anything else is folded event by event.
    """
    if isinstance(events, FoldsItself):
        folded: tuple[S, int, int] = events.fold(decider.evolve, state, after)
        return folded
    return fold_events(
        decider.evolve, state, events, after=after, stream_type=stream_type, stream_id=stream_id
    )


def codec_for(
    decider: Any,
    state_type: Any,
    state_version: int | None = None,
    upcasters: Mapping[int | str, Upcaster] | None = None,
) -> StateCodec[Any]:
    """The codec of a decider's states: ``state_version`` and ``upcasters`` as given,
    else as the decider declares them (attributes of the same names)."""
    return StateCodec(
        state_type,
        version=getattr(decider, "state_version", None) if state_version is None else state_version,
        upcasters=getattr(decider, "upcasters", None) if upcasters is None else upcasters,
    )


def open_snapshot(codec: StateCodec[S], snap: Snapshot, stream_type: str, stream_id: str) -> S:
    """The state a stored snapshot holds, after checking its hash and its schema.

    Raises:
        SnapshotIntegrityError: its bytes do not match its stored hash.
        SnapshotSchemaError: it was written for another schema and no upcaster leads to
            the current one, or it does not decode exactly.
    """
    if state_hash(snap.state) != snap.state_hash:
        raise SnapshotIntegrityError(
            f"{label_of(stream_type, stream_id)}: the snapshot at version {snap.version} does "
            "not match its stored hash (changed or corrupted since it was verified); it is "
            "not used and nothing is deleted. Restore the snapshot row from a backup.",
            stream_type=stream_type,
            stream_id=stream_id,
            version=snap.version,
        )
    return codec.decode_snapshot(
        snap.state,
        snap.marker,
        stream_type=stream_type,
        stream_id=stream_id,
        version=snap.version,
    )


def load_state(
    store: EventStore,
    snapshots: SnapshotStore,
    decider: Decider[S],
    state_type: type[S] | Any,
    stream_type: str,
    stream_id: str,
    *,
    state_version: int | None = None,
    upcasters: Mapping[int | str, Upcaster] | None = None,
) -> tuple[S, int]:
    """Return ``(state, version)`` of a stream: its newest verified snapshot plus the
    events after it. A stream that does not exist gives ``(initial_state, 0)``.

    Safe while a compaction runs: if the events after the snapshot it read were deleted
    meanwhile, it starts again from the newer snapshot; it never folds across a gap.
    The snapshot is used only if its hash matches its bytes and it was written for the
    current state schema, or upcast to it.

    Args:
        store: The event store.
        snapshots: The snapshot store in the same database.
        decider: Folds events into the state.
        state_type: The type snapshots decode to (as given to the Compactor).
        stream_type: The stream's type.
        stream_id: The stream's id.
        state_version: The state schema's version (default: ``decider.state_version``).
        upcasters: Upgrades of older snapshots (default: ``decider.upcasters``); see
            :class:`~eskit_tasks.domain.codec.StateCodec`.

    Raises:
        StreamIntegrityError: the stream cannot be folded (bad payload, evolve error,
            or a gap that persists).
        SnapshotIntegrityError: the snapshot does not match its hash.
        SnapshotSchemaError: the snapshot is of another schema and cannot be upcast.
    """
    codec: StateCodec[S] = codec_for(decider, state_type, state_version, upcasters)
    for _attempt in range(LOAD_RETRIES):
        try:
            return _load_once(store, snapshots, decider, codec, stream_type, stream_id)
        except _Retry:
            continue
    raise VersionGapError(
        f"{label_of(stream_type, stream_id)}: the events after the newest snapshot kept "
        f"disappearing over {LOAD_RETRIES} attempts; is a compaction looping on this stream?",
        stream_type=stream_type,
        stream_id=stream_id,
        version=0,
    )


def _load_once(
    store: EventStore,
    snapshots: SnapshotStore,
    decider: Decider[S],
    codec: StateCodec[S],
    stream_type: str,
    stream_id: str,
) -> tuple[S, int]:
    snap = snapshots.latest(stream_type, stream_id)
    base = 0 if snap is None else snap.version
    state = (
        decider.initial_state()
        if snap is None
        else open_snapshot(codec, snap, stream_type, stream_id)
    )
    try:
        state, version = fold(
            decider,
            state,
            store.read(stream_type, stream_id, from_version=base + 1),
            after=base,
            stream_type=stream_type,
            stream_id=stream_id,
        )
    except VersionGapError as gap:
        if _was_compacted_past(store, stream_type, stream_id, base):
            raise _Retry from gap
        raise
    if version == base and store.head_version(stream_type, stream_id) > base:
        # No events after the snapshot, yet the head is beyond it: a compaction deleted
        # them (or an append raced in). Either way, read again.
        raise _Retry
    return state, version


def _was_compacted_past(store: EventStore, stream_type: str, stream_id: str, base: int) -> bool:
    try:
        info = store.stream_info(stream_type, stream_id)
    except EskitError:
        return False
    return info is not None and info.compacted_through > base
