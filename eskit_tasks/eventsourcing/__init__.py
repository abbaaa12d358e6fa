"""Compacting the store of a pyeventsourcing application in place.

``pip install 'eskit-tasks[eventsourcing]'``, then::

    from eskit_tasks.eventsourcing import ApplicationCompactor

    compactor = ApplicationCompactor(app, policy=CompactionPolicy(retain_last=10),
                                     followers=[audit_app])
    result = compactor.compact(aggregate_id)

For workers and the command line, a decider module calls
``register_application("pkg.mod:Bank", env=..., followers=[...])``.

docs/eventsourcing.md tells the whole story: what is kept, the stale-writer guard, the
followers, what the application must run with.
"""

from __future__ import annotations

from eskit_tasks.eventsourcing.compactor import ApplicationCompactor
from eskit_tasks.eventsourcing.registration import ApplicationSource, register_application

__all__ = ["ApplicationCompactor", "ApplicationSource", "register_application"]
