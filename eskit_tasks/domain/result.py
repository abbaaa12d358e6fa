"""The outcome of one compaction, as stored in result backends and audit logs."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict


class Outcome(StrEnum):
    """How a compaction ended. Only ``compacted`` deleted anything."""

    COMPACTED = "compacted"
    """A verified snapshot was stored and events up to it were deleted."""
    DRY_RUN = "dry_run"
    """Planned, replayed and verified in memory; nothing written."""
    NOTHING_TO_COMPACT = "nothing_to_compact"
    """The policy leaves no event to delete (or the stream does not exist)."""
    VERIFICATION_FAILED = "verification_failed"
    """The snapshot did not rebuild the replayed state; nothing deleted."""
    FENCED = "fenced"
    """A newer compaction took over the stream; this one stopped before deleting."""
    FAILED = "failed"
    """The stream could not be replayed or the database refused; nothing deleted."""
    LOCKED = "locked"
    """Another worker holds the stream's lock; this copy did not run (fleet only)."""


class CompactionResult(BaseModel):
    """What one compaction did. JSON-serialisable (``model_dump_json``).

    On ``dry_run``, ``events_deleted`` and ``bytes_reclaimed`` are what *would* go.
    ``bytes_reclaimed`` approximates the stored size of the deleted events.
    """

    model_config = ConfigDict(frozen=True)

    stream_type: str
    stream_id: str
    outcome: Outcome
    head_version: int = 0
    compacted_through_before: int = 0
    snapshot_version: int | None = None
    events_deleted: int = 0
    events_retained: int = 0
    bytes_reclaimed: int = 0
    state_hash: str | None = None
    duration_ms: float = 0.0
    error: str | None = None
    error_type: str | None = None
    compaction_id: str
    recovered: bool = False
    """True when the deletion was reported from the audit log rather than seen
    committing: its COMMIT reply was lost, or an earlier attempt with the same
    compaction id died after it. The figures are the audit row's."""

    @property
    def ok(self) -> bool:
        """True unless the compaction failed, failed verification or was fenced."""
        return self.outcome not in (Outcome.FAILED, Outcome.VERIFICATION_FAILED, Outcome.FENCED)
