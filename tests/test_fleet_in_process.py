"""The fleet's logic on an in-process worker: kombu ``memory://``, fakeredis, SQLite.

These tests check what the tasks decide (a bad policy, ``max_streams``, an unknown
stream type, the run's counters), not how they survive a real broker or a dying
process — tests/fleet/ does that with redis-servers and real ``celery worker``
processes. The module builds its own app with ``create_app(settings, config=...,
resources=...)``: its settings, broker and clients are given, no cache needs resetting;
each test starts from an empty database and an empty Redis.
(Celery itself prefers CELERY_BROKER_URL / CELERY_RESULT_BACKEND from the environment to
any configuration, so the fixture hides those two.)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fakeredis
import pytest
from celery.contrib.testing.worker import start_worker

from eskit_tasks import CompactionNeedsAttention, CompactionResult, NewEvent, Outcome, load_state
from eskit_tasks.fleet.app import FleetApp, create_app
from eskit_tasks.fleet.constants import COMPACT_STREAM_TASK
from eskit_tasks.fleet.resources import Resources
from eskit_tasks.fleet.runs import (
    CompactionRun,
    compact_all,
    compaction_result,
    compaction_result_of,
)
from eskit_tasks.fleet.settings import EskitSettings
from eskit_tasks.stores.schema import metadata
from eskit_tasks.stores.sql import SqlEventStore, SqlSnapshotStore
from eskit_tasks.testing.deciders import Ledger, ledger_fold


@dataclass
class InProcessFleet:
    app: FleetApp
    store: SqlEventStore
    redis: fakeredis.FakeRedis

    def seed(self, stream_id: str, n: int, stream_type: str = "ledger") -> None:
        head = self.store.head_version(stream_type, stream_id)
        events = [NewEvent("Deposited", {"amount": head + i}) for i in range(1, n + 1)]
        self.store.append(stream_type, stream_id, events, expected_version=head)

    def live(self, stream_id: str, stream_type: str = "ledger") -> list[int]:
        return [e.version for e in self.store.read(stream_type, stream_id)]

    def state(self, stream_id: str) -> tuple[object, int]:
        snaps = SqlSnapshotStore(self.store.engine, create_tables=False)
        return load_state(self.store, snaps, Ledger(), dict, "ledger", stream_id)


@pytest.fixture(scope="module")
def _running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessFleet]:
    """One app and one in-process worker for the module (a worker takes seconds to stop)."""
    path = tmp_path_factory.mktemp("in-process") / "events.db"
    settings = EskitSettings(
        database_url=f"sqlite:///{path}",
        broker_url="memory://",
        result_backend="cache+memory://",
        decider_modules="tests.fleet_deciders",
        locked_max_retries=0,
        fanout_page_size=4,
        fanout_backoff=0,
        metrics_port=None,
    )
    store = SqlEventStore.from_url(settings.database_url)
    client = fakeredis.FakeRedis()
    with pytest.MonkeyPatch.context() as env:
        env.delenv("CELERY_BROKER_URL", raising=False)
        env.delenv("CELERY_RESULT_BACKEND", raising=False)
        app = create_app(
            settings,
            config={
                "broker_url": "memory://",
                "result_backend": "cache+memory://",
                "broker_transport_options": {"polling_interval": 0.01},
            },
            resources=Resources(settings, store=store, redis=client),
        )
        with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=10):
            yield InProcessFleet(app, store, client)
    store.engine.dispose()


@pytest.fixture
def fleet(_running: InProcessFleet) -> InProcessFleet:
    """The module's fleet with an empty database and an empty Redis."""
    with _running.store.engine.begin() as conn:
        for table in reversed(metadata.sorted_tables):
            conn.execute(table.delete())
    _running.redis.flushall()
    _running.app.backend.client.cache.clear()  # results stored by earlier tests' task ids
    return _running


def _send(fleet: InProcessFleet, stream_id: str, stream_type: str = "ledger", **policy):
    return fleet.app.tasks[COMPACT_STREAM_TASK].apply_async(
        args=(stream_type, stream_id), kwargs=policy
    )


