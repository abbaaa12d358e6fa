"""The contract test suites of the ports, for eskit-tasks' stores and for yours.

Each suite is a pytest class whose tests take a ``stores`` fixture (a :class:`Stores`);
subclass it in your test suite and provide that fixture for your adapter:

* :class:`EventStoreContract` — the :class:`~eskit_tasks.ports.EventStore` port:
  appends, optimistic concurrency, reads, fencing, the delete transaction;
* :class:`SnapshotStoreContract` — the :class:`~eskit_tasks.ports.SnapshotStore` port;
* :class:`CompactorContract` — what a compaction on the two ports must guarantee;
* :class:`ConsumersContract` — global positions, ``read_all``, checkpoints and the gate
  that keeps what a consumer has not read;
* :class:`TrashBinContract` — archiving before the delete, and restore;
* :class:`AdversarialContract` — the cases at the promise's edges (states equal but not
  indistinguishable, changed state types, tampered snapshots, lost commit replies).

They need pytest (``pip install eskit-tasks[dev]``, or pytest on its own); docs/architecture.md,
"Checking your own adapter", shows a test module.
"""

from eskit_tasks.testing.contracts.adversarial import AdversarialContract
from eskit_tasks.testing.contracts.backend import Stores
from eskit_tasks.testing.contracts.compactor import CompactorContract
from eskit_tasks.testing.contracts.consumers import ConsumersContract
from eskit_tasks.testing.contracts.event_store import EventStoreContract
from eskit_tasks.testing.contracts.snapshot_store import SnapshotStoreContract
from eskit_tasks.testing.contracts.trash_bin import TrashBinContract

__all__ = [
    "AdversarialContract",
    "CompactorContract",
    "ConsumersContract",
    "EventStoreContract",
    "SnapshotStoreContract",
    "Stores",
    "TrashBinContract",
]
