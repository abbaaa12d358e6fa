"""The short soak of the suite: about 75 s of workload under every kind of fault, with a
pyeventsourcing application's purses, writer, stale writer and follower besides.

``run_soak`` configures the Celery app for its own redis-servers, and the app reads its
settings once per process; this session's app (tests/conftest.py) may already be in use
by the fleet tests. So the soak runs in a fresh (spawned) process and sends its report
back as JSON. ``ESKIT_SOAK_SECONDS`` (60 or more: every kind of fault must fit) and
``ESKIT_SOAK_SEED`` change its length and seed; the seed is printed either way.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from pathlib import Path

import pytest

from tests.soak.config import SoakConfig
from tests.soak.faults import FAULT_KINDS
from tests.soak.harness import run_soak
from tests.soak.kinds import STRICT_KINDS
from tests.soak.model import BAD_RESULTS
from tests.soak.report import Report

SECONDS = float(os.environ.get("ESKIT_SOAK_SECONDS", "75"))
SEED = int(os.environ["ESKIT_SOAK_SEED"]) if os.environ.get("ESKIT_SOAK_SEED") else None
#: Start-up, the quiesce (a killed worker's tasks come back after the visibility
#: timeout) and the final check, on top of the workload.
OVERHEAD_S = 480.0
#: Compactions that must have deleted something in the short soak.
MIN_COMPACTED = 300


def _soak_in_child(config: SoakConfig, out: str) -> None:
    # terminate() must still stop the workers and redis-servers and drop the database.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    Path(out).write_text(run_soak(config).to_json())


@pytest.mark.slow
@pytest.mark.timeout(SECONDS + OVERHEAD_S + 120)
@pytest.mark.usefixtures("postgres_url")  # stops the session with advice if PostgreSQL is down
def test_a_soak_under_faults_keeps_every_invariant(tmp_path: Path):
    out = tmp_path / "report.json"
    config = SoakConfig(seconds=SECONDS, seed=SEED, progress_every=15.0)
    child = multiprocessing.get_context("spawn").Process(
        target=_soak_in_child, args=(config, str(out)), name="soak"
    )
    child.start()
    child.join(SECONDS + OVERHEAD_S)
    if child.is_alive():
        child.terminate()
        child.join(60)
        pytest.fail(f"the soak did not finish in {SECONDS + OVERHEAD_S:.0f} s")
    assert child.exitcode == 0, f"the soak process failed (exit code {child.exitcode})"
    report = Report.from_json(out.read_text())
    text = report.text()
    print(text)

    assert report.violation_count == 0, text
    assert {kind: report.faults.get(kind, 0) >= 1 for kind in FAULT_KINDS} == dict.fromkeys(
        FAULT_KINDS, True
    ), text
    assert report.compactions.get("compacted", 0) >= MIN_COMPACTED, text
    assert report.task_results.get("compacted", 0) >= MIN_COMPACTED // 2, text
    assert report.final_run.get("status") == "finished", text
    assert report.operations.get("reads", 0) > 0 and report.operations.get("appends", 0) > 0
    assert report.operations.get("stale_appends_rejected", 0) > 0, text
    # The bad input was tried and failed the way it must (any other outcome, or an event
    # of it gone, is a violation); finished runs each reported it as failed.
    for stream, kind in [
        ("ledger/bad-boom", "boom"),
        ("ghost/bad-ghost", "ghost"),
        ("lossy/bad-lossy", "lossy"),
    ]:
        outcome, error_type = BAD_RESULTS[kind]
        assert report.bad_input.get(stream, {}).get(f"{outcome}/{error_type}", 0) > 0, text
    assert report.operations.get("bad_input_checks", 0) >= 3, text
    # The strictly compared kinds round-trip: every stream of them was compacted, none
    # failed verification (that would be a violation: they are good streams).
    for kind in STRICT_KINDS:
        assert report.deletions_by_type.get(kind, {}).get("streams") == config.strict_streams, text
    # The projection lagged, held compactions back and caught up (what it saw is checked:
    # a violation otherwise); restores were done; every deletion's archive entry was read
    # back and checked.
    assert report.projection.get("pauses", 0) > 0, text
    assert report.held_back.get("limited", 0) + report.held_back.get("held", 0) > 0, text
    assert report.restores.get("restored", 0) > 0, text
    assert report.archive.get("entries") == report.audit_rows, text
    # The pyeventsourcing application (tests/soak/esapp.py; what it holds, what its
    # follower saw and the stale saves are checked: a violation otherwise): the fan-outs
    # compacted its purses during the workload, held back by its lagging follower, which
    # processed every event; stale saves were refused by the guard during the workload.
    app = report.application
    assert app.get("appends", 0) > 0 and app.get("reads", 0) > 0, text
    assert app.get("compactions_in_workload", 0) > 0, text
    assert app.get("follower_pauses", 0) > 0 and app.get("follower_events") == app["events"], text
    assert sum(app.get("held_back", {}).values()) > 0, text
    assert app.get("stale_refused", 0) > app.get("stale_refused_at_end", 0), text
