"""Metrics and the compaction log line, without a fleet (the fleet tests in
tests/fleet/test_observability.py run them in real workers)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from eskit_tasks.domain.result import CompactionResult, Outcome
from eskit_tasks.fleet.observability import JsonLineFormatter, log_result
from eskit_tasks.fleet.settings import EskitSettings
from eskit_tasks.testing.services import free_port
from tests import REPO


def _result(**fields: object) -> CompactionResult:
    base: dict[str, object] = {
        "stream_type": "account",
        "stream_id": "a-1",
        "outcome": Outcome.COMPACTED,
        "head_version": 120,
        "snapshot_version": 100,
        "events_deleted": 100,
        "events_retained": 20,
        "bytes_reclaimed": 4096,
        "duration_ms": 12.5,
        "compaction_id": "c-1",
    }
    return CompactionResult.model_validate({**base, **fields})


def test_log_line_is_one_json_object_with_every_field(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="eskit_tasks.compaction")
    log_result(_result(), "run-1", "task-1")
    [record] = [r for r in caplog.records if r.name == "eskit_tasks.compaction"]
    assert record.levelno == logging.INFO
    assert json.loads(record.getMessage()) == {
        "event": "compaction",
        "stream_type": "account",
        "stream_id": "a-1",
        "outcome": "compacted",
        "head_version": 120,
        "snapshot_version": 100,
        "events_deleted": 100,
        "events_retained": 20,
        "bytes_reclaimed": 4096,
        "duration_ms": 12.5,
        "compaction_id": "c-1",
        "recovered": False,
        "held_back_by": None,
        "archive_uri": None,
        "run_id": "run-1",
        "task_id": "task-1",
        "error_type": None,
        "error": None,
    }


def test_log_line_masks_passwords_in_the_error(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="eskit_tasks.compaction")
    error = "cannot reach redis://u:secret@h:6379/0 nor postgresql://eskit:p%40ss@db/events"
    log_result(_result(outcome=Outcome.FAILED, error=error, error_type="X"), None)
    [record] = [r for r in caplog.records if r.name == "eskit_tasks.compaction"]
    assert record.levelno == logging.WARNING
    line = JsonLineFormatter().format(record)
    assert "secret" not in line
    assert "p%40ss" not in line
    assert json.loads(line)["error"] == (
        "cannot reach redis://u:***@h:6379/0 nor postgresql://eskit:***@db/events"
    )


def test_verification_failed_is_logged_as_an_error(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="eskit_tasks.compaction")
    log_result(_result(outcome=Outcome.VERIFICATION_FAILED, events_deleted=0), None)
    [record] = [r for r in caplog.records if r.name == "eskit_tasks.compaction"]
    assert record.levelno == logging.ERROR


def test_json_line_formatter_writes_a_bare_object_per_record():
    record = logging.LogRecord(
        "eskit_tasks.compaction", logging.INFO, __file__, 1, "%s", ("x",), None
    )
    record.eskit_fields = {"event": "compaction", "outcome": "compacted"}
    line = JsonLineFormatter().format(record)
    assert "\n" not in line
    parsed = json.loads(line)
    assert parsed["ts"].endswith("Z")
    assert (parsed["level"], parsed["logger"], parsed["outcome"]) == (
        "INFO",
        "eskit_tasks.compaction",
        "compacted",
    )
    plain = logging.LogRecord("other", logging.WARNING, __file__, 1, "hello %s", ("you",), None)
    assert json.loads(JsonLineFormatter().format(plain))["message"] == "hello you"


# -- settings ---------------------------------------------------------------------------


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith(("ESKIT_", "CELERY_")):
            monkeypatch.delenv(name)
    return monkeypatch


def test_metrics_are_off_unless_a_port_is_set(env: pytest.MonkeyPatch):
    assert EskitSettings().metrics_port is None
    env.setenv("ESKIT_METRICS_PORT", "")  # as compose writes an unset variable
    assert EskitSettings().metrics_port is None
    env.setenv("ESKIT_METRICS_PORT", "9808")
    env.setenv("ESKIT_METRICS_DIR", "/var/run/eskit-metrics")
    s = EskitSettings()
    assert (s.metrics_port, s.metrics_address, s.metrics_dir) == (
        9808,
        "0.0.0.0",  # noqa: S104 -- the documented default, so Prometheus can scrape
        "/var/run/eskit-metrics",
    )


@pytest.mark.parametrize("port", ["0", "65536", "nine"])
def test_an_invalid_metrics_port_is_refused(env: pytest.MonkeyPatch, port: str):
    env.setenv("ESKIT_METRICS_PORT", port)
    with pytest.raises(ValidationError, match="metrics_port"):
        EskitSettings()


# -- the metrics module in a process of its own -----------------------------------------


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PROMETHEUS")}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        env={**environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_without_a_port_recording_costs_nothing():
    """No port: prometheus-client is never imported and recording is a no-op."""
    done = _python(
        """
        import sys
        from eskit_tasks.fleet import metrics
        import eskit_tasks.tasks  # the whole fleet, imported as a worker does
        from eskit_tasks.domain.result import CompactionResult, Outcome
        from eskit_tasks.fleet.settings import get_settings
        assert metrics.start_worker_metrics(get_settings()) is None
        result = CompactionResult(stream_type="t", stream_id="s", outcome=Outcome.COMPACTED,
                                  events_deleted=3, compaction_id="c")
        metrics.record_compaction(result, timed=True)
        metrics.record_lock_wait("t")
        metrics.record_run_started()
        metrics.record_run_finished(error=False)
        assert not metrics.enabled() and metrics.describe() is None
        assert "prometheus_client" not in sys.modules, "imported without a port"
        print("ok")
        """,
        ESKIT_METRICS_PORT="",
    )
    assert done.stdout.strip() == "ok", done.stderr


def test_forked_children_are_added_up_and_a_configured_dir_is_emptied(tmp_path: Path):
    """The main process serves what forked children recorded; a configured directory is
    emptied at start (stale counts) and kept at stop. The stream_type label is the
    registered type, or ``other`` for anything else."""
    directory = tmp_path / "metrics"
    directory.mkdir()
    (directory / "counter_999999.db").write_bytes(b"stale")
    port = free_port()
    done = _python(
        """
        import os, sys, urllib.request
        from eskit_tasks.fleet import metrics
        from eskit_tasks.domain.result import CompactionResult, Outcome
        from eskit_tasks.fleet.settings import get_settings
        from eskit_tasks import register_decider
        from eskit_tasks.testing.deciders import Ledger
        register_decider("ledger", Ledger(), dict)
        port = metrics.start_worker_metrics(get_settings())
        for n in range(2):
            pid = os.fork()
            if pid == 0:
                metrics.child_started()
                r = CompactionResult(stream_type="t", stream_id=str(n), outcome=Outcome.COMPACTED,
                                     events_deleted=10, bytes_reclaimed=100, duration_ms=5,
                                     compaction_id="c")
                metrics.record_compaction(r, timed=True)
                metrics.record_compaction(r.model_copy(update={"stream_type": "ledger"}),
                                          timed=False)
                metrics.record_lock_wait("t")
                metrics.record_run_started()
                metrics.record_run_finished(error=n == 1)
                metrics.child_exited(os.getpid())
                os._exit(0)
            os.waitpid(pid, 0)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
            sys.stdout.write(page.read().decode())
        metrics.stop_worker_metrics()
        """,
        ESKIT_METRICS_PORT=str(port),
        ESKIT_METRICS_ADDRESS="127.0.0.1",
        ESKIT_METRICS_DIR=str(directory),
    )
    assert done.returncode == 0, done.stderr
    page = done.stdout
    assert 'eskit_compactions_total{outcome="compacted",stream_type="other"} 2.0' in page
    assert 'eskit_compactions_total{outcome="compacted",stream_type="ledger"} 2.0' in page
    assert 'eskit_compactions_total{outcome="failed",stream_type="ledger"} 0.0' in page
    assert 'eskit_compactions_total{outcome="failed",stream_type="other"} 0.0' in page
    assert 'eskit_events_deleted_total{stream_type="other"} 20.0' in page
    assert 'eskit_events_deleted_total{stream_type="ledger"} 20.0' in page
    assert 'eskit_bytes_reclaimed_total{stream_type="other"} 200.0' in page
    assert 'eskit_lock_waits_total{stream_type="other"} 2.0' in page
    assert 'eskit_lock_waits_total{stream_type="ledger"} 0.0' in page
    assert "eskit_runs_started_total 2.0" in page
    assert 'eskit_runs_finished_total{result="complete"} 1.0' in page
    assert 'eskit_runs_finished_total{result="error"} 1.0' in page
    bucket = "eskit_compaction_duration_seconds_bucket"
    assert f'{bucket}{{le="0.005",outcome="compacted",stream_type="other"}} 2.0' in page
    assert f'{bucket}{{le="0.0025",outcome="compacted",stream_type="other"}} 0.0' in page
    assert 'stream_type="t"' not in page  # not registered: "other"
    assert directory.is_dir()  # configured: kept
    assert not (directory / "counter_999999.db").exists()  # but emptied at start


# -- the stream_type label, the runs counters, beat -----------------------------------


def test_only_registered_stream_types_become_label_values():
    from eskit_tasks import register_decider
    from eskit_tasks.core.registry import unregister_decider
    from eskit_tasks.fleet.metrics import stream_type_label, stream_type_labels
    from eskit_tasks.testing.deciders import Ledger

    register_decider("metered", Ledger(), dict)
    try:
        assert stream_type_label("metered") == "metered"
        assert stream_type_label("made-up-by-a-message") == "other"
        assert stream_type_label("") == "other"
        assert {"metered", "other"} <= set(stream_type_labels())
    finally:
        unregister_decider("metered")
    assert stream_type_label("metered") == "other"


class _Beat:
    """A stand-in for beat's Service: what BeatCollector reads of it."""

    def __init__(self, schedule: dict[str, object]) -> None:
        self.scheduler = type("Scheduler", (), {"schedule": schedule})()


