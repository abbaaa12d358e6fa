"""Planning a run without running it, and applying a plan exactly.

:func:`plan_stream` decides, for one candidate, the cut C a compaction would make now
and what would go: read-only, from the compaction point, the policy and the consumers
(:meth:`~eskit_tasks.core.compactor.Compactor.preview`), plus a read of the doomed
events' sizes — or, with ``verify``, a dry run that also replays and verifies the
snapshot at C. Streams of a pyeventsourcing application are always planned by a dry run.

:func:`apply_policy` is the policy one planned stream is applied with: the plan's
policy, capped at its C (``through_version``), so apply never deletes past what was
planned even if the stream grew.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from eskit_tasks.core.compactor import Compactor
from eskit_tasks.core.registry import SourceCompactor
from eskit_tasks.domain.plan import PlannedStream
from eskit_tasks.domain.policy import CompactionPolicy
from eskit_tasks.domain.result import CompactionResult, Outcome
from eskit_tasks.ports import EventStore

#: Makes the compactor of a stream type under a policy (a ConfigurationError for a
#: type without a decider is returned, not raised: see cli/local.py's LocalCompactors).
CompactorFor = Callable[[str, CompactionPolicy], "Compactor[Any] | SourceCompactor | Exception"]


def plan_stream(
    store: EventStore,
    compactor: Compactor[Any] | SourceCompactor,
    stream_type: str,
    stream_id: str,
    *,
    verify: bool,
) -> PlannedStream | CompactionResult | None:
    """What compacting one stream would do now: a :class:`PlannedStream`, None when
    there is nothing to compact, or the failed dry run's result (``verify``, or a
    source) when the stream cannot be compacted. ``compactor`` must be under a dry-run
    policy when ``verify`` is set or the stream is a source's."""
    if verify or not isinstance(compactor, Compactor):
        if isinstance(compactor, Compactor):
            result = compactor.compact(stream_type, stream_id)
        else:
            result = compactor.compact(stream_id)
        if result.outcome is Outcome.NOTHING_TO_COMPACT:
            return None
        if result.outcome is not Outcome.DRY_RUN or result.snapshot_version is None:
            return result
        return PlannedStream(
            stream_type=stream_type,
            stream_id=stream_id,
            head_version=result.head_version,
            compacted_through=result.compacted_through_before,
            through_version=result.snapshot_version,
            events=result.events_deleted,
            bytes=result.bytes_reclaimed,
            outcome=Outcome.DRY_RUN.value,
        )
    preview = compactor.preview(stream_type, stream_id)
    if preview is None:
        return None
    doomed = store.read(
        stream_type,
        stream_id,
        from_version=preview.compacted_through + 1,
        to_version=preview.through_version,
    )
    size = sum(e.stored_bytes for e in doomed)
    return PlannedStream(
        stream_type=stream_type,
        stream_id=stream_id,
        head_version=preview.head_version,
        compacted_through=preview.compacted_through,
        through_version=preview.through_version,
        events=preview.through_version - preview.compacted_through,
        bytes=size,
    )


def apply_policy(plan_policy: dict[str, Any], planned: PlannedStream) -> CompactionPolicy:
    """The policy a planned stream is applied with: the plan's retention rules, capped
    at the planned cut, never a dry run."""
    return CompactionPolicy(
        retain_last=plan_policy.get("retain_last", 0),
        retain_younger_than=plan_policy.get("retain_younger_than"),
        through_version=planned.through_version,
    )


def moved_past(planned: PlannedStream, result: CompactionResult) -> bool:
    """True when the stream's compaction point had moved to or past the planned cut
    before apply reached it (another run compacted it): apply skipped it."""
    return (
        result.outcome is Outcome.NOTHING_TO_COMPACT
        and result.compacted_through_before >= planned.through_version
    )
