"""Settling a delete whose outcome is unknown, from the audit log.

A delete's COMMIT may succeed while its reply is lost (a dropped connection, a killed
process). The audit row is written in the same transaction as the delete, so the audit
log knows: a row with this compaction's id, stream, fencing token and cut means the
delete happened; no such row, looked for after taking a new fencing token, means it did
not: a delete still in flight has then either committed (the fence waited for the
COMMIT of a delete that held the stream's row) or can no longer commit (its own fence,
the last statement before its COMMIT, meets the newer token and rolls it back). A
compaction that cannot ask the database raises
:class:`~eskit_tasks.errors.CommitOutcomeUnknownError`; running it again with the same
compaction id settles it.
"""

from __future__ import annotations

import time
from typing import Any

from eskit_tasks.domain.events import label_of
from eskit_tasks.domain.result import CompactionResult, Outcome
from eskit_tasks.errors import CommitOutcomeUnknownError, EskitError
from eskit_tasks.ports import CompactionRecord, DeletionPlan, EventStore

#: Seconds to wait before each further look at the audit log when a delete's outcome is
#: unknown (the first look is immediate).
SETTLE_DELAYS_S = (0.5, 2.0)


class NotCommittedError(Exception):
    """The delete did not commit (internal to the core: the compactor re-raises the
    delete's own error). ``fence_token`` is the token taken to settle it, now the
    compaction's own (None if the stream is gone)."""

    def __init__(self, fence_token: int | None) -> None:
        super().__init__(fence_token)
        self.fence_token = fence_token


def settle(store: EventStore, deletion: DeletionPlan, error: Exception) -> CompactionRecord:
    """The audit row of ``deletion`` if it committed after all.

    Raises:
        NotCommittedError: it did not commit.
        CommitOutcomeUnknownError: the database could not be asked; retry the
            compaction with the same id to settle it.
    """
    st, sid, cid = deletion.stream_type, deletion.stream_id, deletion.compaction_id
    unreachable: Exception | None = None
    for delay in (0.0, *SETTLE_DELAYS_S):
        time.sleep(delay)
        try:
            fenced = store.acquire_fence(st, sid)
            record = store.find_compaction(cid)
        except EskitError as exc:
            unreachable = exc
            continue
        if record is None or not is_ours(record, deletion):
            # Not committed, or the id's row is another compaction's (an id reused
            # while this one ran): this delete did not happen.
            raise NotCommittedError(None if fenced is None else fenced.fence_token)
        return record
    raise CommitOutcomeUnknownError(
        f"{label_of(st, sid)}: the delete's outcome is unknown ({error}), and the "
        f"audit log could not be read to settle it ({unreachable}). Compact it again "
        f"with compaction_id={cid!r}: it reports the deletion if it committed"
    ) from error


def committed_under(
    store: EventStore, stream_type: str, stream_id: str, compaction_id: str
) -> CompactionRecord | None:
    """The deletion of this stream committed under ``compaction_id``, for a compaction
    whose plan is not known any more (its task died): None if there is none.

    A new fencing token is taken first: it waits for a delete still in flight (a killed
    process's COMMIT), so "none" is final, and it stops any stale copy of the compaction.

    Raises:
        EskitError: the database could not be asked.
    """
    store.acquire_fence(stream_type, stream_id)
    record = store.find_compaction(compaction_id)
    if record is None or (record.stream_type, record.stream_id) != (stream_type, stream_id):
        return None
    return record


def is_ours(record: CompactionRecord, deletion: DeletionPlan) -> bool:
    """Is this audit row the delete ``deletion`` planned (stream, token and cut)?"""
    return (
        record.stream_type == deletion.stream_type
        and record.stream_id == deletion.stream_id
        and record.fence_token == deletion.fence_token
        and record.through_version == deletion.through_version
    )


def recovered_result(record: CompactionRecord, *, duration_ms: float = 0.0) -> CompactionResult:
    """The result of a deletion the audit log holds, reported rather than seen
    committing (``recovered``): its COMMIT reply was lost, or its worker died."""
    return CompactionResult(
        stream_type=record.stream_type,
        stream_id=record.stream_id,
        duration_ms=duration_ms,
        **committed_fields(record),
    )


def committed_fields(record: CompactionRecord) -> dict[str, Any]:
    """The result fields of a deletion the audit log holds (reported, not seen
    committing)."""
    return dict(
        outcome=Outcome.COMPACTED,
        head_version=record.head_version,
        compacted_through_before=record.from_version - 1,
        snapshot_version=record.snapshot_version,
        events_deleted=record.events_deleted,
        events_retained=record.head_version - record.through_version,
        bytes_reclaimed=record.bytes_reclaimed,
        state_hash=record.state_hash,
        compaction_id=record.compaction_id,
        archive_uri=record.archive_uri,
        recovered=True,
        error=None,
        error_type=None,
    )