def _compact(fleet: InProcessFleet, stream_id: str, stream_type: str = "ledger", **policy):
    """The task's result, whatever its outcome (one that needs attention is FAILURE)."""
    sent = _send(fleet, stream_id, stream_type, **policy)
    found = compaction_result(sent.id, app=fleet.app, timeout=30)
    assert found is not None, sent.state
    return found


def test_a_stream_is_compacted_and_its_state_kept(fleet: InProcessFleet):
    fleet.seed("a", 12)
    before = fleet.state("a")

    got = _compact(fleet, "a", retain_last=2)

    assert (got["outcome"], got["events_deleted"], got["snapshot_version"]) == (
        "compacted",
        10,
        10,
    )
    assert fleet.live("a") == [11, 12]
    assert fleet.state("a") == before == (ledger_fold(list(range(1, 13))), 12)


@pytest.mark.parametrize(
    ("policy", "words"),
    [
        ({"retain_last": -1}, "retain_last"),
        ({"retain_younger_than": "soon"}, "retain_younger_than"),
        ({"no_such_option": 1}, "no_such_option"),
    ],
)
def test_an_invalid_policy_is_a_failed_result_and_deletes_nothing(
    fleet: InProcessFleet, policy: dict[str, object], words: str
):
    fleet.seed("a", 6)

    got = _compact(fleet, "a", **policy)

    assert got["outcome"] == Outcome.FAILED
    assert got["error_type"] == "InvalidPolicyError"
    assert words in got["error"]
    assert fleet.live("a") == [1, 2, 3, 4, 5, 6]


def test_a_stream_type_without_a_decider_is_a_failed_result(fleet: InProcessFleet):
    fleet.seed("g", 6, stream_type="ghost")

    got = _compact(fleet, "g", stream_type="ghost")

    assert (got["outcome"], got["error_type"]) == ("failed", "UnknownStreamTypeError")
    assert "ghost" in got["error"]
    assert fleet.live("g", stream_type="ghost") == [1, 2, 3, 4, 5, 6]


def test_a_stream_locked_by_another_task_is_reported_locked(fleet: InProcessFleet):
    fleet.seed("a", 6)
    from eskit_tasks.fleet.locks import StreamLock

    held = StreamLock(fleet.redis, "ledger", "a", ttl=30, owner="someone-else")
    assert held.acquire()

    got = _compact(fleet, "a")

    assert (got["outcome"], got["events_deleted"]) == ("locked", 0)
    assert "someone-else" in got["error"]
    assert fleet.live("a") == [1, 2, 3, 4, 5, 6]
    held.release()


def test_a_result_that_needs_attention_is_stored_as_failure_and_read_back(
    fleet: InProcessFleet,
):
    """Flower shows a task's state from the backend: an outcome that needs attention is
    FAILURE, carrying the whole result; a compaction is SUCCESS and .get() its result."""
    fleet.seed("a", 6)
    fleet.seed("g", 6, stream_type="ghost")

    good = _send(fleet, "a", retain_last=1)
    bad = _send(fleet, "g", stream_type="ghost")

    assert good.get(timeout=30)["outcome"] == "compacted"
    with pytest.raises(CompactionNeedsAttention) as raised:
        bad.get(timeout=30)
    assert (good.state, bad.state) == ("SUCCESS", "FAILURE")
    stored = compaction_result(bad.id, app=fleet.app)
    assert stored is not None and raised.value.result == stored
    assert (stored["outcome"], stored["stream_id"]) == ("failed", "g")
    assert str(raised.value).startswith("failed ghost/g: no decider registered")
    assert compaction_result(good.id, app=fleet.app) == good.get()
    assert compaction_result("no-such-task", app=fleet.app) is None


@pytest.mark.parametrize(
    ("status", "result", "found"),
    [
        ("SUCCESS", {"outcome": "compacted", "stream_id": "s"}, True),
        ("SUCCESS", {"run_id": "r", "enqueued": 3}, False),  # a fan-out's result
        ("FAILURE", {"exc_type": "TimeLimitExceeded", "exc_module": "x", "exc_message": []}, False),
        ("PENDING", None, False),
    ],
)
def test_compaction_result_of_a_raw_backend_entry(status: str, result: Any, found: bool):
    assert (compaction_result_of({"status": status, "result": result}) is not None) is bool(found)


