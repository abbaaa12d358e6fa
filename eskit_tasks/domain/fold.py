"""Folding a stream's events into a state: the loop every replay runs, once per event.

Two ways to fold the same events, with the same checks and the same errors:

* :func:`fold_events` takes any iterable of :class:`RecordedEvent` (the in-memory store,
  a test's list, a store that only implements ``read``).
* A read that implements :class:`FoldsItself` (the SQL store's) folds its own rows a page
  at a time: versions are checked per page, and no generator is resumed per event.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol, TypeVar, runtime_checkable

from eskit_tasks.domain.events import RecordedEvent, label_of
from eskit_tasks.errors import EvolveError, VersionGapError

S = TypeVar("S")

#: A decider's ``evolve``.
Evolve = Callable[[Any, RecordedEvent], Any]


@runtime_checkable
class FoldsItself(Protocol):
    """Events that can run a fold over themselves faster than iterating them would."""

    def fold(self, evolve: Evolve, state: Any, after: int) -> tuple[Any, int, int]:
        """Fold every event into ``state`` (which holds versions up to ``after``).

        Returns:
            The new state, the last version folded (``after`` when there are none) and
            the summed ``stored_bytes`` of the events folded.

        Raises:
            VersionGapError: an event is not the next version.
            EvolveError: ``evolve`` raised.
            EventDecodeError: a stored payload is not valid JSON.
        """
        ...


def fold_events(
    evolve: Evolve,
    state: S,
    events: Iterable[RecordedEvent],
    *,
    after: int,
    stream_type: str,
    stream_id: str,
) -> tuple[S, int, int]:
    """Fold ``events`` one at a time; see :meth:`FoldsItself.fold` for what it returns
    and raises. This loop runs once per event of a replay: keep it lean."""
    version = after
    stored = 0
    for event in events:
        if event[0] != version + 1:
            raise gap_error(stream_type, stream_id, version + 1, event[0])
        try:
            state = evolve(state, event)
        except Exception as exc:
            raise evolve_error(stream_type, stream_id, event, exc) from exc
        version += 1
        stored += event[5]
    return state, version, stored


def gap_error(stream_type: str, stream_id: str, expected: int, found: int) -> VersionGapError:
    return VersionGapError(
        f"{label_of(stream_type, stream_id)}: expected version {expected}, "
        f"found {found}; the stream has a gap",
        stream_type=stream_type,
        stream_id=stream_id,
        version=expected,
    )


def evolve_error(
    stream_type: str, stream_id: str, event: RecordedEvent, exc: Exception
) -> EvolveError:
    return EvolveError(
        f"{label_of(stream_type, stream_id)} version {event.version} "
        f"({event.type}): evolve raised {type(exc).__name__}: {exc}",
        stream_type=stream_type,
        stream_id=stream_id,
        version=event.version,
    )
