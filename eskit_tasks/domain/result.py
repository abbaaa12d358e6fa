"""The outcome of one compaction, as stored in result backends and audit logs."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict

from eskit_tasks.domain.redact import mask_url


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
    CANCELLED = "cancelled"
    """The run was cancelled before this stream's turn; nothing was read or written
    (fleet only)."""

    @property
    def needs_attention(self) -> bool:
        """True when the stream was not compacted because of a problem someone should
        look at: ``verification_failed``, ``failed``, ``fenced`` or ``locked``. The one
        definition behind ``CompactionResult.ok``, a run's failed streams and the CLI's
        exit status."""
        return self not in _FINE


#: The outcomes that need no attention.
_FINE = frozenset(
    {Outcome.COMPACTED, Outcome.DRY_RUN, Outcome.NOTHING_TO_COMPACT, Outcome.CANCELLED}
)


class HeldBack(BaseModel):
    """The consumer whose checkpoint limited a compaction's cut: events above its
    position stay until it has read them."""

    model_config = ConfigDict(frozen=True)

    consumer: str
    position: int


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
    held_back_by: HeldBack | None = None
    """The consumer that kept events the policy would have deleted (its checkpoint is
    below them), None when no consumer limited the cut. With ``nothing_to_compact`` it
    held back every event the policy allowed."""
    archive_uri: str | None = None
    """Where the trash bin keeps the deleted events (None: no archive configured)."""
    recovered: bool = False
    """True when the deletion was reported from the audit log rather than seen
    committing: its COMMIT reply was lost, or an earlier attempt with the same
    compaction id died after it. The figures are the audit row's."""

    @property
    def ok(self) -> bool:
        """True unless the outcome needs attention (see ``Outcome.needs_attention``)."""
        return not self.outcome.needs_attention

    @classmethod
    def failed(
        cls,
        stream_type: str,
        stream_id: str,
        error: BaseException | str,
        *,
        compaction_id: str,
        outcome: Outcome = Outcome.FAILED,
        error_type: str | None = None,
    ) -> CompactionResult:
        """A result for a compaction that deleted nothing because of ``error``: the one
        constructor for results built outside the compactor (bad arguments, an unknown
        stream type, an unreachable service, a task that died). An exception gives
        ``error_type`` (its class name) and the message ``Type: message``; passwords in
        URLs are masked either way."""
        if isinstance(error, BaseException):
            error_type = error_type or type(error).__name__
            error = f"{type(error).__name__}: {error}"
        return cls(
            stream_type=stream_type,
            stream_id=stream_id,
            outcome=outcome,
            error=mask_url(error),
            error_type=error_type,
            compaction_id=compaction_id,
        )
