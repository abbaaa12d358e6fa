"""Fleet throughput: many streams through Celery + Redis on two workers, against
``eskit-tasks compact-all --local`` in one process.

Both sides compact an identical copy of the data in the same PostgreSQL database: the
streams are seeded twice, once under the stream type ``bench_fleet`` and once under
``bench_local``, each side picking only its own type. Baseline ("local"): the CLI's
``compact-all --local`` in one process; its own ``elapsed_s`` is the time (interpreter
start-up excluded). Ours ("fleet"): two ``celery -A eskit_tasks worker --concurrency=1``
processes, timed from ``compact_all()`` to ``run.wait()`` returning (worker start-up
excluded), measured in a child process whose environment points the Celery app at this
benchmark's private Redis and database.

Also home of the helpers bench.fanout shares: a scratch PostgreSQL database, a private
redis-server, workers with their own queues, COPY seeding, /proc memory readings.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy.engine import make_url

from tests.services import CELERY, REPO, RedisServer, Worker, free_port

#: Where scratch databases are created (the test suite's variable, same default).
ADMIN_URL = os.environ.get(
    "ESKIT_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
PAYLOAD_PAD = "x" * 60  # with the other fields: about 100 bytes of JSON per event

SCALES = {
    "tiny": {"streams": 40, "events": 20},
    "full": {"streams": 2_000, "events": 200},
}
GOAL_RATIO = 1.3


# -- shared helpers -------------------------------------------------------------------


def libpq(url: str) -> str:
    """A SQLAlchemy URL as a libpq connection string for psycopg."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@contextmanager
def scratch_database(tag: str) -> Iterator[str]:
    """A fresh PostgreSQL database ``eskit_bench_<tag>_...`` (dropped afterwards) with
    eskit-tasks' tables; yields its SQLAlchemy URL."""
    from eskit_tasks import SqlEventStore, SqlSnapshotStore

    name = f"eskit_bench_{tag}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(libpq(ADMIN_URL), autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            url = make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
            store = SqlEventStore.from_url(url)
            SqlSnapshotStore(store.engine)
            store.engine.dispose()
            yield url
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def redis_server(workdir: Path) -> Iterator[RedisServer]:
    server = RedisServer(free_port(), workdir / "redis")
    try:
        server.start()
        yield server
    finally:
        server.stop()


