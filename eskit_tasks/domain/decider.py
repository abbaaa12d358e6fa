"""The Decider port: how eskit-tasks folds a stream's events into a state."""

from __future__ import annotations

from typing import Any, Protocol, TypeVar, runtime_checkable

from eskit_tasks.domain.events import NewEvent, RecordedEvent

S = TypeVar("S")


@runtime_checkable
class Decider(Protocol[S]):
    """Any object with these three methods is a decider; no base class is needed.

    Compaction only calls ``initial_state`` and ``evolve``; ``decide`` is part of
    the protocol so that one object describes the whole aggregate.

    An implementation must guarantee:

    * ``evolve`` is deterministic: the same state and event give an indistinguishable
      state. Compaction proves a snapshot by comparing what it decodes to with the
      replayed state strictly (:func:`eskit_tasks.domain.compare.first_difference`: types,
      dict order, time zones), not with ``==``.
    * ``evolve`` does not depend on the wall clock, randomness or I/O.
    * ``evolve`` may return a new state or mutate and return the one it was given.
    """

    def initial_state(self) -> S:
        """Return the state of a stream with no events."""
        ...

    def evolve(self, state: S, event: RecordedEvent) -> S:
        """Return the state after ``event``."""
        ...

    def decide(self, command: Any, state: S) -> list[NewEvent]:
        """Return the events that ``command`` produces in ``state``."""
        ...
