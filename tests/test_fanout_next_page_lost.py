"""A fan-out page stopped after it moved the run's cursor but before it sent the next
page (kill -9 of its worker, or the broker refusing that one publish) loses the rest of
the run: the copy that runs again (the redelivered message, or the task's own retry)
finds the cursor moved, takes itself for a duplicate page and sends nothing, so
``fanout_done`` was never set and the run stayed "running" for ever (the soak's stuck
scheduled run, seed 942817290). Now the cursor remembers which message moved it, and a
copy of that message sends the next page again.

Fast tier: the in-process fleet of tests/test_fleet_in_process.py (memory://, fakeredis,
SQLite).
"""

from __future__ import annotations

from typing import Any

import pytest
from kombu.exceptions import OperationalError

from eskit_tasks.fleet.constants import FAN_OUT_TASK
from eskit_tasks.fleet.progress import new_run_id
from eskit_tasks.fleet.resources import resources_of
from eskit_tasks.fleet.runs import CompactionRun
from tests.test_fleet_in_process import InProcessFleet, _running, fleet  # noqa: F401


class _Killed(BaseException):
    """The worker dies here (kill -9), as far as this task goes."""


@pytest.mark.parametrize("how", ["killed, then redelivered", "publish refused, then retried"])
def test_a_fan_out_stopped_before_sending_the_next_page_still_finishes_the_run(
    fleet: InProcessFleet,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    how: str,
):
    for n in range(9):  # three pages of four (fanout_page_size=4)
        fleet.seed(f"s-{n}", 6)
    run_id = new_run_id()
    kwargs: dict[str, Any] = {
        "run_id": run_id,
        "min_events": 5,
        "stream_types": None,
        "max_streams": None,
        "retain_last": 1,
        "retain_younger_than": None,
        "dry_run": False,
    }
    progress = resources_of(fleet.app).progress
    progress.create(run_id, kwargs)
    task = fleet.app.tasks[FAN_OUT_TASK]
    real_send = task.apply_async
    stopped: list[int] = []

    def send(*args: Any, **options: Any) -> Any:
        cursor = options.get("kwargs", {}).get("cursor", 0)
        if not stopped and cursor != 0:  # the first page sends the second one
            stopped.append(cursor)
            if how.startswith("killed"):
                raise _Killed()
            raise OperationalError("broker connection lost")
        return real_send(*args, **options)

    monkeypatch.setattr(task, "apply_async", send)
    if how.startswith("killed"):
        with pytest.raises(_Killed):
            task.apply(kwargs=kwargs, task_id="fan-out-1")
        # Never acknowledged (acks_late): the same message is delivered again.
        task.apply(kwargs=kwargs, task_id="fan-out-1")
    else:
        task.apply(kwargs=kwargs, task_id="fan-out-1")  # retries itself (eagerly here)
    assert stopped, "the first page did not try to send the next one"

    final = CompactionRun(run_id, app=fleet.app).wait(timeout=20, poll=0.1)

    assert final.fanout_done
    assert (final.candidates, final.done) == (9, 9)
