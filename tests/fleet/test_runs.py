"""Fleet runs beyond the happy path: bad input, backpressure, RabbitMQ, beat, a shell."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import sqlalchemy as sa
from kombu import Connection

from eskit_tasks import CompactionRun, NewEvent, compact_all, compaction_result
from eskit_tasks.fleet.app import app, resources
from eskit_tasks.fleet.fan_out import queue_depth
from eskit_tasks.stores.schema import events, streams
from eskit_tasks.tasks import compact_stream, fan_out
from eskit_tasks.testing.services import CELERY, worker_env
from tests import REPO
from tests.fleet.conftest import Fleet, wait_until

RABBITMQ = "amqp://guest:guest@127.0.0.1:5672//"


def _corrupt(fleet: Fleet, stream_type: str, stream_id: str, version: int) -> None:
    with fleet.store.engine.begin() as conn:
        pk = conn.execute(
            sa.select(streams.c.pk).where(
                streams.c.stream_type == stream_type, streams.c.stream_id == stream_id
            )
        ).scalar_one()
        conn.execute(
            sa.update(events)
            .where(events.c.stream_pk == pk, events.c.version == version)
            .values(data="{broken")
        )


def test_bad_streams_are_reported_failed_and_keep_all_their_events(fleet: Fleet):
    for n in range(5):
        fleet.seed("ledger", f"good-{n}", 10)
    fleet.seed("ledger", "corrupt", 10)
    _corrupt(fleet, "ledger", "corrupt", 4)
    fleet.seed("ghost", "no-decider", 10)
    fleet.store.append(
        "lossy", "sets", [NewEvent("Tagged", {"tag": t}) for t in "abc"], expected_version=0
    )
    fleet.worker("w1")

    run = compact_all(min_events=1)
    final = run.wait(timeout=120)
    assert final.outcomes == {"compacted": 5, "failed": 2, "verification_failed": 1}
    summary = run.summary()
    failed = {(f.stream_type, f.stream_id): f for f in summary.failed_streams}
    assert set(failed) == {("ledger", "corrupt"), ("ghost", "no-decider"), ("lossy", "sets")}
    assert "ledger/corrupt version 4" in failed[("ledger", "corrupt")].error
    assert "no decider registered for stream type 'ghost'" in failed[("ghost", "no-decider")].error
    assert "ESKIT_DECIDER_MODULES" in failed[("ghost", "no-decider")].error
    assert failed[("lossy", "sets")].outcome == "verification_failed"
    assert fleet.store.head_version("ghost", "no-decider") == 10
    for stream_type, stream_id, n in [("ghost", "no-decider", 10), ("lossy", "sets", 3)]:
        assert fleet.live_versions(stream_type, stream_id) == list(range(1, n + 1))
    with fleet.store.engine.connect() as conn:
        assert (
            conn.execute(
                sa.select(sa.func.count())
                .select_from(events)
                .join(streams, streams.c.pk == events.c.stream_pk)
                .where(streams.c.stream_id == "corrupt")
            ).scalar_one()
            == 10
        )
    assert fleet.store.compaction_log("ledger", "corrupt") == []


def test_invalid_policy_sent_to_a_worker_is_a_failed_result_not_a_crash(fleet: Fleet):
    fleet.seed("ledger", "a-1", 5)
    fleet.worker("w1", concurrency=1)
    sent = compact_stream.delay("ledger", "a-1", retain_last=-3)
    result = compaction_result(sent.id, timeout=60)
    assert sent.state == "FAILURE"  # what Flower shows: the outcome needs attention
    assert result is not None and result["outcome"] == "failed"
    assert "retain_last" in result["error"]
    assert fleet.live_versions("ledger", "a-1") == [1, 2, 3, 4, 5]


def test_fan_out_keeps_the_queue_under_its_high_water_mark(fleet: Fleet):
    for n in range(90):
        fleet.seed("slow", f"bp-{n:02d}", 20)
    fleet.worker(
        "w1",
        concurrency=2,
        ESKIT_TEST_SLOW_S="0.003",
        ESKIT_FANOUT_HIGH_WATER="12",
        ESKIT_FANOUT_PAGE_SIZE="5",
        ESKIT_BATCH_EVENTS="0",  # the mark counts messages: here, one per stream
    )
    depths: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            depths.append(queue_depth(app, "compaction"))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        run = compact_all(min_events=1)
        final = run.wait(timeout=180)
    finally:
        stop.set()
        sampler.join()
    assert final.outcomes == {"compacted": 90}
    assert max(depths) <= 12, max(depths)
    assert final.max_queue_depth <= 12
    assert final.max_queue_depth >= 5, "the fan-out never found the queue busy"
    fleet.assert_nothing_lost()


def test_max_streams_and_stream_types_limit_a_run(fleet: Fleet):
    for n in range(12):
        fleet.seed("ledger", f"l-{n:02d}", 5)
    for n in range(4):
        fleet.seed("slow", f"s-{n}", 5)
    fleet.worker("w1", ESKIT_TEST_SLOW_S="0")
    final = compact_all(stream_types=["ledger"], max_streams=7).wait(timeout=60)
    assert (final.candidates, final.outcomes) == (7, {"compacted": 7})
    assert all(fleet.live_versions("slow", f"s-{n}") == [1, 2, 3, 4, 5] for n in range(4))


def test_a_fan_out_started_without_run_id_is_followable(fleet: Fleet):
    """Beat starts fan_out with no run id: the run takes its id from the task id."""
    for n in range(6):
        fleet.seed("ledger", f"b-{n}", 4)
    fleet.worker("w1")
    task_id = str(uuid.uuid4())
    fan_out.apply_async(kwargs={"min_events": 2, "dry_run": True}, task_id=task_id)
    run = CompactionRun(uuid.UUID(task_id).hex)
    wait_until(lambda: resources().progress.exists(run.run_id), 30, "the run to start")
    final = run.wait(timeout=60)
    assert final.outcomes == {"dry_run": 6}
    assert final.dry_run_events == 24 and final.events_deleted == 0
    assert fleet.live_versions("ledger", "b-0") == [1, 2, 3, 4]


def test_rabbitmq_broker_runs_a_fan_out_triggered_from_a_python_shell(fleet: Fleet):
    suffix = uuid.uuid4().hex[:8]
    env = {
        "CELERY_BROKER_URL": RABBITMQ,
        "ESKIT_COMPACTION_QUEUE": f"eskit-test-compaction-{suffix}",
        "ESKIT_FANOUT_QUEUE": f"eskit-test-fanout-{suffix}",
    }
    try:
        with Connection(RABBITMQ, connect_timeout=5) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:
        raise AssertionError(
            f"RabbitMQ is not reachable at {RABBITMQ} ({exc}); start it with "
            "`rabbitmq-server -detached`"
        ) from exc
    for n in range(25):
        fleet.seed("ledger", f"rmq-{n:02d}", 8)
    try:
        fleet.worker("rabbit", concurrency=2, **env)
        shell = (
            "from eskit_tasks import compact_all\n"
            "run = compact_all(min_events=8, retain_last=1)\n"
            "print(run.wait(timeout=120).model_dump_json())\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", shell],
            cwd=REPO,
            env=worker_env(REPO, **env),
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        assert done.returncode == 0, done.stderr + fleet.worker_logs()
        final = json.loads(done.stdout.strip().splitlines()[-1])
        assert final["outcomes"] == {"compacted": 25}
        assert final["events_deleted"] == 25 * 7
        assert "amqp://guest:**@127.0.0.1:5672//" in fleet.workers[0].text()
    finally:
        with Connection(RABBITMQ) as conn:
            channel = conn.default_channel
            for queue in (env["ESKIT_COMPACTION_QUEUE"], env["ESKIT_FANOUT_QUEUE"]):
                with contextlib.suppress(Exception):  # best-effort cleanup of test queues
                    channel.queue_delete(queue)
    fleet.assert_nothing_lost()


def test_beat_starts_with_the_nightly_schedule(fleet: Fleet, tmp_path: Path):
    from eskit_tasks import app

    entry = app.conf.beat_schedule["eskit-nightly-compaction"]
    assert entry["task"] == "eskit_tasks.fan_out"
    assert entry["kwargs"] == {"min_events": 1000, "retain_last": 100}
    log = tmp_path / "beat.log"
    with open(log, "wb") as out:
        beat = subprocess.Popen(
            [
                CELERY,
                "-A",
                "eskit_tasks",
                "beat",
                "-s",
                str(tmp_path / "schedule"),
                "--loglevel=DEBUG",
            ],
            cwd=REPO,
            env=worker_env(REPO, ESKIT_NIGHTLY_CRON="30 2 * * *"),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while "eskit-nightly-compaction" not in log.read_text() and time.monotonic() < deadline:
            assert beat.poll() is None, log.read_text()
            time.sleep(0.2)
        text = log.read_text()
        assert "beat: Starting" in text
        assert "eskit-nightly-compaction" in text
    finally:
        beat.terminate()
        beat.wait(20)
