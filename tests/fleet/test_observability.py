"""What operators see of a real fleet: Prometheus metrics, one JSON log line per
compaction, and Celery task events (for Flower)."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from eskit_tasks import CompactionNeedsAttention, Outcome, compact_all, compaction_result
from eskit_tasks.fleet.app import app
from eskit_tasks.fleet.locks import StreamLock
from eskit_tasks.fleet.runs import compaction_result_of
from eskit_tasks.tasks import compact_stream
from eskit_tasks.testing.services import Worker, free_port
from tests.fleet.conftest import Fleet, results_in_backend, wait_until

LOG_FIELDS = {
    "ts",
    "level",
    "logger",
    "event",
    "stream_type",
    "stream_id",
    "outcome",
    "head_version",
    "snapshot_version",
    "events_deleted",
    "events_retained",
    "bytes_reclaimed",
    "duration_ms",
    "compaction_id",
    "recovered",
    "held_back_by",
    "archive_uri",
    "run_id",
    "task_id",
    "error_type",
    "error",
}


# -- helpers --------------------------------------------------------------------------


def scrape(port: int) -> tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    """The /metrics page of a worker, and its samples by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        page = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(page):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return page, samples


def compaction_lines(worker: Worker) -> list[dict[str, Any]]:
    """The worker's compaction log lines: bare JSON objects, one per line."""
    found = []
    for line in worker.text().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("event") == "compaction":
                found.append(record)
    return found


