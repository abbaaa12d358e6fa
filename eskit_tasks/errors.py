"""Exceptions raised by eskit-tasks.

Every exception derives from :class:`EskitError`, so one ``except`` catches all
of them. Driver errors (SQLAlchemy, psycopg, sqlite3) never reach the caller:
the stores translate them at the boundary and chain the original with ``from``.

    EskitError
    ├── ConfigurationError              bad input, raised before any I/O
    │   ├── InvalidPolicyError          (also a ValueError)
    │   ├── UnknownStreamTypeError      no decider is registered for a stream type
    │   └── DatabaseNotReadyError       the eskit tables are missing or need an upgrade
    ├── ServiceUnavailableError         a service cannot be reached; names it and its URL
    ├── StoreError                      the event database
    │   ├── DatabaseUnavailableError    cannot connect / connection lost (also a
    │   │   │                           ServiceUnavailableError)
    │   │   └── CommitOutcomeUnknownError  a delete's COMMIT reply was lost, not settled yet
    │   ├── ConcurrencyError            expected_version does not match the head
    │   └── TableLayoutError            the eskit tables differ from what this version expects
    ├── StreamIntegrityError            the stored stream cannot be replayed
    │   ├── EventDecodeError            a payload is not valid JSON
    │   ├── VersionGapError             versions are not contiguous
    │   ├── EvolveError                 the decider raised while folding an event
    │   ├── SnapshotIntegrityError      a snapshot's bytes do not match its stored hash
    │   └── SnapshotSchemaError         a snapshot of another state schema, no upcaster
    ├── CompactionError                 a compaction was stopped before deleting
    │   ├── FencedError                 a newer compaction owns the stream
    │   │   └── LockLostError           the fleet's stream lock could not be renewed
    │   ├── SnapshotCodecError          the state cannot be encoded or decoded
    │   ├── DeletionMismatchError       the delete would not match the plan
    │   ├── HeldBackError               a consumer's checkpoint now covers less than planned
    │   └── TimeBudgetError             a fleet task stopped near its soft time limit
    ├── ArchiveError                    the trash bin cannot be written or read back
    ├── RestoreError                    archived events cannot be put back; nothing changed
    ├── RunNotFoundError                no progress is stored for a fleet run id
    ├── RunTimeoutError                 a fleet run did not finish in time (also a TimeoutError)
    └── CompactionNeedsAttention        a fleet task's outcome needs attention (FAILURE state)

Every exception class of the package is defined here, and only here.
"""

from __future__ import annotations

from typing import Any


class EskitError(Exception):
    """Raised for every error that eskit-tasks reports; the root of the tree."""


class ConfigurationError(EskitError):
    """Raised when an argument or setting is invalid; nothing has been touched."""


class InvalidPolicyError(ConfigurationError, ValueError):
    """Raised when a compaction policy has an invalid value (e.g. negative retain_last)."""


class UnknownStreamTypeError(ConfigurationError):
    """Raised when no decider is registered for a stream type."""


class DatabaseNotReadyError(ConfigurationError):
    """Raised when the eskit tables are missing or at an older revision; nothing was
    changed: run ``eskit-tasks init-db``."""


class ServiceUnavailableError(EskitError):
    """Raised when a service cannot be reached: the broker, the Redis for locks and run
    progress, the result backend or the database; the message names which, with its
    setting and URL (password masked), and what to check."""


class StoreError(EskitError):
    """Raised when the event database fails or refuses an operation."""


class DatabaseUnavailableError(StoreError, ServiceUnavailableError):
    """Raised when the database cannot be reached; the message names the host, never a password."""


class CommitOutcomeUnknownError(DatabaseUnavailableError):
    """Raised when the connection was lost during a delete's COMMIT and the audit log
    could not be read to settle it; compacting again with the same id settles it."""


class ConcurrencyError(StoreError):
    """Raised when an append's expected_version is not the stream's head version."""


class TableLayoutError(StoreError):
    """Raised when the eskit tables exist with a layout this version does not expect."""


class StreamIntegrityError(EskitError):
    """Raised when a stream cannot be replayed; the message names stream and version."""

    def __init__(self, message: str, *, stream_type: str, stream_id: str, version: int) -> None:
        super().__init__(message)
        self.stream_type = stream_type
        self.stream_id = stream_id
        self.version = version


class EventDecodeError(StreamIntegrityError):
    """Raised when a stored event payload or metadata is not valid JSON."""


class VersionGapError(StreamIntegrityError):
    """Raised when a stream's versions are not contiguous where they must be."""


class EvolveError(StreamIntegrityError):
    """Raised when the decider's ``evolve`` raises while folding an event."""


class SnapshotIntegrityError(StreamIntegrityError):
    """Raised when a stored snapshot's bytes do not match its stored hash; it is not used."""


class SnapshotSchemaError(StreamIntegrityError):
    """Raised when a snapshot was written for another state schema and no upcaster leads
    from its schema to the current one, or decoding it would drop or invent fields."""


class CompactionError(EskitError):
    """Raised inside a compaction that must stop before deleting anything."""


class FencedError(CompactionError):
    """Raised when a newer compaction took the stream's fencing token; this one must stop."""


class LockLostError(FencedError):
    """Raised at a checkpoint when the stream lock could not be renewed or is gone."""


class SnapshotCodecError(CompactionError):
    """Raised when a state cannot be encoded to JSON or decoded with the state type."""


class DeletionMismatchError(CompactionError):
    """Raised when the rows a delete would remove differ from the plan; it was rolled back."""


class HeldBackError(CompactionError):
    """Raised inside the delete transaction when a consumer's checkpoint (read again
    there) is below the newest event the plan would delete; nothing was deleted."""

    def __init__(self, message: str, *, consumer: str, position: int) -> None:
        super().__init__(message)
        self.consumer = consumer
        self.position = position


class TimeBudgetError(CompactionError):
    """Raised before a write when a fleet task is about to reach its soft time limit."""


class ArchiveError(EskitError):
    """Raised when the archive (the trash bin) cannot write an entry durably, or an entry
    read back is missing or does not match its checksum."""


class RestoreError(EskitError):
    """Raised when archived events cannot be put back (an archive is missing, the stream
    moved, a version would be overwritten); nothing was changed."""


class RunNotFoundError(EskitError):
    """Raised when no progress is stored for a run id (unknown, or expired)."""


class RunTimeoutError(EskitError, TimeoutError):
    """Raised when a run did not finish within the time given to ``wait``."""


class CompactionNeedsAttention(EskitError):
    """Raised by the fleet's ``compact_stream`` task, after its result is claimed,
    counted and logged, when the outcome needs attention (``failed``,
    ``verification_failed``, ``fenced``, ``locked``), so that Celery stores the task as
    FAILURE and Flower shows it failed. ``result`` is the task's ``CompactionResult`` as
    JSON; ``eskit_tasks.fleet.runs.compaction_result(task_id)`` reads it back."""

    def __init__(self, message: str, result: dict[str, Any]) -> None:
        # Both are the exception's args: a JSON result backend stores the args and
        # rebuilds the exception from them (AsyncResult.result).
        super().__init__(message, result)
        self.message = message
        self.result = result

    def __str__(self) -> str:
        return self.message
