"""Fleet throughput: many streams through Celery + Redis on two pool processes, against
``eskit-tasks compact-all --local`` in one process.

Every run compacts its own identical copy of the data in the same PostgreSQL database:
the streams are seeded under one stream type per run and round (``bench_local0``,
``bench_fleet0``, ``bench_split0``, ...), each run picking only its own type. Baseline
("local"): the CLI's ``compact-all --local`` in one process; its own ``elapsed_s`` is
the time (interpreter start-up excluded). Ours ("fleet"): two pool processes, in the
layout of docker/compose.yaml (one ``celery -A eskit_tasks worker --concurrency=2``)
and, for comparison, as two ``--concurrency=1`` workers ("split"), each timed from
``compact_all()`` to ``run.wait()`` returning (worker start-up excluded), measured in a
child process whose environment points the Celery app at this benchmark's private
Redis and database. The full size repeats the three runs (local, compose, split) in
``rounds`` rounds on fresh copies and reports the median ratio of the rounds: a single
local run on this shared machine varied from 32 to 61 streams/s at one busy core. Each
phase also reports how many of the machine's cores were busy (from /proc/stat).

Also home of the helpers bench.fanout shares: a scratch database with eskit's tables,
the workers' environment, workers on their own queues, COPY seeding, /proc memory
readings. The services themselves are :mod:`eskit_tasks.testing.services`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from bench import REPO
from bench.deciders import FLEET_ROUNDS_MAX
from eskit_tasks.testing.services import (
    QUIET_WORKER,
    RedisServer,
    Worker,
    free_port,
    libpq_url,
    postgres_admin_url,
    scratch_database,
    worker_env,
)

PAYLOAD_PAD = "x" * 60  # with the other fields: about 100 bytes of JSON per event

SCALES = {
    "tiny": {"streams": 40, "events": 20, "rounds": 1},
    "full": {"streams": 2_000, "events": 200, "rounds": 3},
}
GOAL_RATIO = 1.6


# -- shared helpers -------------------------------------------------------------------


@contextmanager
def bench_database(tag: str) -> Iterator[str]:
    """A scratch PostgreSQL database ``eskit_bench_<tag>_...`` (ESKIT_TEST_POSTGRES_URL's
    server, dropped afterwards) with eskit-tasks' tables; yields its SQLAlchemy URL."""
    from eskit_tasks import SqlEventStore, SqlSnapshotStore

    with scratch_database(postgres_admin_url(), f"eskit_bench_{tag}") as url:
        store = SqlEventStore.from_url(url)
        SqlSnapshotStore(store.engine)
        store.engine.dispose()
        yield url


def redis_server(workdir: Path) -> RedisServer:
    """A private redis-server on a free port (``with`` starts and stops it)."""
    return RedisServer(free_port(), workdir / "redis")


def fleet_env(redis: RedisServer, database_url: str, **extra: str) -> dict[str, str]:
    """The environment of workers and measuring children: this benchmark's broker,
    result backend, Redis and database, eskit defaults for everything else (a caller's
    own CELERY_*/ESKIT_* variables, e.g. the test suite's short timings, are dropped)."""
    env = {k: v for k, v in worker_env(REPO).items() if not k.startswith(("CELERY_", "ESKIT_"))}
    env.update(
        {
            "CELERY_BROKER_URL": redis.url(0),
            "CELERY_RESULT_BACKEND": redis.url(1),
            "ESKIT_REDIS_URL": redis.url(2),
            "ESKIT_DATABASE_URL": database_url,
            "ESKIT_DECIDER_MODULES": "bench.deciders",
            "ESKIT_CELERY_CONFIG": "celeryconfig",
        }
    )
    env.update(extra)
    return env


