"""eskit-tasks: safe compaction of long-lived event-sourced streams.

Take a snapshot of a stream's state at version C, prove that it rebuilds the right
state, then delete events 1..C — never losing one.
"""

import importlib
from typing import Any

from eskit_tasks import _moved
from eskit_tasks.core.compactor import Compactor
from eskit_tasks.core.loading import load_state
from eskit_tasks.core.registry import register_decider
from eskit_tasks.core.restore import RestoreResult, restore
from eskit_tasks.core.verify import SnapshotReport, verify_snapshots
from eskit_tasks.domain.codec import StateCodec
from eskit_tasks.domain.compare import Difference, first_difference, indistinguishable
from eskit_tasks.domain.decider import Decider
from eskit_tasks.domain.events import NewEvent, RecordedEvent
from eskit_tasks.domain.policy import CompactionPolicy
from eskit_tasks.domain.result import CompactionResult, HeldBack, Outcome
from eskit_tasks.domain.schema import SchemaMarker, schema_fingerprint
from eskit_tasks.errors import (
    ArchiveError,
    CommitOutcomeUnknownError,
    CompactionError,
    CompactionNeedsAttention,
    ConcurrencyError,
    ConfigurationError,
    DatabaseNotReadyError,
    DatabaseUnavailableError,
    DeletionMismatchError,
    EskitError,
    EventDecodeError,
    EvolveError,
    FencedError,
    HeldBackError,
    InvalidPolicyError,
    RestoreError,
    RunNotFoundError,
    RunTimeoutError,
    ServiceUnavailableError,
    SnapshotCodecError,
    SnapshotIntegrityError,
    SnapshotSchemaError,
    StoreError,
    StreamIntegrityError,
    TableLayoutError,
    UnknownStreamTypeError,
    VersionGapError,
)
from eskit_tasks.ports import (
    Archive,
    ArchivedEvent,
    ArchiveRef,
    Checkpoint,
    CompactionRecord,
    EventStore,
    Snapshot,
    SnapshotStore,
    StoredSnapshot,
    StreamInfo,
)
from eskit_tasks.stores import (
    InMemoryDatabase,
    InMemoryEventStore,
    InMemorySnapshotStore,
    SqlEventStore,
    SqlSnapshotStore,
)
from eskit_tasks.stores.archive import LocalArchive

__version__ = "0.1.0"

# The fleet's names import Celery; they load on first use so that the library core
# stays light. `celery -A eskit_tasks` finds the Celery app as `eskit_tasks.app`.
_moved.install()  # the old flat module paths (eskit_tasks.settings, ...) still import

_LAZY = {
    "compact_all": "eskit_tasks.fleet.runs",
    "CompactionRun": "eskit_tasks.fleet.runs",
    "RunSummary": "eskit_tasks.fleet.runs",
    "compaction_result": "eskit_tasks.fleet.runs",
    "RunProgress": "eskit_tasks.fleet.progress",
    "app": "eskit_tasks.fleet.app",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'eskit_tasks' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    # compaction
    "CompactionPolicy",
    "CompactionRecord",
    "CompactionResult",
    "Compactor",
    "Outcome",
    "load_state",
    # consumers and the trash bin
    "Archive",
    "ArchivedEvent",
    "ArchiveRef",
    "Checkpoint",
    "HeldBack",
    "LocalArchive",
    "RestoreResult",
    "restore",
    # proving a snapshot
    "Difference",
    "SchemaMarker",
    "StateCodec",
    "first_difference",
    "indistinguishable",
    "schema_fingerprint",
    "verify_snapshots",
    "SnapshotReport",
    # the fleet
    "CompactionRun",
    "RunNotFoundError",
    "RunProgress",
    "RunSummary",
    "RunTimeoutError",
    "UnknownStreamTypeError",
    "compact_all",
    "compaction_result",
    "register_decider",
    # events and deciders
    "Decider",
    "NewEvent",
    "RecordedEvent",
    # ports and stores
    "EventStore",
    "InMemoryDatabase",
    "InMemoryEventStore",
    "InMemorySnapshotStore",
    "Snapshot",
    "SnapshotStore",
    "StoredSnapshot",
    "SqlEventStore",
    "SqlSnapshotStore",
    "StreamInfo",
    # errors
    "ArchiveError",
    "CommitOutcomeUnknownError",
    "CompactionError",
    "CompactionNeedsAttention",
    "ConcurrencyError",
    "ConfigurationError",
    "DatabaseNotReadyError",
    "DatabaseUnavailableError",
    "DeletionMismatchError",
    "EskitError",
    "EventDecodeError",
    "EvolveError",
    "FencedError",
    "HeldBackError",
    "InvalidPolicyError",
    "RestoreError",
    "ServiceUnavailableError",
    "SnapshotCodecError",
    "SnapshotIntegrityError",
    "SnapshotSchemaError",
    "StoreError",
    "StreamIntegrityError",
    "TableLayoutError",
    "VersionGapError",
]
