"""Rules both store families share, so the in-memory store cannot drift from SQL."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from eskit_tasks.domain.codec import dumps
from eskit_tasks.domain.events import NewEvent
from eskit_tasks.errors import ConcurrencyError, ConfigurationError, FencedError
from eskit_tasks.ports import DeletionPlan

#: Versions are 64-bit signed integers in the database.
MAX_VERSION = 2**63
#: Approximate per-row overhead (key, version, type name, timestamp) added to payload sizes.
ROW_OVERHEAD_BYTES = 48


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


def check_fence(label: str, plan: DeletionPlan, token: int, compacted_through: int) -> None:
    if token != plan.fence_token:
        raise FencedError(
            f"{label}: fencing token {plan.fence_token} is stale (current {token}); "
            "a newer compaction owns the stream, nothing deleted"
        )
    if compacted_through != plan.compacted_through_before:
        raise FencedError(
            f"{label}: compacted through {compacted_through} since this compaction planned "
            f"from {plan.compacted_through_before}; nothing deleted"
        )