def test_compaction_result_of_a_raw_failure_carrying_one():
    carried = {"outcome": "fenced", "stream_id": "s", "stream_type": "t"}
    raw = {
        "status": "FAILURE",
        "result": {
            "exc_type": "CompactionNeedsAttention",
            "exc_module": "eskit_tasks.errors",
            "exc_message": ["fenced t/s", carried],
        },
    }
    assert compaction_result_of(raw) == carried
    assert compaction_result_of({**raw, "result": {**raw["result"], "exc_module": "other"}}) is None


def test_a_run_compacts_every_candidate_and_counts_them(fleet: InProcessFleet):
    for n in range(9):  # three pages of four: the fan-out pages through all of them
        fleet.seed(f"s-{n}", 6)
    fleet.seed("small", 2)  # below min_events

    run = compact_all(min_events=5, retain_last=1, app=fleet.app)
    final = run.wait(timeout=60, poll=0.05)

    assert (final.candidates, final.done, final.outcomes) == (9, 9, {"compacted": 9})
    assert final.events_deleted == 9 * 5
    assert all(fleet.live(f"s-{n}") == [6] for n in range(9))
    assert fleet.live("small") == [1, 2]
    summary = CompactionRun(run.run_id, app=fleet.app).summary()
    assert summary.finished and summary.failed_streams == []


def test_max_streams_caps_a_run(fleet: InProcessFleet):
    for n in range(10):
        fleet.seed(f"s-{n}", 6)

    final = compact_all(min_events=5, max_streams=3, app=fleet.app).wait(timeout=60, poll=0.05)

    assert (final.candidates, final.done, final.outcomes) == (3, 3, {"compacted": 3})
    compacted = [n for n in range(10) if fleet.live(f"s-{n}") == []]
    untouched = [n for n in range(10) if fleet.live(f"s-{n}") == [1, 2, 3, 4, 5, 6]]
    assert len(compacted) == 3 and len(untouched) == 7


def test_a_dry_run_reports_what_would_go_and_deletes_nothing(fleet: InProcessFleet):
    for n in range(3):
        fleet.seed(f"s-{n}", 8)

    final = compact_all(min_events=5, retain_last=3, dry_run=True, app=fleet.app).wait(
        timeout=60, poll=0.05
    )

    assert final.outcomes == {"dry_run": 3}
    assert (final.events_deleted, final.dry_run_events) == (0, 3 * 5)
    assert all(fleet.live(f"s-{n}") == list(range(1, 9)) for n in range(3))


def test_failed_streams_are_listed_with_their_error(fleet: InProcessFleet):
    fleet.seed("ok", 6)
    fleet.seed("bad", 6, stream_type="ghost")

    run = compact_all(min_events=5, app=fleet.app)
    run.wait(timeout=60, poll=0.05)
    summary = run.summary()

    # Counted once: the task's deliberate failure is not counted again as a death.
    assert (summary.candidates, summary.done) == (2, 2)
    assert summary.outcomes == {"compacted": 1, "failed": 1}
    [failed] = summary.failed_streams
    assert (failed.stream_type, failed.stream_id, failed.outcome) == ("ghost", "bad", "failed")
    assert failed.error is not None and "ghost" in failed.error


@pytest.mark.parametrize(
    ("error_type", "retried"),
    [
        ("DatabaseUnavailableError", True),
        ("CommitOutcomeUnknownError", True),  # a subclass: the retry settles the commit
        ("LockLostError", True),
        ("FencedError", False),  # a newer compaction owns the stream: retrying is pointless
        ("EvolveError", False),
        (None, False),
    ],
)
def test_which_failed_results_a_task_retries(error_type: str | None, retried: bool):
    from eskit_tasks import CompactionResult
    from eskit_tasks.fleet.redelivery import is_transient

    result = CompactionResult(
        stream_type="t",
        stream_id="s",
        outcome=Outcome.FAILED,
        error_type=error_type,
        compaction_id="c",
    )
    assert is_transient(result) is retried