def fleet_env(redis: RedisServer, database_url: str, **extra: str) -> dict[str, str]:
    """The environment of workers and measuring children: this benchmark's broker,
    result backend, Redis and database, eskit defaults for everything else (a caller's
    own CELERY_*/ESKIT_* variables, e.g. the test suite's short timings, are dropped)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "ESKIT_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
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
    """A real ``celery -A eskit_tasks worker`` (prefork), optionally on chosen queues."""

    def __init__(
        self,
        name: str,
        env: dict[str, str],
        logdir: Path,
        concurrency: int = 1,
        queues: str | None = None,
        loglevel: str = "INFO",
    ) -> None:
        super().__init__(name, env, logdir, concurrency)
        self.queues = queues
        self.loglevel = loglevel

    def start(self, timeout: float = 60) -> BenchWorker:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        argv = [
            CELERY,
            "-A",
            "eskit_tasks",
            "worker",
            "--pool=prefork",
            f"--concurrency={self.concurrency}",
            "-n",
            f"{self.name}@%h",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            f"--loglevel={self.loglevel}",
        ]
        if self.queues:
            argv += ["-Q", self.queues]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                argv,
                cwd=REPO,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while " ready." not in self.text():
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited at start:\n{self.text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {self.name} not ready:\n{self.text()[-3000:]}")
            time.sleep(0.05)
        return self

    def pool_children(self) -> list[int]:
        """Pids of the worker's prefork pool processes."""
        assert self.proc is not None
        return children_of(self.proc.pid)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


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
    with psycopg.connect(libpq(url)) as conn:
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
    with psycopg.connect(libpq(url), autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")


def scalar(url: str, sql: str) -> Any:
    with psycopg.connect(libpq(url)) as conn:
        row = conn.execute(sql).fetchone()
        return None if row is None else row[0]


# -- the benchmark --------------------------------------------------------------------


def _payload(version: int) -> str:
    return json.dumps(
        {"amount": version, "currency": "EUR", "memo": PAYLOAD_PAD}, separators=(",", ":")
    )


def _local(env: dict[str, str], database_url: str, streams: int) -> dict[str, Any]:
    """``eskit-tasks compact-all --local`` over the bench_local streams."""
    cli = str(Path(sys.executable).with_name("eskit-tasks"))
    started = time.perf_counter()
    done = subprocess.run(
        [
            cli,
            "compact-all",
            "--local",
            "--database",
            database_url,
            "--stream-type",
            "bench_local",
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
    if done.returncode != 0:
        raise RuntimeError(f"compact-all --local failed ({done.returncode}):\n{done.stderr}")
    report = json.loads(done.stdout)
    if report["outcomes"] != {"compacted": streams}:
        raise RuntimeError(f"compact-all --local did not compact every stream: {report}")
    return {
        "elapsed_s": float(report["elapsed_s"]),
        "wall_s": wall,
        "events_deleted": int(report["events_deleted"]),
    }


def _fleet_child(streams: int, timeout: float) -> dict[str, Any]:
    """In a child whose environment configures the Celery app: one timed fleet run."""
    from eskit_tasks.runs import compact_all
    from eskit_tasks.tasks import resources

    resources().redis.ping()  # connect before the clock starts
    started = time.perf_counter()
    run = compact_all(stream_types=["bench_fleet"])
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


def run(scale: str = "full") -> dict[str, Any]:
    load_at_start = round(os.getloadavg()[0], 2)  # other work on the machine skews the ratio
    size = SCALES[scale]
    streams, events = size["streams"], size["events"]
    total = streams * events
    with (
        tempfile.TemporaryDirectory(prefix="eskit-bench-fleet-") as tmp,
        redis_server(Path(tmp)) as redis,
        scratch_database("fleet") as url,
    ):
        env = fleet_env(redis, url)
        started = time.perf_counter()
        copy_seed(url, "bench_fleet", 1, streams, events, _payload)
        copy_seed(url, "bench_local", streams + 1, streams, events, _payload)
        vacuum_analyze(url)
        seed_s = time.perf_counter() - started

        local = _local(env, url, streams)
        if local["events_deleted"] != total:
            raise RuntimeError(f"compact-all --local deleted {local['events_deleted']} events")
        vacuum_analyze(url)

        workers = [BenchWorker(f"fleet{n}", env, Path(tmp) / "logs", concurrency=1) for n in (1, 2)]
        try:
            for w in workers:
                w.start()
            fleet = run_child(
                "bench.fleet", ["--child", str(streams)], env, timeout=3600 + 60 * streams
            )
        finally:
            for w in workers:
                w.stop()
        if fleet["events_deleted"] != total:
            raise RuntimeError(f"the fleet deleted {fleet['events_deleted']} events")
        left = scalar(url, "SELECT count(*) FROM eskit_events")
        if left != 0:
            raise RuntimeError(f"{left} events left after both runs")

    local_rate, fleet_rate = streams / local["elapsed_s"], streams / fleet["elapsed_s"]
    ratio = fleet_rate / local_rate
    return {
        "what": f"{streams:,} streams x {events} events, 2 workers",
        "summary": (
            f"{fleet_rate:,.1f} vs {local_rate:,.1f} streams/s (compact-all --local); "
            f"{total / fleet['elapsed_s']:,.0f} vs {total / local['elapsed_s']:,.0f} events/s"
        ),
        "backend": "postgresql",
        "scale": scale,
        "streams": streams,
        "loadavg_1m_at_start": load_at_start,
        "events_per_stream": events,
        "fleet_workers": "2 x celery worker --concurrency=1 (prefork), Redis broker",
        "seed_s": round(seed_s, 2),
        "local_s": round(local["elapsed_s"], 3),
        "local_streams_per_s": round(local_rate, 1),
        "local_events_per_s": round(total / local["elapsed_s"]),
        "fleet_s": round(fleet["elapsed_s"], 3),
        "fleet_streams_per_s": round(fleet_rate, 1),
        "fleet_events_per_s": round(total / fleet["elapsed_s"]),
        "fleet_max_queue_depth": fleet["max_queue_depth"],
        "ratio": round(ratio, 3),
        "goal": f"fleet/local >= {GOAL_RATIO}",
        "met": ratio >= GOAL_RATIO,
    }


def _main(argv: list[str]) -> None:
    if argv[:1] == ["--child"]:
        print(json.dumps(_fleet_child(int(argv[1]), timeout=3600)))
        return
    scale = argv[0] if argv else "full"
    print(json.dumps(run(scale), indent=2))


if __name__ == "__main__":
    _main(sys.argv[1:])
