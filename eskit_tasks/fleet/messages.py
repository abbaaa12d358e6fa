"""The arguments the fleet's task messages carry, checked and normalised in one place:
the policy as JSON-friendly keyword arguments, a run's selection arguments, run ids."""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

from eskit_tasks.domain.policy import CompactionPolicy
from eskit_tasks.errors import InvalidPolicyError


def policy_kwargs(
    retain_last: int = 0, retain_younger_than: Any = None, dry_run: bool = False
) -> dict[str, Any]:
    """The policy as JSON-friendly task keyword arguments (ages in seconds).

    Raises:
        InvalidPolicyError: a bad value.
    """
    policy = CompactionPolicy(
        retain_last=retain_last, retain_younger_than=retain_younger_than, dry_run=dry_run
    )
    age = policy.retain_younger_than
    return {
        "retain_last": policy.retain_last,
        "retain_younger_than": None if age is None else age.total_seconds(),
        "dry_run": policy.dry_run,
    }


def check_run_args(min_events: Any, stream_types: Any, max_streams: Any) -> None:
    """Reject a run's selection arguments unless they have the documented types.

    Raises:
        InvalidPolicyError: a bad value, named in the message.
    """
    if isinstance(min_events, bool) or not isinstance(min_events, int) or min_events < 1:
        raise InvalidPolicyError(f"min_events must be an int >= 1, got {min_events!r}")
    if stream_types is not None and (
        not isinstance(stream_types, list | tuple)
        or not all(isinstance(t, str) for t in stream_types)
    ):
        raise InvalidPolicyError(f"stream_types must be a list of strings, got {stream_types!r}")
    if max_streams is not None and (
        isinstance(max_streams, bool) or not isinstance(max_streams, int) or max_streams < 0
    ):
        raise InvalidPolicyError(f"max_streams must be an int >= 0, got {max_streams!r}")


def run_id_for(task_id: str | None) -> str:
    """The run id of a fan-out started without one (by beat): derived from its task id,
    so a redelivered first page continues the same run."""
    if not task_id:
        return uuid.uuid4().hex
    try:
        return uuid.UUID(task_id).hex
    except ValueError:
        return hashlib.sha256(task_id.encode()).hexdigest()[:32]


def short_repr(value: object, limit: int = 1024) -> str:
    """``repr`` cut to ``limit`` characters, for the argument reprs monitors show."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