def test_ready_made_resources_are_not_shared_with_a_forked_worker(tmp_path):
    """A prefork child must never use its parent's connections: ready-made Resources
    serve the process that made the app and are refused, with advice, after a fork;
    a factory makes new ones in each process."""
    import os

    from eskit_tasks.errors import ConfigurationError

    settings = EskitSettings(database_url=f"sqlite:///{tmp_path / 'x.db'}")
    given = Resources(settings, redis=fakeredis.FakeRedis())
    app = create_app(settings, config={"broker_url": "memory://"}, resources=given)
    made = create_app(
        settings, config={"broker_url": "memory://"}, resources=lambda: Resources(settings)
    )
    assert app.eskit_resources.get() is given
    parent_made = made.eskit_resources.get()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what it got, then leave without cleaning up
        try:
            try:
                app.eskit_resources.get()
                verdict = "shared"
            except ConfigurationError as exc:
                verdict = "refused" if "factory" in str(exc) else f"other: {exc}"
            fresh = made.eskit_resources.get() is not parent_made
            os.write(write, f"{verdict},{fresh}".encode())
        finally:
            os._exit(0)
    os.close(write)
    got = os.read(read, 1000).decode()
    os.waitpid(pid, 0)
    assert got == "refused,True"


RUN = "0123456789abcdef0123456789abcdef"


class _Killed(BaseException):
    """The process dies here (what kill -9 does to a worker, as far as this task goes)."""


@pytest.mark.parametrize("where", ["after the compaction", "after a refusal"])
def test_a_copy_killed_after_claiming_its_result_still_counts_in_the_run(
    fleet: InProcessFleet, monkeypatch: pytest.MonkeyPatch, where: str
):
    """The copy that finishes first claims the task's result; if it dies before the run
    has counted the stream, the redelivered copy skips the finished task, and the run
    would never finish. The claim holds the result, and the copy that finds the task
    claimed counts it."""
    from eskit_tasks.fleet import compact_task, redelivery
    from eskit_tasks.fleet.resources import resources_of

    fleet.seed("a", 12)
    policy = {"retain_last": 2} if where == "after the compaction" else {"retain_last": -1}
    progress = resources_of(fleet.app).progress
    progress.create(RUN, policy)
    real = redelivery.report_to_run
    deaths: list[str] = []

    def die_at_first_count(*args: Any) -> None:
        if not deaths:
            deaths.append("killed")
            raise _Killed()
        real(*args)

    for module in (redelivery, compact_task):  # wherever the task counts from
        monkeypatch.setattr(module, "report_to_run", die_at_first_count, raising=False)
    task = fleet.app.tasks[COMPACT_STREAM_TASK]
    with pytest.raises(_Killed):
        task.apply(args=("ledger", "a"), kwargs={"run_id": RUN, **policy}, task_id="t-1")
    assert progress.get(RUN).done == 0  # claimed, not counted
    # The message is redelivered (it was never acknowledged) and runs again.
    task.apply(args=("ledger", "a"), kwargs={"run_id": RUN, **policy}, task_id="t-1")
    counted = progress.get(RUN)
    assert counted is not None and counted.done == 1, counted
    if where == "after the compaction":
        assert (counted.outcomes, counted.events_deleted) == ({"compacted": 1}, 10)
    else:
        assert counted.outcomes == {"failed": 1}


