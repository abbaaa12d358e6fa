"""Fixtures for tests with real redis-servers and real `celery worker` processes."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from eskit_tasks import NewEvent, SqlEventStore, SqlSnapshotStore, load_state
from eskit_tasks.stores.schema import metadata
from eskit_tasks.testing.deciders import Ledger, ledger_fold
from eskit_tasks.testing.services import QUIET_WORKER, RedisServer, Worker, worker_env
from tests import REPO
from tests.conftest import BROKER_REDIS_PORT, STATE_REDIS_PORT


@pytest.fixture(scope="session")
def redis_servers(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[RedisServer, RedisServer]]:
    base = tmp_path_factory.mktemp("redis")
    broker = RedisServer(BROKER_REDIS_PORT, base / "broker")
    state = RedisServer(STATE_REDIS_PORT, base / "state")
    with broker, state:
        yield broker, state


@dataclass
class Fleet:
    """One fleet test's world: a clean database and Redis, workers started on demand."""

    store: SqlEventStore
    broker: RedisServer
    state: RedisServer
    logdir: Path
    markers: Path
    workers: list[Worker] = field(default_factory=list)
    amounts: dict[tuple[str, str], list[int]] = field(default_factory=dict)

    def worker(
        self,
        name: str,
        concurrency: int = 2,
        options: tuple[str, ...] = QUIET_WORKER,
        **env: str,
    ) -> Worker:
        overrides = {"ESKIT_TEST_MARKERS": str(self.markers), **env}
        w = Worker(name, worker_env(REPO, **overrides), self.logdir, concurrency, options, cwd=REPO)
        self.workers.append(w)
        return w.start()

    def seed(self, stream_type: str, stream_id: str, n: int, *, batch: int = 500) -> None:
        """Append n deposits (amount = version) with the stream id in each event's metadata."""
        head = self.store.head_version(stream_type, stream_id)
        amounts = self.amounts.setdefault((stream_type, stream_id), [])
        while n > 0:
            size = min(batch, n)
            events = [
                NewEvent("Deposited", {"amount": head + i}, {"stream": stream_id})
                for i in range(1, size + 1)
            ]
            head = self.store.append(stream_type, stream_id, events, expected_version=head)
            amounts.extend(range(head - size + 1, head + 1))
            n -= size

    def assert_nothing_lost(self) -> None:
        """Every seeded ledger-like stream still folds to the fold of all its events."""
        snaps = SqlSnapshotStore(self.store.engine, create_tables=False)
        for (stream_type, stream_id), amounts in self.amounts.items():
            if stream_type not in ("ledger", "slow"):
                continue
            got = load_state(self.store, snaps, Ledger(), dict, stream_type, stream_id)
            assert got == (ledger_fold(amounts), len(amounts)), (stream_type, stream_id)
            assert self.store.head_version(stream_type, stream_id) == len(amounts)

    def live_versions(self, stream_type: str, stream_id: str) -> list[int]:
        return [e.version for e in self.store.read(stream_type, stream_id)]

    def wait_for_marker(self, stream_id: str, timeout: float = 30) -> int:
        """Wait until a worker starts folding ``stream_id``; return that process's pid."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = sorted(self.markers.glob(f"{stream_id}.*"))
            if found:
                return int(found[-1].suffix[1:])
            time.sleep(0.02)
        raise AssertionError(f"no worker started compacting {stream_id} in {timeout}s")

    def worker_logs(self) -> str:
        return "\n".join(f"--- {w.name}\n{w.text()[-4000:]}" for w in self.workers)


@pytest.fixture
def fleet(
    redis_servers: tuple[RedisServer, RedisServer], postgres_url: str, tmp_path: Path
) -> Iterator[Fleet]:
    broker, state = redis_servers
    if not state.running:  # a previous test left it stopped
        state.start()
    broker.flush()
    state.flush()
    os.environ["ESKIT_DATABASE_URL"] = postgres_url
    store = SqlEventStore.from_url(postgres_url)
    with store.engine.begin() as conn:
        names = ", ".join(t.name for t in metadata.sorted_tables)
        conn.exec_driver_sql(f"TRUNCATE {names} RESTART IDENTITY")
    markers = tmp_path / "markers"
    markers.mkdir()
    world = Fleet(store, broker, state, tmp_path / "logs", markers)
    try:
        yield world
    finally:
        for w in world.workers:
            w.stop()
        store.engine.dispose()


def wait_until(check: Callable[[], Any], timeout: float, what: str, poll: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(poll)


def stream_results(broker: RedisServer) -> list[dict[str, Any]]:
    """The CompactionResult of every stream in the result backend, whether it went alone
    (a compact_stream's result) or in a batch (small streams go several to one
    compact_batch message, whose result holds each of its streams')."""
    from eskit_tasks.fleet.runs import batch_results_of, compaction_result_of

    found: list[dict[str, Any]] = []
    for meta in results_in_backend(broker).values():
        if meta.get("name") == "eskit_tasks.compact_stream":
            result = compaction_result_of(meta)
            if result is not None:
                found.append(result)
        elif meta.get("name") == "eskit_tasks.compact_batch":
            found.extend(batch_results_of(meta))
    return found


def results_in_backend(broker: RedisServer) -> dict[str, dict[str, Any]]:
    """Every task result stored in the result backend, by task id."""
    import json

    client = redis.Redis(port=broker.port, db=1)
    found = {}
    for key in client.scan_iter("celery-task-meta-*"):
        meta = json.loads(client.get(key) or b"{}")
        found[meta["task_id"]] = meta
    return found