def process_tree(pid: int) -> list[int]:
    """``pid`` and its children (a prefork worker's pool processes)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return [pid, *children]


def listening_ports(pid: int) -> set[int]:
    """TCP ports a process listens on (from its socket descriptors and /proc/net/tcp*)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().name
        except OSError:
            continue
        if m := re.fullmatch(r"socket:\[(\d+)\]", target):
            inodes.add(m[1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            cols = row.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def metrics_dir(worker: Worker) -> Path:
    m = re.search(r"children write to (\S+)\)", worker.text())
    assert m, worker.text()[-3000:]
    return Path(m[1])


# -- metrics --------------------------------------------------------------------------


def test_metrics_count_compactions_by_outcome_across_prefork_children(fleet: Fleet):
    port = free_port()
    worker = fleet.worker(
        "metrics", concurrency=2, ESKIT_METRICS_PORT=str(port), ESKIT_METRICS_ADDRESS="127.0.0.1"
    )
    fleet.seed("ledger", "a", 300)
    fleet.seed("ledger", "b", 200)
    fleet.seed("ledger", "c", 50)
    fleet.seed("ghost", "g", 5)  # no decider: failed before compacting

    _, before = scrape(port)
    # Every outcome of every registered stream type (and "other") from the start, at 0.
    for stream_type in ("ledger", "slow", "lossy", "other"):
        for outcome in Outcome:
            labels = (("outcome", outcome.value), ("stream_type", stream_type))
            assert before[("eskit_compactions_total", labels)] == 0
        assert before[("eskit_lock_waits_total", (("stream_type", stream_type),))] == 0
        assert before[("eskit_events_deleted_total", (("stream_type", stream_type),))] == 0

    sent = [
        compact_stream.delay("ledger", "a"),
        compact_stream.delay("ledger", "b", retain_last=20),
        compact_stream.delay("ledger", "c", dry_run=True),
        compact_stream.delay("ghost", "g"),
    ]
    results = [compaction_result(r.id, timeout=60) or {} for r in sent]
    again = compact_stream.delay("ledger", "a")
    results.append(again.get(timeout=60))
    assert [r["outcome"] for r in results] == [
        "compacted",
        "compacted",
        "dry_run",
        "failed",
        "nothing_to_compact",
    ], fleet.worker_logs()

    page, after = scrape(port)

    def count(outcome: str, stream_type: str = "ledger") -> float:
        labels = (("outcome", outcome), ("stream_type", stream_type))
        return after[("eskit_compactions_total", labels)]

    assert {o.value: count(o.value) for o in Outcome} == {
        "compacted": 2,
        "dry_run": 1,
        "nothing_to_compact": 1,
        "failed": 0,
        "verification_failed": 0,
        "fenced": 0,
        "locked": 0,
        "cancelled": 0,
    }
    assert count("failed", "other") == 1  # ghost: not registered, so "other"
    assert ("eskit_compactions_total", (("outcome", "failed"), ("stream_type", "ghost"))) not in (
        after
    )
    compacted = [r for r in results if r["outcome"] == "compacted"]
    ledger = (("stream_type", "ledger"),)
    assert after[("eskit_events_deleted_total", ledger)] == 300 + 180  # not the dry run's 50
    assert after[("eskit_bytes_reclaimed_total", ledger)] == sum(
        r["bytes_reclaimed"] for r in compacted
    )
    assert after[("eskit_bytes_reclaimed_total", ledger)] > 0

    # The histogram observes every attempt the compactor ran, by outcome.
    def hist(suffix: str, outcome: str, le: str | None = None) -> float:
        labels = [("outcome", outcome), ("stream_type", "ledger")] + ([("le", le)] if le else [])
        return after.get(("eskit_compaction_duration_seconds" + suffix, tuple(sorted(labels))), 0)

    assert hist("_count", "compacted") == 2
    assert hist("_count", "dry_run") == 1
    assert hist("_count", "nothing_to_compact") == 1
    assert hist("_count", "failed") == 0  # no decider: never reached the compactor
    assert hist("_bucket", "compacted", "+Inf") == 2
    assert hist("_bucket", "compacted", "3600.0") == 2
    assert hist("_sum", "compacted") == pytest.approx(
        sum(r["duration_ms"] for r in compacted) / 1000, rel=1e-6, abs=1e-6
    )
    assert '_bucket{le="0.001",outcome="compacted",stream_type="ledger"}' in page
    assert "://" not in page  # no URL (and so no password) reaches the page

    # Only the main process listens; the children write files the server adds up.
    main, *children = process_tree(worker.proc.pid)
    assert len(children) == 2
    assert listening_ports(main) == {port}
    assert all(listening_ports(child) == set() for child in children)
    directory = metrics_dir(worker)
    assert directory.is_dir()
    worker.stop()
    assert not directory.exists()  # the temporary directory goes with the worker


def test_lock_waits_and_locked_outcome(fleet: Fleet):
    port = free_port()
    fleet.worker(
        "waiter",
        concurrency=1,
        ESKIT_METRICS_PORT=str(port),
        ESKIT_METRICS_ADDRESS="127.0.0.1",
        ESKIT_LOCKED_MAX_RETRIES="2",
    )
    fleet.seed("ledger", "held", 30)
    client = redis.Redis(port=fleet.state.port)
    holder = StreamLock(client, "ledger", "held", ttl=30, owner="someone-else")
    assert holder.acquire()
    try:
        result = compaction_result(compact_stream.delay("ledger", "held").id, timeout=60)
    finally:
        holder.release()
        client.close()
    assert result is not None and result["outcome"] == "locked", result
    _, samples = scrape(port)
    ledger = (("stream_type", "ledger"),)
    assert samples[("eskit_lock_waits_total", ledger)] == 3  # the first try and two retries
    assert samples[("eskit_compactions_total", (("outcome", "locked"), *ledger))] == 1
    assert samples[("eskit_events_deleted_total", ledger)] == 0


def test_runs_started_and_finished_are_counted_once_each(fleet: Fleet):
    """A run counts as started when its fan-out sent its first page and as finished
    when it ended: after its finishing step (it deleted events), on the spot (a dry
    run), or stopped by an error — once each, over several pages."""
    from eskit_tasks.fleet.progress import new_run_id
    from eskit_tasks.tasks import fan_out

    port = free_port()
    fleet.worker(
        "runs",
        concurrency=2,
        ESKIT_METRICS_PORT=str(port),
        ESKIT_METRICS_ADDRESS="127.0.0.1",
        ESKIT_FANOUT_PAGE_SIZE="2",  # three pages for five streams
    )
    for n in range(5):
        fleet.seed("ledger", f"run-{n}", 10)
    _, before = scrape(port)
    assert before[("eskit_runs_started_total", ())] == 0
    assert before[("eskit_runs_finished_total", (("result", "complete"),))] == 0

    deleting = compact_all(min_events=1, retain_last=2).wait(timeout=90)
    dry = compact_all(min_events=1, dry_run=True).wait(timeout=90)
    assert deleting.reclaim is not None and dry.reclaim is None, (deleting, dry)
    assert deleting.done == 5 and dry.finished and dry.error is None
    bad = new_run_id()
    fan_out.apply_async(kwargs={"run_id": bad, "min_events": 0}).get(timeout=60)
    fan_out.apply_async(kwargs={"run_id": bad, "min_events": 0}).get(timeout=60)  # again

    _, after = scrape(port)
    assert after[("eskit_runs_started_total", ())] == 2
    assert after[("eskit_runs_finished_total", (("result", "complete"),))] == 2
    assert after[("eskit_runs_finished_total", (("result", "error"),))] == 1
    ledger = (("outcome", "compacted"), ("stream_type", "ledger"))
    assert after[("eskit_compactions_total", ledger)] == 5
    assert after[("eskit_events_deleted_total", (("stream_type", "ledger"),))] == 5 * 8


def test_without_a_metrics_port_a_worker_listens_on_nothing(fleet: Fleet):
    fleet.seed("ledger", "quiet", 20)
    worker = fleet.worker("plain", concurrency=2)
    assert compact_stream.delay("ledger", "quiet").get(timeout=60)["outcome"] == "compacted"
    tree = process_tree(worker.proc.pid)
    assert len(tree) == 3
    assert all(listening_ports(pid) == set() for pid in tree)
    assert "metrics on" not in worker.text()
    assert "PROMETHEUS_MULTIPROC_DIR" not in Path(f"/proc/{worker.proc.pid}/environ").read_text()


def test_a_metrics_port_in_use_stops_the_worker_at_start(fleet: Fleet):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match="exited at start") as info:
            fleet.worker(
                "clash",
                concurrency=1,
                ESKIT_METRICS_PORT=str(port),
                ESKIT_METRICS_ADDRESS="127.0.0.1",
            )
    assert "ESKIT_METRICS_PORT" in str(info.value)
    assert f"127.0.0.1:{port}" in str(info.value)


# -- one JSON log line per compaction -------------------------------------------------


def test_one_json_log_line_per_compaction_with_run_id(fleet: Fleet):
    for n in range(3):
        fleet.seed("ledger", f"r-{n}", 40 + n)
    fleet.seed("ghost", "nobody", 10)
    worker = fleet.worker("logs", concurrency=2)
    run = compact_all(min_events=1, retain_last=5)
    final = run.wait(timeout=60)
    assert final.outcomes == {"compacted": 3, "failed": 1}, fleet.worker_logs()
    direct = compact_stream.delay("ledger", "r-0", retain_last=5)
    direct_result = direct.get(timeout=60)

    lines = compaction_lines(worker)
    assert len(lines) == 5, worker.text()[-4000:]
    for line in lines:
        assert set(line) == LOG_FIELDS
        assert line["logger"] == "eskit_tasks.compaction"
        assert line["ts"].endswith("Z")

    by_stream = {(x["stream_type"], x["stream_id"], x["run_id"]): x for x in lines}
    for n in range(3):
        line = by_stream[("ledger", f"r-{n}", run.run_id)]
        head = 40 + n
        assert line["outcome"] == "compacted"
        assert line["level"] == "INFO"
        assert (line["head_version"], line["snapshot_version"]) == (head, head - 5)
        assert (line["events_deleted"], line["events_retained"]) == (head - 5, 5)
        assert line["bytes_reclaimed"] > 0
        assert line["duration_ms"] > 0
        assert (line["error"], line["recovered"]) == (None, False)
        [row] = fleet.store.compaction_log("ledger", f"r-{n}")
        assert line["compaction_id"] == row.compaction_id

    ghost = by_stream[("ghost", "nobody", run.run_id)]
    assert (ghost["outcome"], ghost["level"]) == ("failed", "WARNING")
    assert "ghost" in ghost["error"]
    assert ghost["error_type"]

    line = by_stream[("ledger", "r-0", None)]
    assert line["outcome"] == "nothing_to_compact"
    assert line["task_id"] == direct.id
    assert line["compaction_id"] == direct_result["compaction_id"]
    assert line["duration_ms"] == direct_result["duration_ms"]
    # The worker's other lines keep Celery's usual format.
    assert re.search(r"^\[.*INFO/MainProcess\].* ready\.", worker.text(), flags=re.MULTILINE)


# -- task events ----------------------------------------------------------------------


def test_task_events_are_off_until_a_monitor_enables_them_as_flower_does(fleet: Fleet):
    """No task events by default (three broker round trips per task); `enable_events`
    — what Flower broadcasts every few seconds — turns on received/started/succeeded.
    Publishers never send task-sent events (they would double the fan-out's round
    trips)."""
    fleet.seed("ledger", "watched", 10)
    # Started as in docker/compose.yaml: with heartbeats, so its event dispatcher runs
    # (a worker without heartbeats and without task events has none to enable).
    fleet.worker("events", concurrency=1, options=("--without-mingle",))
    events: list[dict[str, Any]] = []
    errors: list[BaseException] = []

    def task_events() -> dict[str, set[str]]:
        by_task: dict[str, set[str]] = {}
        for e in list(events):
            if "uuid" in e:
                by_task.setdefault(e["uuid"], set()).add(e["type"])
        return by_task

    with app.connection_for_read() as conn:
        receiver = app.events.Receiver(conn, handlers={"*": events.append})

        def capture() -> None:
            try:
                receiver.capture(limit=None, timeout=None, wakeup=False)
            except BaseException as exc:  # reported by the test, not lost in the thread
                errors.append(exc)

        thread = threading.Thread(target=capture, daemon=True)
        thread.start()
        try:
            # The receiver subscribes asynchronously: first make sure it hears events
            # (a probe of our own), so the silence below means something.
            def probe_heard() -> bool:
                with app.events.default_dispatcher() as dispatcher:
                    dispatcher.send("eskit-probe")
                return any(e["type"] == "eskit-probe" for e in list(events))

            wait_until(probe_heard, 30, "the event receiver to listen", poll=0.3)
            quiet = [compact_stream.delay("ledger", "watched") for _ in range(3)]
            for result in quiet:
                result.get(timeout=30)
            time.sleep(1.0)
            assert task_events() == {}, "task events sent without anybody enabling them"
            quiet_ids = {r.id for r in quiet}

            replies = app.control.enable_events(reply=True, timeout=5)
            assert any("events@" in name for reply in replies for name in reply), replies

            def all_events_of_one_task() -> str | None:
                wanted = {"task-received", "task-started", "task-succeeded"}
                done = [t for t, kinds in task_events().items() if wanted <= kinds]
                if not done:
                    compact_stream.delay("ledger", "watched").get(timeout=30)
                return done[0] if done else None

            task_id = wait_until(all_events_of_one_task, 60, "task events", poll=0.5)
        finally:
            receiver.should_stop = True
            thread.join(10)
            app.control.disable_events()
    assert not errors, errors
    assert not quiet_ids & set(task_events()), "events of tasks run before enable_events"
    succeeded = next(
        e for e in events if e.get("uuid") == task_id and e["type"] == "task-succeeded"
    )
    assert succeeded["hostname"].startswith("events@")
    assert not [e for e in events if e["type"] == "task-sent"]
    received = next(e for e in events if e.get("uuid") == task_id and e["type"] == "task-received")
    assert received["name"] == "eskit_tasks.compact_stream"
    assert time.time() - succeeded["timestamp"] < 120


class TaskEvents:
    """Celery's task events as a monitor (Flower) receives them, captured in a thread."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.errors: list[BaseException] = []
        self._conn: Any = None
        self._receiver: Any = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> TaskEvents:
        self._conn = app.connection_for_read()
        self._receiver = app.events.Receiver(self._conn, handlers={"*": self.events.append})

        def capture() -> None:
            try:
                self._receiver.capture(limit=None, timeout=None, wakeup=False)
            except BaseException as exc:  # reported by the test, not lost in the thread
                self.errors.append(exc)

        self._thread = threading.Thread(target=capture, daemon=True)
        self._thread.start()

        def probe_heard() -> bool:  # the receiver subscribes asynchronously
            with app.events.default_dispatcher() as dispatcher:
                dispatcher.send("eskit-probe")
            return any(e["type"] == "eskit-probe" for e in list(self.events))

        wait_until(probe_heard, 30, "the event receiver to listen", poll=0.3)
        return self

    def __exit__(self, *_: object) -> None:
        self._receiver.should_stop = True
        assert self._thread is not None
        self._thread.join(10)
        self._conn.release()

    def final(self, task_id: str) -> dict[str, Any] | None:
        """The task's last event that Flower turns into a final state, if any yet."""
        ends = {"task-succeeded", "task-failed"}
        found = [e for e in list(self.events) if e.get("uuid") == task_id and e["type"] in ends]
        return found[-1] if found else None


def test_flower_shows_a_compaction_that_needs_attention_as_failed(fleet: Fleet):
    """A compaction whose outcome needs attention ends as FAILURE — in the task events
    Flower builds its view from, and in the result backend — with its whole result still
    readable (compaction_result); a compaction is SUCCESS and .get() returns it. The
    failure is deliberate: logged as expected (no traceback) and counted once."""
    fleet.seed("ledger", "fine", 20)
    fleet.seed("ghost", "g", 5)  # no decider: failed
    fleet.seed("ledger", "held", 5)
    worker = fleet.worker(
        "flower",
        concurrency=1,
        options=("--without-gossip", "--without-mingle", "-E"),  # task events on
        ESKIT_LOCKED_MAX_RETRIES="0",
    )
    client = redis.Redis(port=fleet.state.port)
    holder = StreamLock(client, "ledger", "held", ttl=60, owner="someone-else")
    assert holder.acquire()
    try:
        with TaskEvents() as monitor:
            good = compact_stream.delay("ledger", "fine", retain_last=5)
            ghost = compact_stream.delay("ghost", "g")
            locked = compact_stream.delay("ledger", "held")
            assert good.get(timeout=60)["outcome"] == "compacted", fleet.worker_logs()
            with pytest.raises(CompactionNeedsAttention, match=r"^failed ghost/g: "):
                ghost.get(timeout=60)
            with pytest.raises(CompactionNeedsAttention, match="locked by task someone-else"):
                locked.get(timeout=60)
            ids = (good.id, ghost.id, locked.id)
            finals = wait_until(
                lambda: all(monitor.final(i) for i in ids) and [monitor.final(i) for i in ids],
                30,
                "the three tasks' final events",
            )
    finally:
        holder.release()
        client.close()
    assert not monitor.errors, monitor.errors
    assert [e["type"] for e in finals] == ["task-succeeded", "task-failed", "task-failed"]
    assert finals[1]["exception"].startswith("CompactionNeedsAttention(")
    assert "failed ghost/g: no decider" in finals[1]["exception"]
    assert "'outcome': 'locked'" in finals[2]["exception"]

    stored = results_in_backend(fleet.broker)
    assert [stored[i]["status"] for i in ids] == ["SUCCESS", "FAILURE", "FAILURE"]
    assert stored[ghost.id]["result"]["exc_type"] == "CompactionNeedsAttention"
    got = {i: compaction_result(i) for i in ids}
    assert got[good.id] == good.get() == compaction_result_of(stored[good.id])
    ghost_result, locked_result = got[ghost.id], got[locked.id]
    assert ghost_result is not None and locked_result is not None
    assert (ghost_result["outcome"], ghost_result["error_type"]) == (
        "failed",
        "UnknownStreamTypeError",
    )
    assert (locked_result["outcome"], locked_result["events_deleted"]) == ("locked", 0)
    assert compaction_result_of(stored[locked.id]) == locked_result
    assert fleet.live_versions("ledger", "held") == [1, 2, 3, 4, 5]

    # Deliberate: Celery logs it as expected, without a traceback, and the task_failure
    # handler does not account for it again (one log line per attempt).
    text = worker.text()
    assert text.count("raised expected: CompactionNeedsAttention") == 2, text[-3000:]
    assert "raised unexpected" not in text and "Traceback" not in text, text[-3000:]
    lines = compaction_lines(worker)
    assert sorted((x["stream_id"], x["outcome"]) for x in lines) == [
        ("fine", "compacted"),
        ("g", "failed"),
        ("held", "locked"),
    ]


# -- celery beat ----------------------------------------------------------------------

BEAT_CONFIG = """\
from eskit_tasks.fleet.celeryconfig import *  # noqa: F403

beat_schedule = {
    **beat_schedule,  # noqa: F405 -- the nightly entry, never due during the test
    "every-second": {"task": "eskit_tasks.fan_out", "schedule": 1.0, "kwargs": {"dry_run": True}},
}
"""


def test_beat_serves_when_each_entry_last_ran_and_is_next_due(fleet: Fleet, tmp_path: Path):
    """`celery beat` with ESKIT_METRICS_PORT serves its schedule's health: an entry that
    ran has its last run, every entry its next due time (the nightly one: tonight)."""
    import subprocess

    from eskit_tasks.testing.services import CELERY, worker_env
    from tests import REPO

    (tmp_path / "beat_config_for_test.py").write_text(BEAT_CONFIG)
    port = free_port()
    env = worker_env(
        REPO,
        ESKIT_METRICS_PORT=str(port),
        ESKIT_METRICS_ADDRESS="127.0.0.1",
        ESKIT_CELERY_CONFIG="beat_config_for_test",
    )
    env["PYTHONPATH"] = f"{tmp_path}:{env['PYTHONPATH']}"
    log = tmp_path / "beat.log"
    with log.open("wb") as out:
        beat = subprocess.Popen(
            [CELERY, "-A", "eskit_tasks", "beat", "-l", "INFO", "-s", str(tmp_path / "sched")],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:

        def ran_twice() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
            if beat.poll() is not None:
                raise AssertionError(log.read_text()[-3000:])
            try:
                samples = scrape(port)[1]
            except OSError:
                return None
            return samples if log.read_text().count("Sending due task every-second") >= 2 else None

        samples = wait_until(ran_twice, 60, "beat to send the entry twice", poll=0.3)
    finally:
        beat.terminate()
        beat.wait(15)
    now = time.time()
    every = (("entry", "every-second"),)
    nightly = (("entry", "eskit-nightly-compaction"),)
    last = samples[("eskit_beat_last_run_timestamp_seconds", every)]
    assert now - 30 < last <= now
    assert last - 2 < samples[("eskit_beat_next_run_timestamp_seconds", every)] < now + 5
    assert ("eskit_beat_last_run_timestamp_seconds", nightly) not in samples  # never ran
    tonight = samples[("eskit_beat_next_run_timestamp_seconds", nightly)]
    assert now < tonight <= now + 24 * 3600 + 60
    assert "beat metrics on http://127.0.0.1:" in log.read_text()