@pytest.mark.parametrize("order", ["one after the other", "interleaved"])
def test_only_the_owner_of_a_task_result_is_counted_in_the_run(
    monkeypatch: pytest.MonkeyPatch, order: str
):
    """Two copies of one task finish: the first to claim owns the result, and the run
    counts the owner's outcome, whichever copy counts first (from review: counting before
    claiming let the stale copy's "fenced" into the run while the other copy owned a
    "compacted" result)."""
    import types

    from eskit_tasks.errors import FencedError
    from eskit_tasks.fleet import redelivery
    from eskit_tasks.fleet.redelivery import TaskCopy

    res = Resources(EskitSettings(metrics_port=None), redis=fakeredis.FakeRedis())
    res.progress.create(RUN, {})
    task = types.SimpleNamespace(request=types.SimpleNamespace(id="t-1", retries=0), app=None)
    good, late = TaskCopy(task, res, RUN), TaskCopy(task, res, RUN)
    won = CompactionResult.failed("ledger", "s", "x", compaction_id=good.compaction_id)
    won = won.model_copy(
        update={
            "outcome": Outcome.COMPACTED,
            "error": None,
            "error_type": None,
            "events_deleted": 8,
        }
    )
    stale = CompactionResult.failed(
        "ledger", "s", FencedError("stale"), outcome=Outcome.FENCED, compaction_id=won.compaction_id
    )
    claims: dict[str, bool] = {}
    if order == "interleaved":  # the good copy finishes while the stale one counts
        real = redelivery.report_to_run

        def count(res_: Resources, run_id: str, result: CompactionResult, app: Any) -> None:
            real(res_, run_id, result, app)
            if result is stale and "good" not in claims:
                claims["good"] = good.claim_result(won)

        monkeypatch.setattr(redelivery, "report_to_run", count)
        claims["late"] = late.claim_result(stale)
    else:
        claims["good"] = good.claim_result(won)
        claims["late"] = late.claim_result(stale)
    assert sorted(claims.values()) == [False, True]  # one owner
    owner = won if claims["good"] else stale
    counted = res.progress.get(RUN)
    assert counted is not None
    assert (counted.done, counted.outcomes) == (1, {owner.outcome.value: 1})
    assert counted.events_deleted == owner.events_deleted


class FakeSource:
    """Streams kept outside the store: ``n`` of them, keys 1..n, each compacted at once
    (the fleet's handling of sources, without a database of their own)."""

    def __init__(self, name: str, n: int, *, broken: bool = False) -> None:
        self.name, self.n, self.broken = name, n, broken
        self.compacted: list[str] = []
        self.reclaims = 0

    def reclaim(self, *, full: bool = False) -> Any:
        self.reclaims += 1
        return None

    def candidate_page(self, *, after: int, limit: int, min_live_events: int):
        from eskit_tasks.ports import Candidate

        if self.broken:
            from eskit_tasks.errors import ConfigurationError

            raise ConfigurationError(f"application {self.name} cannot be paged")
        keys = [k for k in range(after + 1, self.n + 1)][:limit]
        page = [Candidate(k, self.name, f"{self.name}-{k}", 10) for k in keys]
        return page, (keys[-1] if keys and keys[-1] < self.n else None)

    def compactor(self, policy: Any, *, guard: Any = None) -> Any:
        source = self

        class Compacts:
            def compact(self, stream_id: str, *, compaction_id: str | None = None, run_id=None):
                if guard is not None:
                    guard()
                source.compacted.append(stream_id)
                return CompactionResult(
                    stream_type=source.name,
                    stream_id=stream_id,
                    outcome=Outcome.COMPACTED,
                    events_deleted=1,
                    compaction_id=compaction_id or "x",
                )

        return Compacts()


@pytest.fixture
def sources() -> Iterator[list[str]]:
    from eskit_tasks.core.registry import registered_sources, unregister_source

    made: list[str] = []
    yield made
    for name in registered_sources():
        unregister_source(name)


def test_a_run_pages_the_stores_streams_then_each_source(fleet: InProcessFleet, sources: list[str]):
    from eskit_tasks.core.registry import register_source

    for n in range(3):
        fleet.seed(f"s-{n}", 6)
    apps = [FakeSource("AppA", 5), FakeSource("AppB", 6)]
    for app in apps:
        register_source(app.name, app)
    final = compact_all(min_events=5, retain_last=1, app=fleet.app).wait(timeout=60, poll=0.05)
    assert (final.candidates, final.done, final.outcomes) == (14, 14, {"compacted": 14})
    assert [sorted(a.compacted) for a in apps] == [
        sorted(f"AppA-{k}" for k in range(1, 6)),
        sorted(f"AppB-{k}" for k in range(1, 7)),
    ]
    # The run ends by reclaiming each application once, not after each stream.
    assert [a.reclaims for a in apps] == [1, 1]
    assert final.reclaim is not None and set(final.reclaim["applications"]) == {"AppA", "AppB"}


