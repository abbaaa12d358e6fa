"""Kill or hang the worker process around a deletion's commit (a fleet test's fault).

A worker imports this module through ESKIT_DECIDER_MODULES (next to tests.fleet_deciders,
which registers the deciders). It wraps ``SqlEventStore.commit_compaction``; each mode is
switched on by an environment variable naming a marker file, and acts only if that file
does not exist yet: it creates the file (a JSON object with the pid, the stream and the
compaction id) and then

* ESKIT_TEST_CRASH_AFTER_COMMIT: once the real call has returned — the delete
  transaction committed — sends itself SIGKILL;
* ESKIT_TEST_HANG_AFTER_COMMIT: once the real call has returned, hangs, swallowing
  Celery's SoftTimeLimitExceeded, until the hard time limit has the pool child killed
  by the worker's main process;
* ESKIT_TEST_HANG_BEFORE_COMMIT: hangs the same way *instead of* the real call, so the
  hard time limit kills a task that deleted nothing.

So exactly one deletion, the first to get there, dies before any result, log line or
lock release; the file tells the test that it happened and which compaction it hit.

Without these variables the wrapper changes nothing.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import time
from typing import Any, NoReturn

from celery.exceptions import SoftTimeLimitExceeded

from eskit_tasks.ports import DeletionPlan
from eskit_tasks.stores.sql import SqlEventStore

MARKER_ENV = "ESKIT_TEST_CRASH_AFTER_COMMIT"
HANG_AFTER_ENV = "ESKIT_TEST_HANG_AFTER_COMMIT"
HANG_BEFORE_ENV = "ESKIT_TEST_HANG_BEFORE_COMMIT"


def _first(env: str, plan: DeletionPlan, **extra: Any) -> bool:
    """Write the marker of ``env`` if it is set and not written yet; True if this call did."""
    marker = os.environ.get(env)
    if not marker:
        return False
    try:  # O_EXCL: one fault in all, whichever process gets there first
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    record = {
        "pid": os.getpid(),
        "stream_type": plan.stream_type,
        "stream_id": plan.stream_id,
        "compaction_id": plan.compaction_id,
        **extra,
    }
    with os.fdopen(fd, "w") as out:
        out.write(json.dumps(record))
    return True


def _hang(marker: str) -> NoReturn:
    """Sleep until killed; the soft time limit only leaves a ``.soft`` file beside the
    marker (the hard limit is what ends this process)."""
    while True:
        try:
            time.sleep(60)
        except SoftTimeLimitExceeded:
            with open(marker + ".soft", "a") as out:
                out.write(f"{os.getpid()}\n")


def _faulty(real: Any) -> Any:
    @functools.wraps(real)
    def commit_compaction(self: SqlEventStore, plan: DeletionPlan) -> int:
        if _first(HANG_BEFORE_ENV, plan):
            _hang(os.environ[HANG_BEFORE_ENV])
        deleted: int = real(self, plan)
        if _first(HANG_AFTER_ENV, plan, events_deleted=deleted):
            _hang(os.environ[HANG_AFTER_ENV])
        if _first(MARKER_ENV, plan, events_deleted=deleted):
            os.kill(os.getpid(), signal.SIGKILL)
            raise AssertionError("unreachable: SIGKILL was sent")  # pragma: no cover
        return deleted

    commit_compaction.crashes_after_commit = True  # type: ignore[attr-defined]
    return commit_compaction


if not getattr(SqlEventStore.commit_compaction, "crashes_after_commit", False):
    SqlEventStore.commit_compaction = _faulty(  # type: ignore[method-assign]
        SqlEventStore.commit_compaction
    )
