"""Events as the application writes them and as the store hands them back."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to append. ``data`` and ``metadata`` must be JSON-serialisable.

    Args:
        type: The event's name, e.g. ``"Deposited"``.
        data: The payload.
        metadata: Anything about the event that is not domain data (causation, user, ...).
    """

    type: str
    data: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.type, str) or not self.type:
            raise TypeError(f"NewEvent.type must be a non-empty string, got {self.type!r}")


class RecordedEvent(NamedTuple):
    """An event read back from a store, oldest first.

    Every ``RecordedEvent`` is decoded afresh from storage, so a decider may keep
    references to ``data`` without affecting the store. (A named tuple: immutable and
    built in C, which matters when a compaction reads millions of them.)

    Args:
        version: Position in the stream, starting at 1 and contiguous.
        type: The event's name.
        data: The decoded payload.
        metadata: The decoded metadata.
        recorded_at: When the store committed the event (timezone-aware, UTC).
        stored_bytes: Approximate size of the stored record; what deleting it reclaims.
        position: The event's place in the whole store, strictly increasing in commit
            order across streams (what consumers' checkpoints count).
        stream_type: The stream it belongs to (set by every store read; useful on
            the events of ``read_all``, which come from every stream).
        stream_id: The id of that stream.
    """

    version: int
    type: str
    data: dict[str, Any]
    metadata: dict[str, Any]
    recorded_at: datetime
    stored_bytes: int = 0
    position: int = 0
    stream_type: str = ""
    stream_id: str = ""


def label_of(stream_type: str, stream_id: str) -> str:
    """How messages name a stream: ``type/id``."""
    return f"{stream_type}/{stream_id}"
