"""Compaction racing real writers and readers in separate OS processes, on PostgreSQL
and on an SQLite file, and the reader's retry when a compaction outdates the snapshot it
just read.

Every event's amount is its own version, so the Ledger state at version v is fully
determined: ``total == v * (v + 1) / 2``, ``count == v``, ``last == v``. A state folded
across a gap, from a wrong snapshot or with an event folded twice cannot satisfy all
three at once — readers check every state they load against that.
"""

from __future__ import annotations

import multiprocessing
import queue as queue_module
import random
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from eskit_tasks import (
    CompactionPolicy,
    Compactor,
    ConcurrencyError,
    Outcome,
    Snapshot,
    SnapshotStore,
    SqlEventStore,
    SqlSnapshotStore,
    StoreError,
    VersionGapError,
    load_state,
)
from eskit_tasks.core.loading import LOAD_RETRIES
from eskit_tasks.testing.deciders import Ledger, deposits, ledger_fold
from tests.backends import MemoryBackend, PostgresBackend, SqliteBackend, Stores

#: Seconds the writers, readers and compactors run together.
RUN_SECONDS = 7.0
#: Seconds a child may take to start (spawn re-imports everything) or to report back.
CHILD_TIMEOUT_S = 60.0
STREAMS = 10
#: Violations a child reports in full; the rest are only counted.
MAX_REPORTED = 20


