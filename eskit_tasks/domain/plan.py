"""A plan: the streams a run would compact and the version each may reach, decided
ahead (``eskit-tasks plan``) and applied later exactly (``eskit-tasks apply``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PlannedStream:
    """One stream of a plan: where it stood when planned and the cut the plan allows.

    ``through_version`` is the highest version apply may delete, whatever the stream
    has become since; ``events`` and ``bytes`` what would go then (``bytes``: the same
    estimate as a result's ``bytes_reclaimed``). ``outcome`` is ``dry_run`` when the plan
    verified the stream (``--verify``), else None.
    """

    stream_type: str
    stream_id: str
    head_version: int
    compacted_through: int
    through_version: int
    events: int
    bytes: int
    outcome: str | None = None
    error: str | None = None