def test_a_source_that_cannot_be_paged_fails_the_run_with_its_reason(
    fleet: InProcessFleet, sources: list[str]
):
    """From review: the fan-out died quietly and the run waited for ever."""
    from eskit_tasks.core.registry import register_source

    fleet.seed("s-0", 6)
    register_source("AppX", FakeSource("AppX", 3, broken=True))
    final = compact_all(min_events=5, retain_last=1, app=fleet.app).wait(timeout=60, poll=0.05)
    assert final.error is not None and "AppX cannot be paged" in final.error
    assert final.outcomes == {"compacted": 1}  # the store's stream, before it


def test_a_run_keeps_its_sources_when_another_is_registered_meanwhile(
    fleet: InProcessFleet, sources: list[str]
):
    """From review: the cursor's segment was a position in the sources registered in the
    worker taking the page, so registering one mid-run made the run offer a source twice
    and skip another. A run pages the sources it started with."""
    from eskit_tasks.core.registry import register_source
    from eskit_tasks.fleet import fan_out as fan_out_module

    b = FakeSource("AppB", 10)
    register_source("AppB", b)
    real = fan_out_module.run_page
    pages: list[int] = []

    def register_a_after_the_first_page(*args: Any, **kwargs: Any) -> Any:
        found = real(*args, **kwargs)
        pages.append(len(found[0]))
        if len(pages) == 1:
            register_source("AppA", FakeSource("AppA", 10))  # sorts before AppB
        return found

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fan_out_module, "run_page", register_a_after_the_first_page)
        final = compact_all(min_events=1, app=fleet.app).wait(timeout=60, poll=0.05)
    assert (final.candidates, final.outcomes) == (10, {"compacted": 10}), final
    assert sorted(b.compacted) == sorted(f"AppB-{k}" for k in range(1, 11))


def test_run_progress_reads_as_utc_times_and_elapsed_but_keeps_its_floats():
    """Issue 14, case 8: run.progress() in a shell shows times a person can read."""
    from eskit_tasks.fleet.progress import RunProgress

    p = RunProgress(
        run_id="a" * 32,
        started_at=1796281200.25,  # 2026-12-03T07:00:00Z
        updated_at=1796281265.5,
        policy={"retain_last": 1},
        candidates=10,
        done=4,
    )
    shown = repr(p)
    assert "started_at=2026-12-03T07:00:00Z" in shown
    assert "updated_at=2026-12-03T07:01:05Z" in shown and "elapsed=1m05s" in shown
    assert "1796281200" not in shown
    assert str(p) == (
        f"run {'a' * 32}: running, 4 of 10 streams done, started 2026-12-03T07:00:00Z, "
        "elapsed 1m05s, updated 2026-12-03T07:01:05Z"
    )
    assert (p.started_at, p.model_dump()["updated_at"]) == (1796281200.25, 1796281265.5)
    assert p.started.isoformat() == "2026-12-03T07:00:00.250000+00:00"
    assert p.elapsed_s == pytest.approx(65.25)


def test_a_run_keeps_each_stream_result_for_its_followers(fleet: InProcessFleet):
    """Issue 14, case 11: what compact-all --wait --json prints a line for, each once."""
    for n in range(6):
        fleet.seed(f"r-{n}", 3 + n)
    fleet.seed("g-1", 3, stream_type="ghost")
    run = compact_all(retain_last=1, app=fleet.app)
    run.wait(timeout=60, poll=0.05)

    first, after = run.results()
    assert sorted((r.stream_type, r.stream_id, r.outcome.value) for r in first) == [
        ("ghost", "g-1", "failed"),
        *(("ledger", f"r-{n}", "compacted") for n in range(6)),
    ]
    assert {r.stream_id: r.events_deleted for r in first}["r-5"] == 7
    assert run.results(after) == ([], after)  # nothing twice
    assert run.results()[0] == first  # a new follower reads them from the start