def consistent(v: int) -> dict[str, int]:
    """The only Ledger state at version v when every amount equals its version."""
    return {"total": v * (v + 1) // 2, "count": v, "last": v}


# -- the child processes (module level: spawn pickles them by reference) ---------------


def _rng(seed: int) -> random.Random:
    """A seeded generator for the workload (which stream, how many events, ...)."""
    return random.Random(seed)


@dataclass(frozen=True)
class ChildConfig:
    name: str
    url: str
    stream_type: str
    stream_ids: tuple[str, ...]
    seed: int
    #: Stop on your own after this long, even if the parent never says so (it may be dead).
    give_up_after_s: float = RUN_SECONDS + 2 * CHILD_TIMEOUT_S


@dataclass
class Report:
    """What a child sends back when it is done."""

    name: str
    counters: Counter[str] = field(default_factory=Counter)
    #: Events appended per stream (writers only).
    appended: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    violation_count: int = 0

    def violation(self, message: str) -> None:
        self.violation_count += 1
        if len(self.violations) < MAX_REPORTED:
            self.violations.append(f"{self.name}: {message}")


class CountingSnapshots:
    """Counts ``latest`` calls: more calls than loads means load_state retried.

    With ``rng``, it sometimes pauses for up to 5 ms after reading the snapshot, like a
    reader descheduled between reading the snapshot and reading the events after it:
    that widens the window in which a compaction outdates the snapshot.
    """

    def __init__(self, inner: SnapshotStore, rng: random.Random | None = None) -> None:
        self.inner = inner
        self.rng = rng
        self.latest_calls = 0

    def latest(self, stream_type: str, stream_id: str) -> Snapshot | None:
        self.latest_calls += 1
        snap = self.inner.latest(stream_type, stream_id)
        if self.rng is not None and self.rng.random() < 0.5:
            time.sleep(self.rng.uniform(0, 0.005))
        return snap

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _child(
    role: Callable[[ChildConfig, SqlEventStore, Report, Any], None],
    config: ChildConfig,
    start: Any,
    stop: Any,
    results: Any,
) -> None:
    """Connect, say ready, wait for the start signal, run ``role``, always report back."""
    report = Report(config.name)
    store = None
    try:
        store = SqlEventStore.from_url(config.url)
        store.head_version(config.stream_type, config.stream_ids[0])  # really connected
        results.put(("ready", config.name, None))
        if not start.wait(CHILD_TIMEOUT_S):
            report.violation("never got the start signal")
            return
        deadline = time.monotonic() + config.give_up_after_s

        def running() -> bool:
            return not stop.is_set() and time.monotonic() < deadline

        role(config, store, report, running)
    except BaseException:
        report.violation(f"crashed:\n{traceback.format_exc()}")
    finally:
        results.put(("done", config.name, report))
        if store is not None:
            store.engine.dispose()


def _write(config: ChildConfig, store: SqlEventStore, report: Report, running: Any) -> None:
    rng = _rng(config.seed)
    while running():
        stream_id = rng.choice(config.stream_ids)
        n = rng.randint(1, 3)
        while running():  # optimistic concurrency: re-read the head and retry until it fits
            try:
                head = store.head_version(config.stream_type, stream_id)
                new_head = store.append(
                    config.stream_type,
                    stream_id,
                    deposits(*range(head + 1, head + n + 1)),  # amount == version
                    expected_version=head,
                )
            except ConcurrencyError:
                report.counters["conflicts"] += 1
                continue
            except StoreError as exc:  # e.g. SQLite's "database is locked": never expected
                report.violation(f"append to {stream_id} raised {type(exc).__name__}: {exc}")
                break
            if new_head != head + n:
                report.violation(f"append after {head} of {n} returned head {new_head}")
            report.appended[stream_id] += n
            report.counters["appends"] += 1
            break


def _read(config: ChildConfig, store: SqlEventStore, report: Report, running: Any) -> None:
    rng = _rng(config.seed)
    snapshots = CountingSnapshots(SqlSnapshotStore(store.engine), rng)
    seen: dict[str, int] = {}
    while running():
        stream_id = rng.choice(config.stream_ids)
        try:
            state, version = load_state(
                store, snapshots, Ledger(), dict, config.stream_type, stream_id
            )
        except Exception as exc:
            report.violation(f"load_state({stream_id}) raised {type(exc).__name__}: {exc}")
            continue
        report.counters["reads"] += 1
        if state != consistent(version):
            report.violation(f"{stream_id} at version {version}: inconsistent state {state}")
        if version < seen.get(stream_id, 0):
            report.violation(f"{stream_id} went back from version {seen[stream_id]} to {version}")
        seen[stream_id] = version
    report.counters["retries"] = snapshots.latest_calls - report.counters["reads"]


def _compact(config: ChildConfig, store: SqlEventStore, report: Report, running: Any) -> None:
    rng = _rng(config.seed)
    snapshots = SqlSnapshotStore(store.engine)
    ids = list(config.stream_ids)
    while running():
        rng.shuffle(ids)
        for stream_id in ids:
            if not running():
                break
            result = Compactor(
                store=store,
                snapshot_store=snapshots,
                decider=Ledger(),
                state_type=dict,
                policy=CompactionPolicy(retain_last=rng.randint(0, 5)),
            ).compact(config.stream_type, stream_id)
            report.counters[result.outcome.value] += 1
            if result.outcome in (Outcome.FAILED, Outcome.VERIFICATION_FAILED):
                report.violation(f"{stream_id}: {result.outcome}: {result.error}")
            elif result.outcome is Outcome.COMPACTED:
                report.counters["events_deleted"] += result.events_deleted
                assert result.snapshot_version is not None
                planned = result.snapshot_version - result.compacted_through_before
                if result.events_deleted != planned:
                    report.violation(
                        f"{stream_id}: deleted {result.events_deleted} events, planned {planned}"
                    )


def writer(config: ChildConfig, start: Any, stop: Any, results: Any) -> None:
    _child(_write, config, start, stop, results)


def reader(config: ChildConfig, start: Any, stop: Any, results: Any) -> None:
    _child(_read, config, start, stop, results)


def compactor(config: ChildConfig, start: Any, stop: Any, results: Any) -> None:
    _child(_compact, config, start, stop, results)


# -- the parent -------------------------------------------------------------------------


def _collect(results: Any, names: set[str], kind: str, pending: dict[str, Report]) -> None:
    """Wait until every child in ``names`` sent ``kind`` (a ``done`` also ends ``ready``)."""
    waiting = set(names)
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while waiting:
        try:
            got, name, report = results.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue_module.Empty:
            pytest.fail(f"no {kind!r} from {sorted(waiting)} within {CHILD_TIMEOUT_S}s")
        if got == "done":
            pending[name] = report
        if got == kind or got == "done":
            waiting.discard(name)


def _check_streams_after_the_race(
    setup: SqlEventStore,
    stream_type: str,
    stream_ids: tuple[str, ...],
    appended: Counter[str],
    totals: Counter[str],
) -> int:
    """Check every stream against what the writers appended; return the events the
    audit log says were deleted."""
    snapshots = SqlSnapshotStore(setup.engine)
    logged = 0
    for stream_id in stream_ids:
        head = appended[stream_id]
        assert head > 0, f"{stream_id}: no writes at all ({totals})"
        assert setup.head_version(stream_type, stream_id) == head
        state, version = load_state(setup, snapshots, Ledger(), dict, stream_type, stream_id)
        assert (state, version) == (ledger_fold(list(range(1, head + 1))), head)
        assert state == consistent(head)
        info = setup.stream_info(stream_type, stream_id)
        assert info is not None
        ct = info.compacted_through
        live = [e.version for e in setup.read(stream_type, stream_id)]
        assert live == list(range(ct + 1, head + 1))
        latest = snapshots.latest(stream_type, stream_id)
        assert (latest.version if latest else 0) == ct
        # The audit log: contiguous ranges from 1 to the compaction point, each once.
        log = sorted(
            setup.compaction_log(stream_type, stream_id, limit=100_000),
            key=lambda r: r.through_version,
        )
        covered = 0
        for row in log:
            assert row.from_version == covered + 1, (stream_id, row)
            assert row.events_deleted == row.through_version - covered, (stream_id, row)
            covered = row.through_version
        assert covered == ct
        logged += sum(row.events_deleted for row in log)
    return logged


@pytest.fixture(params=[pytest.param("postgres", marks=pytest.mark.services), "sqlite"])
def race_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The database the race runs on: the session's PostgreSQL database, or a fresh
    SQLite file (WAL, BEGIN IMMEDIATE for writes, 30 s busy timeout)."""
    if request.param == "postgres":
        url: str = request.getfixturevalue("postgres_url")
        return url
    return f"sqlite:///{tmp_path / 'race.db'}"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_compactors_race_writers_and_readers_in_separate_processes(race_url: str):
    """2 writers append deposits (amount == version, optimistic concurrency with retry)
    to 10 streams, 2 readers ``load_state`` in a loop and 2 compactors loop over the
    streams with a random retain_last (0..5), all in separate processes for ~7 s, on
    PostgreSQL and on an SQLite file.

    * no child sees a StoreError other than ConcurrencyError — on SQLite that means
      concurrent writers queue on the busy timeout and never get "database is locked";
    * every state a reader loads is the consistent state at its version, and a reader
      never sees a stream go back to an older version;
    * no compaction ends ``failed`` or ``verification_failed`` (``fenced`` is fine), and
      each ``compacted`` one deleted exactly the events it planned;
    * compactions really deleted events, and readers really read, meanwhile;
    * afterwards every stream's head is the number of events appended, ``load_state``
      gives the full fold, the stored events are exactly compacted_through+1..head, and
      the audit log accounts for every deleted event exactly once.
    """
    # The tables exist before the children race to create them.
    SqlEventStore.from_url(race_url).engine.dispose()
    stream_type = f"proc-{uuid.uuid4().hex}"
    stream_ids = tuple(f"account-{i}-{uuid.uuid4().hex[:8]}" for i in range(STREAMS))
    roles = [
        ("writer-1", writer),
        ("writer-2", writer),
        ("reader-1", reader),
        ("reader-2", reader),
        ("compactor-1", compactor),
        ("compactor-2", compactor),
    ]
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    start, stop = ctx.Event(), ctx.Event()
    processes = []
    reports: dict[str, Report] = {}
    try:
        for seed, (name, target) in enumerate(roles):
            config = ChildConfig(name, race_url, stream_type, stream_ids, seed)
            process = ctx.Process(
                target=target, args=(config, start, stop, results), name=name, daemon=True
            )
            process.start()
            processes.append(process)
        names = {name for name, _ in roles}
        _collect(results, names, "ready", reports)
        start.set()
        time.sleep(RUN_SECONDS)
        stop.set()
        _collect(results, names - set(reports), "done", reports)
        for process in processes:
            process.join(CHILD_TIMEOUT_S)
            assert process.exitcode == 0, f"{process.name} exited with {process.exitcode}"
    finally:
        stop.set()
        start.set()
        for process in processes:
            if process.is_alive():
                process.terminate()
                process.join(5)
            if process.is_alive():
                process.kill()
                process.join(5)
        results.close()
        results.join_thread()

    violations = [v for r in reports.values() for v in r.violations]
    violation_count = sum(r.violation_count for r in reports.values())
    assert violation_count == 0, f"{violation_count} violations, first ones:\n" + "\n".join(
        violations
    )
    totals: Counter[str] = Counter()
    appended: Counter[str] = Counter()
    for report in reports.values():
        totals.update(report.counters)
        appended.update(report.appended)
    assert totals["compacted"] > 0, totals
    assert totals["events_deleted"] > 0, totals
    assert totals["reads"] >= 200, totals
    assert totals["appends"] >= 100, totals

    setup = SqlEventStore.from_url(race_url)
    try:
        logged = _check_streams_after_the_race(setup, stream_type, stream_ids, appended, totals)
    finally:
        setup.engine.dispose()
    assert logged == totals["events_deleted"]


# -- a reader whose snapshot is outdated by a compaction ------------------------------


class SnapshotsWithHook:
    """Wraps a snapshot store; runs ``hook`` right after the ``hook_on``-th ``latest()``
    read its answer, before the caller gets it — i.e. before the caller reads events."""

    def __init__(self, inner: SnapshotStore, hook: Callable[[], None], *, hook_on: int = 1) -> None:
        self.inner = inner
        self.hook = hook
        self.hook_on = hook_on
        self.latest_calls = 0
        self.returned: list[int] = []

    def latest(self, stream_type: str, stream_id: str) -> Snapshot | None:
        self.latest_calls += 1
        snap = self.inner.latest(stream_type, stream_id)
        if self.latest_calls == self.hook_on:
            self.hook()
        self.returned.append(0 if snap is None else snap.version)
        return snap

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class StaleSnapshots:
    """A snapshot store frozen in the past: ``latest()`` always gives ``stale``."""

    def __init__(self, inner: SnapshotStore, stale: Snapshot | None) -> None:
        self.inner = inner
        self.stale = stale
        self.latest_calls = 0

    def latest(self, stream_type: str, stream_id: str) -> Snapshot | None:
        self.latest_calls += 1
        return self.stale

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


AMOUNTS = [5, -3, 12, 7, 0, -20, 31, 4, 9, 2]
STREAM = "outdated-account"


def _compact_now(stores: Stores, stream_id: str, retain_last: int) -> int:
    result = Compactor(
        store=stores.events,
        snapshot_store=stores.snapshots,
        decider=Ledger(),
        state_type=dict,
        policy=CompactionPolicy(retain_last=retain_last),
    ).compact(STREAM, stream_id)
    assert result.outcome is Outcome.COMPACTED, result
    assert result.snapshot_version is not None
    return result.snapshot_version


def _small_pages(stores: Stores) -> Any:
    """The event store, reading 2 rows per round trip when it is SQL."""
    if isinstance(stores.events, SqlEventStore):
        return SqlEventStore(stores.events.engine, create_tables=False, page_size=2)
    return stores.events


# (retain_last of an earlier compaction or None, retain_last of the racing one)
RACES = [
    pytest.param(None, 3, id="no-snapshot-then-compacted-to-7"),
    pytest.param(None, 0, id="no-snapshot-then-compacted-to-head"),
    pytest.param(6, 2, id="snapshot-4-then-compacted-to-8"),
    pytest.param(6, 0, id="snapshot-4-then-compacted-to-head"),
]


class OutdatedSnapshotContract:
    @pytest.fixture
    def stream_id(self, stores: Stores) -> str:
        """A fresh stream holding AMOUNTS as versions 1..10."""
        stream_id = uuid.uuid4().hex
        stores.events.append(STREAM, stream_id, deposits(*AMOUNTS), expected_version=0)
        return stream_id

    @pytest.mark.parametrize(("earlier", "racing"), RACES)
    def test_reader_retries_from_the_newest_snapshot_when_its_events_are_gone(
        self, stores: Stores, stream_id: str, earlier: int | None, racing: int
    ):
        """``latest()`` hands the reader the snapshot that was newest (or none), but a
        compaction commits before the reader reads the events after it: those are
        deleted. load_state must notice (a gap, or no events below the head), start
        over exactly once from the newest snapshot and return the full fold."""
        base = 0 if earlier is None else _compact_now(stores, stream_id, earlier)
        cut: list[int] = []
        snapshots = SnapshotsWithHook(
            stores.snapshots, lambda: cut.append(_compact_now(stores, stream_id, racing))
        )
        state, version = load_state(stores.events, snapshots, Ledger(), dict, STREAM, stream_id)
        assert (state, version) == (ledger_fold(AMOUNTS), len(AMOUNTS))
        assert cut == [len(AMOUNTS) - racing]
        assert snapshots.latest_calls == 2
        assert snapshots.returned == [base, cut[0]]

    @pytest.mark.parametrize(("earlier", "racing"), RACES)
    def test_reader_never_folds_across_the_gap_of_a_snapshot_that_stays_outdated(
        self, stores: Stores, stream_id: str, earlier: int | None, racing: int
    ):
        """A snapshot store that keeps answering with the outdated snapshot: load_state
        retries LOAD_RETRIES times, then raises VersionGapError — it never returns a state
        folded across the deleted events."""
        if earlier is not None:
            _compact_now(stores, stream_id, earlier)
        stale = stores.snapshots.latest(STREAM, stream_id)
        _compact_now(stores, stream_id, racing)
        snapshots = StaleSnapshots(stores.snapshots, stale)
        with pytest.raises(VersionGapError):
            load_state(stores.events, snapshots, Ledger(), dict, STREAM, stream_id)
        assert snapshots.latest_calls == LOAD_RETRIES

    def test_compaction_committing_while_the_reader_streams_does_not_disturb_it(
        self, stores: Stores, stream_id: str
    ):
        """The events of one ``read`` call come from one consistent view: a compaction
        that commits after the reader got its first event (2 rows per round trip on SQL)
        does not tear the stream it is reading, so the load needs no retry."""
        base = _compact_now(stores, stream_id, 6)  # snapshot at 4, events 5..10
        events = _small_pages(stores)
        compacted: list[int] = []

        class CompactAfterFirstEvent:
            def __getattr__(self, name: str) -> Any:
                return getattr(events, name)

            def read(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
                for n, event in enumerate(events.read(*args, **kwargs)):
                    yield event
                    if n == 0:
                        compacted.append(_compact_now(stores, stream_id, 1))

        snapshots = CountingSnapshots(stores.snapshots)
        state, version = load_state(
            CompactAfterFirstEvent(), snapshots, Ledger(), dict, STREAM, stream_id
        )
        assert (state, version) == (ledger_fold(AMOUNTS), len(AMOUNTS))
        assert base == 4
        assert compacted == [len(AMOUNTS) - 1]
        assert snapshots.latest_calls == 1
        assert [e.version for e in stores.events.read(STREAM, stream_id)] == [len(AMOUNTS)]


class TestOutdatedSnapshotMemory(MemoryBackend, OutdatedSnapshotContract):
    pass


class TestOutdatedSnapshotSqlite(SqliteBackend, OutdatedSnapshotContract):
    pass


class TestOutdatedSnapshotPostgres(PostgresBackend, OutdatedSnapshotContract):
    pass
