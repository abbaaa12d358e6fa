"""Compacting the store of a pyeventsourcing application in place.

``pip install 'eskit-tasks[eventsourcing]'``, then::

    from eskit_tasks.eventsourcing import ApplicationCompactor

    compactor = ApplicationCompactor(app, policy=CompactionPolicy(retain_last=10),
                                     followers=[audit_app])
    result = compactor.compact(aggregate_id)

docs/eventsourcing.md tells the whole story: what is kept, the stale-writer guard, the
followers, what the application must run with.
"""

from __future__ import annotations

from eskit_tasks.eventsourcing.compactor import ApplicationCompactor

__all__ = ["ApplicationCompactor"]