class BenchWorker(Worker):
    """A real ``celery -A eskit_tasks worker`` (prefork) in the checkout, optionally on
    chosen queues, that can tell its pool processes' pids."""

    def __init__(
        self,
        name: str,
        env: dict[str, str],
        logdir: Path,
        concurrency: int = 1,
        queues: str | None = None,
        loglevel: str = "INFO",
    ) -> None:
        options = QUIET_WORKER + (("-Q", queues) if queues else ())
        super().__init__(name, env, logdir, concurrency, options, loglevel, cwd=REPO)

    def pool_children(self) -> list[int]:
        """Pids of the worker's prefork pool processes."""
        assert self.proc is not None
        return children_of(self.proc.pid)


def children_of(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found.extend(int(p) for p in text)
    return found


def proc_kb(pid: int, field: str) -> int:
    """A ``kB`` field of /proc/<pid>/status (``VmRSS``, ``VmHWM``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def run_child(module: str, args: list[str], env: dict[str, str], timeout: float) -> dict[str, Any]:
    """Run ``python -m module args`` in ``env``; its last stdout line is a JSON object."""
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"{module} {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-4000:]}"
        )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def copy_seed(
    url: str,
    stream_type: str,
    first_pk: int,
    streams: int,
    events: int,
    data: Callable[[int], str],
    chunk: int = 20_000,
) -> None:
    """Seed ``streams`` streams of ``events`` events each (pks from ``first_pk``) with
    PostgreSQL COPY; ``data(version)`` is an event's JSON payload (no tab, newline or
    backslash: COPY text format)."""
    now = datetime.now(UTC).isoformat()
    payloads = [data(v) for v in range(1, events + 1)]
    with psycopg.connect(libpq_url(url)) as conn:
        conn.execute("SET synchronous_commit = off")
        with conn.cursor() as cur:
            with cur.copy(
                "COPY eskit_streams (pk, stream_type, stream_id, head_version, "
                "compacted_through, fence_token, created_at) FROM STDIN"
            ) as copy:
                for start in range(first_pk, first_pk + streams, chunk):
                    stop = min(start + chunk, first_pk + streams)
                    copy.write(
                        "".join(
                            f"{pk}\t{stream_type}\t{stream_type}-{pk:08d}\t{events}\t0\t0\t{now}\n"
                            for pk in range(start, stop)
                        ).encode()
                    )
            with cur.copy(
                "COPY eskit_events (stream_pk, version, type, data, metadata, recorded_at) "
                "FROM STDIN"
            ) as copy:
                per_chunk = max(1, chunk // events)
                for start in range(first_pk, first_pk + streams, per_chunk):
                    stop = min(start + per_chunk, first_pk + streams)
                    copy.write(
                        "".join(
                            f"{pk}\t{v}\tDeposited\t{payloads[v - 1]}\t{{}}\t{now}\n"
                            for pk in range(start, stop)
                            for v in range(1, events + 1)
                        ).encode()
                    )
            cur.execute(
                "SELECT setval(pg_get_serial_sequence('eskit_streams', 'pk'), "
                "(SELECT max(pk) FROM eskit_streams))"
            )


def vacuum_analyze(url: str) -> None:
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")


def scalar(url: str, sql: str) -> Any:
    with psycopg.connect(libpq_url(url)) as conn:
        row = conn.execute(sql).fetchone()
        return None if row is None else row[0]


# -- the benchmark --------------------------------------------------------------------


def _payload(version: int) -> str:
    return json.dumps(
        {"amount": version, "currency": "EUR", "memo": PAYLOAD_PAD}, separators=(",", ":")
    )


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, all) jiffies of the machine's cores so far, from /proc/stat."""
    first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    ticks = [int(t) for t in first[1:9]]  # user nice system idle iowait irq softirq steal
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)


def busy_cores(since: tuple[int, int]) -> float:
    """How many cores of the whole machine were busy, on average, since ``since``
    (a ``_cpu_jiffies()`` reading): shows whether a phase was bound by CPU or waited."""
    busy, total = _cpu_jiffies()
    spent = total - since[1]
    return round((busy - since[0]) / spent * (os.cpu_count() or 1), 2) if spent else 0.0


