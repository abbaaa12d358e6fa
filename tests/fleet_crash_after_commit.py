"""Kill -9 the worker process right after a deletion commits (a fleet test's fault).

A worker imports this module through ESKIT_DECIDER_MODULES (next to tests.fleet_deciders,
which registers the deciders). It wraps ``SqlEventStore.commit_compaction``: once the
real call has returned — the delete transaction committed — and if the file named by
ESKIT_TEST_CRASH_AFTER_COMMIT does not exist yet, it creates that file (a JSON object
with the pid, the stream and the compaction id) and sends itself SIGKILL. So exactly
one deletion, the first to commit, dies before any result, log line or lock release;
the file tells the test that the crash happened and which compaction it hit.

Without ESKIT_TEST_CRASH_AFTER_COMMIT the wrapper changes nothing.
"""

from __future__ import annotations

import functools
import json
import os
import signal
from typing import Any

from eskit_tasks.ports import DeletionPlan
from eskit_tasks.stores.sql import SqlEventStore

MARKER_ENV = "ESKIT_TEST_CRASH_AFTER_COMMIT"


def _die_after_commit(real: Any) -> Any:
    @functools.wraps(real)
    def commit_compaction(self: SqlEventStore, plan: DeletionPlan) -> int:
        deleted: int = real(self, plan)
        marker = os.environ.get(MARKER_ENV)
        if not marker:
            return deleted
        try:  # O_EXCL: one crash in all, whichever process commits first
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return deleted
        record = {
            "pid": os.getpid(),
            "stream_type": plan.stream_type,
            "stream_id": plan.stream_id,
            "compaction_id": plan.compaction_id,
            "events_deleted": deleted,
        }
        with os.fdopen(fd, "w") as out:
            out.write(json.dumps(record))
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable: SIGKILL was sent")  # pragma: no cover

    commit_compaction.crashes_after_commit = True  # type: ignore[attr-defined]
    return commit_compaction


if not getattr(SqlEventStore.commit_compaction, "crashes_after_commit", False):
    SqlEventStore.commit_compaction = _die_after_commit(  # type: ignore[method-assign]
        SqlEventStore.commit_compaction
    )
