"""eskit-tasks: safe compaction of long-lived event-sourced streams.

Take a snapshot of a stream's state at version C, prove that it rebuilds the right
state, then delete events 1..C — never losing one.
"""

from eskit_tasks.compactor import Compactor
from eskit_tasks.decider import Decider
from eskit_tasks.errors import (
    CompactionError,
    ConcurrencyError,
    ConfigurationError,
    DatabaseUnavailableError,
    DeletionMismatchError,
    EskitError,
    EventDecodeError,
    EvolveError,
    FencedError,
    InvalidPolicyError,
    SnapshotCodecError,
    StoreError,
    StreamIntegrityError,
    VersionGapError,
)
from eskit_tasks.events import NewEvent, RecordedEvent
from eskit_tasks.loading import load_state
from eskit_tasks.policy import CompactionPolicy
from eskit_tasks.ports import CompactionRecord, EventStore, Snapshot, SnapshotStore, StreamInfo
from eskit_tasks.result import CompactionResult, Outcome
from eskit_tasks.stores import (
    InMemoryDatabase,
    InMemoryEventStore,
    InMemorySnapshotStore,
    SqlEventStore,
    SqlSnapshotStore,
)

__version__ = "0.1.0"

__all__ = [
    # compaction
    "CompactionPolicy",
    "CompactionRecord",
    "CompactionResult",
    "Compactor",
    "Outcome",
    "load_state",
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
    "SqlEventStore",
    "SqlSnapshotStore",
    "StreamInfo",
    # errors
    "CompactionError",
    "ConcurrencyError",
    "ConfigurationError",
    "DatabaseUnavailableError",
    "DeletionMismatchError",
    "EskitError",
    "EventDecodeError",
    "EvolveError",
    "FencedError",
    "InvalidPolicyError",
    "SnapshotCodecError",
    "StoreError",
    "StreamIntegrityError",
    "VersionGapError",
]