def _local(
    env: dict[str, str], database_url: str, streams: int, stream_type: str
) -> dict[str, Any]:
    """``eskit-tasks compact-all --local`` over the streams of ``stream_type``."""
    cli = str(Path(sys.executable).with_name("eskit-tasks"))
    started = time.perf_counter()
    cpu = _cpu_jiffies()
    done = subprocess.run(
        [
            cli,
            "compact-all",
            "--local",
            "--database",
            database_url,
            "--stream-type",
            stream_type,
            "--decider-module",
            "bench.deciders",
            "--json",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
        check=False,
    )
    wall = time.perf_counter() - started
    cores = busy_cores(cpu)
    if done.returncode != 0:
        raise RuntimeError(f"compact-all --local failed ({done.returncode}):\n{done.stderr}")
    report = json.loads(done.stdout.splitlines()[-1])  # the summary, after a line a stream
    if report["outcomes"] != {"compacted": streams}:
        raise RuntimeError(f"compact-all --local did not compact every stream: {report}")
    return {
        "elapsed_s": float(report["elapsed_s"]),
        "wall_s": wall,
        "busy_cores": cores,
        "events_deleted": int(report["events_deleted"]),
    }


def _fleet_child(streams: int, stream_type: str, timeout: float) -> dict[str, Any]:
    """In a child whose environment configures the Celery app: one timed fleet run."""
    from eskit_tasks.fleet.app import resources
    from eskit_tasks.fleet.runs import compact_all

    resources().redis.ping()  # connect before the clock starts
    started = time.perf_counter()
    run = compact_all(stream_types=[stream_type])
    final = run.wait(timeout=timeout, poll=0.02)
    elapsed = time.perf_counter() - started
    if final.outcomes != {"compacted": streams} or final.candidates != streams:
        raise RuntimeError(f"the fleet run did not compact every stream: {final}")
    return {
        "elapsed_s": elapsed,
        "events_deleted": final.events_deleted,
        "run_id": run.run_id,
        "max_queue_depth": final.max_queue_depth,
    }


#: The two fleet layouts, each with two pool processes: (name, stream type, workers,
#: concurrency). "compose" is how docker/compose.yaml runs a worker (one per host, a
#: pool process per core); "split" is two workers of one pool process each.
LAYOUTS = (
    ("compose", "bench_fleet", 1, 2),
    ("split", "bench_split", 2, 1),
)


def _fleet(
    env: dict[str, str], logdir: Path, streams: int, stream_type: str, workers: int, conc: int
) -> dict[str, Any]:
    started = [
        BenchWorker(f"{stream_type}{n}", env, logdir, concurrency=conc) for n in range(workers)
    ]
    try:
        for w in started:
            w.start()
        args = ["--child", str(streams), stream_type]
        cpu = _cpu_jiffies()
        result = run_child("bench.fleet", args, env, timeout=3600 + 60 * streams)
        return {**result, "busy_cores": busy_cores(cpu)}
    finally:
        for w in started:
            w.stop()


def run(scale: str = "full") -> dict[str, Any]:
    load_at_start = round(os.getloadavg()[0], 2)  # other work on the machine skews the ratio
    size = SCALES[scale]
    streams, events, rounds = size["streams"], size["events"], size["rounds"]
    if rounds > FLEET_ROUNDS_MAX:  # each round's stream types need a registered decider
        raise ValueError(f"at most {FLEET_ROUNDS_MAX} rounds (bench.deciders)")
    total = streams * events
    measured: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory(prefix="eskit-bench-fleet-") as tmp,
        redis_server(Path(tmp)) as redis,
        bench_database("fleet") as url,
    ):
        env = fleet_env(redis, url)
        started = time.perf_counter()
        kinds = [("local", "bench_local"), *((name, t) for name, t, _, _ in LAYOUTS)]
        for r in range(rounds):
            for n, (_, stream_type) in enumerate(kinds):
                first = (r * len(kinds) + n) * streams + 1
                copy_seed(url, f"{stream_type}{r}", first, streams, events, _payload)
        seed_s = time.perf_counter() - started
        for r in range(rounds):
            vacuum_analyze(url)
            local = _local(env, url, streams, f"bench_local{r}")
            if local["events_deleted"] != total:
                raise RuntimeError(f"compact-all --local deleted {local['events_deleted']} events")
            one: dict[str, Any] = {"local": local}
            for name, stream_type, workers, conc in LAYOUTS:
                vacuum_analyze(url)
                fleet = _fleet(env, Path(tmp) / "logs", streams, f"{stream_type}{r}", workers, conc)
                if fleet["events_deleted"] != total:
                    raise RuntimeError(f"the {name} fleet deleted {fleet['events_deleted']} events")
                one[name] = fleet
            measured.append(one)
        left = scalar(url, "SELECT count(*) FROM eskit_events")
        if left != 0:
            raise RuntimeError(f"{left} events left after every run")

    def rate(r: dict[str, Any], name: str) -> float:
        return streams / float(r[name]["elapsed_s"])

    def middle(values: Iterable[float]) -> float:
        ordered = sorted(values)
        return ordered[len(ordered) // 2]

    ratios = sorted(rate(r, "compose") / rate(r, "local") for r in measured)
    split_ratios = sorted(rate(r, "split") / rate(r, "local") for r in measured)
    ratio, split_ratio = middle(ratios), middle(split_ratios)
    local_rate, fleet_rate, split_rate = (
        middle(rate(r, name) for r in measured) for name in ("local", "compose", "split")
    )
    cores = {name: middle(r[name]["busy_cores"] for r in measured) for name in measured[0]}
    return {
        "what": f"{streams:,} streams x {events} events, 2 pool processes",
        "summary": (
            f"{fleet_rate:,.1f} vs {local_rate:,.1f} streams/s (compact-all --local, medians "
            f"of {rounds}); 2 workers x 1: {split_ratio:.2f}x; cores busy "
            f"{cores['compose']} vs {cores['local']}"
        ),
        "backend": "postgresql",
        "scale": scale,
        "streams": streams,
        "rounds": rounds,
        "loadavg_1m_at_start": load_at_start,
        "events_per_stream": events,
        "fleet_workers": "1 x celery worker --concurrency=2 (prefork, as in docker/compose.yaml)",
        "seed_s": round(seed_s, 2),
        "local_streams_per_s": round(local_rate, 1),
        "local_events_per_s": round(local_rate * events),
        "local_busy_cores": cores["local"],
        "fleet_streams_per_s": round(fleet_rate, 1),
        "fleet_events_per_s": round(fleet_rate * events),
        "fleet_max_queue_depth": max(r["compose"]["max_queue_depth"] for r in measured),
        "fleet_busy_cores": cores["compose"],
        "ratio": round(ratio, 3),
        "ratio_range": [round(ratios[0], 3), round(ratios[-1], 3)],
        "split_workers": "2 x celery worker --concurrency=1 (prefork)",
        "split_streams_per_s": round(split_rate, 1),
        "split_busy_cores": cores["split"],
        "split_ratio": round(split_ratio, 3),
        "split_ratio_range": [round(split_ratios[0], 3), round(split_ratios[-1], 3)],
        "rounds_streams_per_s": [
            {name: round(rate(r, name), 1) for name in ("local", "compose", "split")}
            for r in measured
        ],
        "goal": f"fleet/local >= {GOAL_RATIO}",
        "met": ratio >= GOAL_RATIO,
    }


def _main(argv: list[str]) -> None:
    if argv[:1] == ["--child"]:
        print(json.dumps(_fleet_child(int(argv[1]), argv[2], timeout=3600)))
        return
    scale = argv[0] if argv else "full"
    print(json.dumps(run(scale), indent=2))


if __name__ == "__main__":
    _main(sys.argv[1:])