def test_beat_collector_reports_each_entrys_last_and_next_run():
    from datetime import UTC, datetime, timedelta

    from celery import Celery
    from celery.beat import ScheduleEntry
    from celery.schedules import schedule

    from eskit_tasks.fleet.metrics import BeatCollector

    app = Celery("beat-metrics", set_as_current=False)
    ran = datetime.now(UTC) - timedelta(seconds=30)
    every_minute = ScheduleEntry(
        name="every-minute",
        task="eskit_tasks.fan_out",
        schedule=schedule(timedelta(minutes=1), app=app),
        last_run_at=ran,
        total_run_count=3,
        app=app,
    )
    never_ran = ScheduleEntry(
        name="hourly",
        task="eskit_tasks.fan_out",
        schedule=schedule(timedelta(hours=1), app=app),
        app=app,
    )
    families = {
        f.name: {s.labels["entry"]: s.value for s in f.samples}
        for f in BeatCollector(_Beat({"every-minute": every_minute, "hourly": never_ran})).collect()
    }
    last = families["eskit_beat_last_run_timestamp_seconds"]
    upcoming = families["eskit_beat_next_run_timestamp_seconds"]
    assert last == {"every-minute": pytest.approx(ran.timestamp())}  # hourly: never ran
    assert upcoming["every-minute"] == pytest.approx(ran.timestamp() + 60, abs=2)
    assert upcoming["hourly"] == pytest.approx(datetime.now(UTC).timestamp() + 3600, abs=5)


def test_beat_collector_answers_when_the_schedule_cannot_be_read(monkeypatch: pytest.MonkeyPatch):
    from eskit_tasks.fleet import metrics

    warned: list[str] = []
    monkeypatch.setattr(metrics.log, "warning", lambda msg, *args: warned.append(msg % args))

    class Broken:
        @property
        def scheduler(self) -> object:
            raise OSError("schedule file locked")

    families = list(metrics.BeatCollector(Broken()).collect())
    assert [f.samples for f in families] == [[], []]
    assert warned == ["eskit-tasks: could not read beat's schedule: schedule file locked"]
