"""Fan-out at scale: paging a million candidate streams into compact_stream tasks.

The candidates (one small event each) are seeded with PostgreSQL COPY. One real
``celery -A eskit_tasks worker --concurrency=1 -Q compaction-fanout`` runs the fan-out;
nothing compacts: a *drainer* thread in this process empties the ``compaction`` queue
with raw Redis ``LPOP <list> 1000`` calls every 5 ms, discarding the messages,
so the fan-out is never held back by the high-water mark and its own enqueue rate is
what is measured.

* Enqueue rate: candidates / seconds from ``compact_all()`` until the run's progress
  says the fan-out is done (measured in a child process configured like a client).
  Batches are off (``ESKIT_BATCH_EVENTS=0``): one compact_stream message per
  candidate, as for streams too large to share a message, so that both sides send the
  same number of messages (with batches on, these one-event candidates would go 50 to
  a compact_batch message).
* Baseline ("raw batched", the one the goal is set against): the same number of
  messages published with ``kombu.Producer.publish`` from ``app.producer_or_acquire()``
  inside kombu's ``Producer.batch`` (pipelines of FANOUT_PUBLISH_BATCH, one batch per
  page of FANOUT_PAGE_SIZE), as the fan-out sends its pages — same broker, routed as
  the fan-out's messages are (the anonymous exchange, the queue's name as routing
  key), the same body and headers as a real compact_stream message (captured from the
  queue; kombu serialises the body as JSON each time), to a scratch queue the same
  drainer empties. Nothing else: no ids, no paging, no progress. The ratio against it
  is the cost of our paging, progress and message building. A second figure publishes
  the same messages in a plain loop, one Redis round trip each (the ratio reported
  before issue 15).
* Peak RSS: VmHWM of the fan-out worker's pool process (a fresh worker per size), at
  the full number of candidates and at a tenth of it (``max_streams``).
* Queue depth: a sampler thread sums LLEN over the compaction queue's Redis lists
  every few milliseconds. With the fast drainer the queue never fills, so a separate
  *back-pressure* phase throttles the drainer to a quarter of the fan-out's rate, makes
  the fan-out hit ESKIT_FANOUT_HIGH_WATER (3x that many candidates), and checks the
  sampled depth never exceeds it.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import redis as redis_lib

from bench.fleet import (
    BenchWorker,
    bench_database,
    copy_seed,
    fleet_env,
    proc_kb,
    redis_server,
    run_child,
    vacuum_analyze,
)
from eskit_tasks.fleet import constants

SCALES = {
    # backpressure_high_water: ESKIT_FANOUT_HIGH_WATER in the back-pressure phase, which
    # fans out three times that many candidates.
    "tiny": {"candidates": 2_000, "backpressure_high_water": 200},
    # The size; about seven minutes here (the plain-loop baseline is most of it).
    "full": {"candidates": 1_000_000, "backpressure_high_water": constants.FANOUT_HIGH_WATER},
    # The largest that runs in about ten minutes here.
    "medium": {"candidates": 200_000, "backpressure_high_water": constants.FANOUT_HIGH_WATER},
}
SCRATCH_QUEUE = "bench-raw-publish"
#: kombu's Redis transport keeps one list per priority step: ``name``, ``name\x06\x163``...
PRIORITY_STEPS = (0, 3, 6, 9)
GOAL_RATIO = 0.5
GOAL_RSS_FLAT = 1.2
#: Back-pressure phase: the drainer takes this fraction of the fan-out's measured rate,
#: and a fan-out that finds the queue full looks again after this many seconds.
BACKPRESSURE_DRAIN_FRACTION = 0.25
BACKPRESSURE_BACKOFF = "0.5"


def redis_lists(queue: str) -> list[str]:
    return [queue if p == 0 else f"{queue}\x06\x16{p}" for p in PRIORITY_STEPS]


class Drainer(threading.Thread):
    """Empties queues with ``LPOP <list> <batch>``, discarding the messages; keeps the
    first raw message of each queue (to size the baseline's messages)."""

    def __init__(self, url: str, queues: list[str], rate: float | None = None) -> None:
        super().__init__(daemon=True)
        self.client = redis_lib.Redis.from_url(url)
        self.lists = {name: queue for queue in queues for name in redis_lists(queue)}
        self.rate = rate
        self.popped = dict.fromkeys(queues, 0)
        self.first: dict[str, bytes] = {}
        self.error: BaseException | None = None
        self.halt = threading.Event()

    def run(self) -> None:
        try:
            self._drain()
        except BaseException as exc:
            self.error = exc
            raise

    def _drain(self) -> None:
        tick = 0.005 if self.rate is None else 0.01
        batch = 1000 if self.rate is None else max(1, int(self.rate * tick))
        names = list(self.lists)
        while not self.halt.is_set():
            started = time.monotonic()
            with self.client.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.lpop(name, batch)
                replies = pipe.execute()
            full = False
            for name, items in zip(names, replies, strict=True):
                if items:
                    self._took(name, items)
                    full = full or len(items) == batch
            if self.rate is not None or not full:
                self.halt.wait(max(0.0, tick - (time.monotonic() - started)))

    def _took(self, name: str, items: list[bytes]) -> None:
        queue = self.lists[name]
        self.popped[queue] += len(items)
        self.first.setdefault(queue, items[0])

    def stop(self) -> None:
        self.halt.set()
        self.join(10)


class DepthSampler(threading.Thread):
    """Samples the compaction queue's depth (LLEN summed over its priority lists)."""

    def __init__(self, url: str, queue: str, interval: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.client = redis_lib.Redis.from_url(url)
        self.lists = redis_lists(queue)
        self.interval = interval
        self.max_depth = 0
        self.samples = 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            with self.client.pipeline(transaction=False) as pipe:
                for name in self.lists:
                    pipe.llen(name)
                depth = sum(pipe.execute())
            self.max_depth = max(self.max_depth, depth)
            self.samples += 1
            self.halt.wait(self.interval)

    def stop(self) -> None:
        self.halt.set()
        self.join(10)


# -- children (run with the benchmark's environment, so the Celery app is configured) --


def _fanout_child(max_streams: int | None) -> dict[str, Any]:
    """One fan-out, timed from compact_all() to the progress saying it is done."""
    from eskit_tasks.fleet.app import resources
    from eskit_tasks.fleet.runs import compact_all

    resources().redis.ping()  # connect before the clock starts
    started = time.perf_counter()
    run = compact_all(max_streams=max_streams)
    while True:
        progress = run.progress()
        if progress.error:
            raise RuntimeError(f"the fan-out failed: {progress.error}")
        if progress.fanout_done:
            break
        time.sleep(0.01)
    elapsed = time.perf_counter() - started
    return {
        "elapsed_s": elapsed,
        "candidates": progress.candidates,
        "max_queue_depth_seen_by_fan_out": progress.max_queue_depth,
        "run_id": run.run_id,
    }


def _publish_child(count: int, sample_path: str, batched: bool) -> dict[str, Any]:
    """The baseline: ``count`` copies of a captured compact_stream message published in
    a plain loop (kombu serialises the body as JSON each time, as for a task); with
    ``batched``, inside kombu's ``Producer.batch`` as the fan-out sends its pages.
    Routed as the fan-out's messages are: the anonymous exchange and the queue's name
    (a named exchange would cost kombu's Redis transport a lookup per message)."""
    from kombu import Queue

    from eskit_tasks.fleet.app import app

    envelope = json.loads(Path(sample_path).read_bytes())
    raw_body = envelope["body"]
    if envelope["properties"].get("body_encoding") == "base64":
        raw_body = base64.b64decode(raw_body)
    body = json.loads(raw_body)
    props = envelope["properties"]
    queue = Queue(SCRATCH_QUEUE)  # declared as Celery declares the task queues
    options = {
        "exchange": "",  # as Celery routes to a direct queue: the anonymous exchange
        "routing_key": SCRATCH_QUEUE,
        "serializer": "json",
        "headers": envelope["headers"],
        **{k: props[k] for k in ("correlation_id", "reply_to") if k in props},
    }
    with app.producer_or_acquire() as producer:
        # Declare and connect before the clock starts (the drainer discards this one).
        producer.publish(body, declare=[queue], **options)
        publish = producer.publish
        started = time.perf_counter()
        if batched:
            for first in range(0, count, constants.FANOUT_PAGE_SIZE):
                with producer.batch(constants.FANOUT_PUBLISH_BATCH):
                    for _ in range(min(constants.FANOUT_PAGE_SIZE, count - first)):
                        publish(body, **options)
        else:
            for _ in range(count):
                publish(body, **options)
        elapsed = time.perf_counter() - started
    return {"elapsed_s": elapsed, "messages": count}


# -- the benchmark --------------------------------------------------------------------


def _fan_out_once(
    tmp: Path,
    env: dict[str, str],
    redis_url: str,
    max_streams: int | None,
    expected: int,
    name: str,
) -> dict[str, Any]:
    """Start a fresh fan-out worker, run one fan-out while sampling the queue depth,
    return its rate, the pool process's peak RSS and the depths seen."""
    worker = BenchWorker(
        name, env, tmp / "logs", concurrency=1, queues=constants.FANOUT_QUEUE
    ).start()
    sampler = DepthSampler(redis_url, constants.COMPACTION_QUEUE)
    try:
        (child,) = worker.pool_children()
        rss_idle = proc_kb(child, "VmRSS")
        sampler.start()
        args = ["--fanout", str(max_streams or 0)]
        result = run_child("bench.fanout", args, env, timeout=7200)
        sampler.stop()
        hwm = proc_kb(child, "VmHWM")
    finally:
        sampler.stop()
        worker.stop()
    if result["candidates"] != expected:
        raise RuntimeError(f"fan-out enqueued {result['candidates']}, expected {expected}")
    return {
        **result,
        "tasks_per_s": expected / result["elapsed_s"],
        "rss_idle_kb": rss_idle,
        "peak_rss_kb": hwm,
        "sampled_max_depth": sampler.max_depth,
        "depth_samples": sampler.samples,
    }


def _publish_once(
    env: dict[str, str], count: int, sample: Path, batched: bool = False
) -> dict[str, Any]:
    args = ["--publish", str(count), str(sample), "batched" if batched else "plain"]
    result = run_child("bench.fanout", args, env, timeout=7200)
    return {**result, "tasks_per_s": count / result["elapsed_s"]}


def _wait_drained(drainer: Drainer, queue: str, expected: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while drainer.popped[queue] < expected:
        if drainer.error is not None:
            raise RuntimeError(f"the drainer failed: {drainer.error!r}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"drainer took {drainer.popped[queue]} of {expected} from {queue}")
        time.sleep(0.01)


def run(scale: str = "full") -> dict[str, Any]:
    load_at_start = round(os.getloadavg()[0], 2)  # other work on the machine skews the ratio
    size = SCALES[scale]
    full, small = size["candidates"], size["candidates"] // 10
    compaction, high_water = constants.COMPACTION_QUEUE, constants.FANOUT_HIGH_WATER
    with (
        tempfile.TemporaryDirectory(prefix="eskit-bench-fanout-") as tmpdir,
        redis_server(Path(tmpdir)) as redis,
        bench_database("fanout") as url,
    ):
        tmp = Path(tmpdir)
        env = fleet_env(redis, url, ESKIT_BATCH_EVENTS="0")
        started = time.perf_counter()
        copy_seed(url, "bench_fanout", 1, full, 1, lambda v: '{"amount":1}', chunk=50_000)
        vacuum_analyze(url)
        seed_s = time.perf_counter() - started

        drainer = Drainer(redis.url(0), [compaction, SCRATCH_QUEUE])
        drainer.start()
        try:
            at_small = _fan_out_once(tmp, env, redis.url(0), small, small, "fanout-small")
            _wait_drained(drainer, compaction, small)
            sample = tmp / "message.json"
            sample.write_bytes(drainer.first[compaction])
            raw_small = _publish_once(env, small, sample, batched=True)
            at_full = _fan_out_once(tmp, env, redis.url(0), None, full, "fanout-full")
            raw_full = _publish_once(env, full, sample)
            raw_batched = _publish_once(env, full, sample, batched=True)
            _wait_drained(drainer, compaction, small + full)
            _wait_drained(drainer, SCRATCH_QUEUE, small + 2 * full + 3)  # + a warm-up each
        finally:
            drainer.stop()
        task_bytes = len(drainer.first[compaction])
        raw_bytes = len(drainer.first[SCRATCH_QUEUE])

        # Back-pressure: a drainer slower than the fan-out, so the queue fills up.
        pressure_hw = size["backpressure_high_water"]
        drain_rate = max(20.0, at_small["tasks_per_s"] * BACKPRESSURE_DRAIN_FRACTION)
        slow = Drainer(redis.url(0), [compaction], rate=drain_rate)
        slow.start()
        try:
            pressured = _fan_out_once(
                tmp,
                fleet_env(
                    redis,
                    url,
                    ESKIT_BATCH_EVENTS="0",
                    ESKIT_FANOUT_BACKOFF=BACKPRESSURE_BACKOFF,
                    ESKIT_FANOUT_HIGH_WATER=str(pressure_hw),
                ),
                redis.url(0),
                3 * pressure_hw,
                3 * pressure_hw,
                "fanout-pressure",
            )
        finally:
            slow.stop()
        if slow.error is not None:
            raise RuntimeError(f"the slow drainer failed: {slow.error!r}")

    ratio = at_full["tasks_per_s"] / raw_batched["tasks_per_s"]  # the goal's ratio
    ratio_plain = at_full["tasks_per_s"] / raw_full["tasks_per_s"]
    rss_ratio = at_full["peak_rss_kb"] / at_small["peak_rss_kb"]
    max_depth = max(at_small["sampled_max_depth"], at_full["sampled_max_depth"])
    depth_ok = max_depth <= high_water and pressured["sampled_max_depth"] <= pressure_hw
    return {
        "what": f"fan-out of {full:,} candidate streams",
        "summary": (
            f"{at_full['tasks_per_s']:,.0f} tasks/s vs batched raw kombu "
            f"{raw_batched['tasks_per_s']:,.0f} (plain loop {raw_full['tasks_per_s']:,.0f}, "
            f"{ratio_plain:.2f} of it); "
            f"peak RSS {at_full['peak_rss_kb'] / 1024:.1f} MB vs "
            f"{at_small['peak_rss_kb'] / 1024:.1f} MB at {small:,}; max depth {max_depth} "
            f"(back-pressure {pressured['sampled_max_depth']} <= {pressure_hw})"
        ),
        "backend": "postgresql",
        "scale": scale,
        "candidates": full,
        "loadavg_1m_at_start": load_at_start,
        "seed_s": round(seed_s, 2),
        "drained_by": (
            "a thread in the benchmark process taking the messages off the Redis lists "
            "(LPOP <list> 1000 every 5 ms) and discarding them; nothing compacts"
        ),
        "fan_out_worker": "celery worker --concurrency=1 -Q compaction-fanout (prefork)",
        "high_water": high_water,
        "page_size": constants.FANOUT_PAGE_SIZE,
        "task_message_bytes": task_bytes,
        "raw_message_bytes": raw_bytes,
        "fan_out_s": round(at_full["elapsed_s"], 2),
        "fan_out_tasks_per_s": round(at_full["tasks_per_s"]),
        "raw_batched_publish_s": round(raw_batched["elapsed_s"], 2),
        "raw_batched_publish_per_s": round(raw_batched["tasks_per_s"]),
        "ratio": round(ratio, 3),
        "raw_publish_s": round(raw_full["elapsed_s"], 2),
        "raw_publish_per_s": round(raw_full["tasks_per_s"]),
        "ratio_vs_plain_loop": round(ratio_plain, 3),
        "small_candidates": small,
        "small_fan_out_tasks_per_s": round(at_small["tasks_per_s"]),
        "small_raw_batched_publish_per_s": round(raw_small["tasks_per_s"]),
        "small_ratio": round(at_small["tasks_per_s"] / raw_small["tasks_per_s"], 3),
        "peak_rss_mb": round(at_full["peak_rss_kb"] / 1024, 1),
        "small_peak_rss_mb": round(at_small["peak_rss_kb"] / 1024, 1),
        "idle_rss_mb": round(at_full["rss_idle_kb"] / 1024, 1),
        "rss_growth_mb": round((at_full["peak_rss_kb"] - at_full["rss_idle_kb"]) / 1024, 1),
        "small_rss_growth_mb": round((at_small["peak_rss_kb"] - at_small["rss_idle_kb"]) / 1024, 1),
        "rss_ratio": round(rss_ratio, 3),
        "max_queue_depth": max_depth,
        "depth_samples": at_full["depth_samples"] + at_small["depth_samples"],
        "max_queue_depth_seen_by_fan_out": at_full["max_queue_depth_seen_by_fan_out"],
        "backpressure_high_water": pressure_hw,
        "backpressure_candidates": 3 * pressure_hw,
        "backpressure_drain_per_s": round(drain_rate),
        "backpressure_fanout_backoff_s": float(BACKPRESSURE_BACKOFF),
        "backpressure_max_queue_depth": pressured["sampled_max_depth"],
        "backpressure_max_depth_seen_by_fan_out": pressured["max_queue_depth_seen_by_fan_out"],
        "backpressure_tasks_per_s": round(pressured["tasks_per_s"]),
        "goal": (
            f"enqueue rate >= {GOAL_RATIO} x batched raw publishing; peak RSS within "
            f"{GOAL_RSS_FLAT}x at 1/10 of the candidates; queue depth <= high water"
        ),
        "met": ratio >= GOAL_RATIO and rss_ratio <= GOAL_RSS_FLAT and depth_ok,
    }


def _main(argv: list[str]) -> None:
    if argv[:1] == ["--fanout"]:
        print(json.dumps(_fanout_child(int(argv[1]) or None)))
        return
    if argv[:1] == ["--publish"]:
        print(json.dumps(_publish_child(int(argv[1]), argv[2], argv[3] == "batched")))
        return
    scale = argv[0] if argv else "full"
    print(json.dumps(run(scale), indent=2))


if __name__ == "__main__":
    _main(sys.argv[1:])
