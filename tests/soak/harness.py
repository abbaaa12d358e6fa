"""``run_soak(config) -> Report``: set up, run the workload under faults, quiesce, check.

Phases:

1. set-up: a fresh database, two redis-servers, the environment (before the Celery app is
   imported), the streams seeded, the pyeventsourcing application's purses opened, three
   workers started;
2. workload: writers, readers, fan-outs every few seconds and the fault schedule, for
   ``config.seconds``; a projection follows the store, lagging now and then (its
   checkpoint holds compactions back), and now and then a compacted stream is restored
   from the trash bin (tests/soak/consumers.py); the database is checked against the
   model every few seconds; the application's writer deposits, loads and tries stale
   saves, its follower lags and catches up (tests/soak/esapp.py);
3. quiesce: faults stop (everything down is brought back), writers, readers and restores
   stop, the projection and the application's follower catch up, the runs and the queues
   drain, one last run compacts everything, the last stale saves, workers stop;
4. final check: the database against the model (heads exact now), ``load_state`` of every
   stream, the observations kept back, what the projection saw (every event exactly
   once), every archive entry (what was deleted, the projection had seen), every
   compaction result against the audit table and the projection's checkpoints; the
   application's purses, store, follower and results (tests/soak/checker.py, ``app_*``).

The Celery app reads its settings once per process: ``run_soak`` runs once per process
(the pytest test starts a fresh one).
"""

from __future__ import annotations

import importlib
import json
import random
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import psycopg
import redis

from eskit_tasks import (
    NewEvent,
    SqlEventStore,
    SqlSnapshotStore,
    StoreError,
    StreamIntegrityError,
    load_state,
)
from eskit_tasks.domain.compare import first_difference
from eskit_tasks.errors import ArchiveError
from eskit_tasks.ports import ArchiveRef
from eskit_tasks.stores.archive import LocalArchive
from eskit_tasks.testing.services import postgres_problem
from tests.soak.checker import (
    AppStore,
    DbState,
    app_follower_problems,
    app_gate_problems,
    app_held_back_problems,
    app_state_problems,
    app_store_problems,
    archived_problems,
    check_db,
    check_results,
    held_back_problems,
    held_back_summary,
    projection_problems,
    read_app_store,
    read_db_state,
)
from tests.soak.config import SoakConfig
from tests.soak.consumers import Projection, Restorer
from tests.soak.environment import SoakServices, SoakSetupError, wait_for
from tests.soak.esapp import (
    APP_NAME,
    AppFollower,
    AppModel,
    AppWriter,
    app_policy,
    fresh_states,
    state_of,
)
from tests.soak.faults import FaultInjector, make_schedule
from tests.soak.kinds import FOLD_KINDS, FOLDERS, STRICT_KINDS
from tests.soak.model import (
    BAD_KINDS,
    PROJECTION,
    Model,
    ProjectionModel,
    Stats,
    StreamModel,
    Violations,
    shown,
    state_problem,
)
from tests.soak.report import Report
from tests.soak.workload import (
    Reader,
    RunTracker,
    TrackedRun,
    Writer,
    deposit_events,
    random_policy,
)

#: Events in each bad-input stream (above every random policy's min_events/retain_last).
BAD_EVENTS = 30
#: The policy of the last run, after the faults: compact everything.
FINAL_POLICY: dict[str, Any] = {
    "min_events": 1,
    "retain_last": 0,
    "dry_run": False,
    "max_streams": None,
    "stream_types": None,
}


def run_soak(config: SoakConfig) -> Report:
    """Run one soak and return its report (``report.ok``: no invariant violated).

    Raises:
        SoakSetupError: PostgreSQL or redis-server unavailable, or the Celery app was
            already imported in this process (with someone else's settings).
    """
    if "eskit_tasks.fleet.app" in sys.modules:
        raise SoakSetupError(
            "run_soak needs a process where eskit_tasks.fleet.app was not imported yet: "
            "it configures the Celery app for its own redis-servers"
        )
    problem = postgres_problem(config.admin_url, purpose="the soak")
    if problem is not None:
        raise SoakSetupError(problem)
    seed = config.seed if config.seed is not None else random.SystemRandom().randrange(10**9)
    print(f"soak: seed {seed} (repeat with --seed {seed})", flush=True)
    workdir = config.workdir or Path(tempfile.mkdtemp(prefix="eskit-soak-"))
    services = SoakServices(config, workdir)
    keep = config.workdir is not None
    try:
        report = Soak(config, seed, services).run()
        keep = keep or not report.ok
        report.logs = str(workdir) if keep else None
        return report
    except BaseException:
        keep = True
        print(f"soak: aborted; logs kept in {workdir}", file=sys.stderr, flush=True)
        raise
    finally:
        services.close()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


class Soak:
    """One run's state; see the module docstring for the phases."""

    def __init__(self, config: SoakConfig, seed: int, services: SoakServices) -> None:
        self.config = config
        self.seed = seed
        self.rng = random.Random(seed)
        self.services = services
        self.violations = Violations()
        self.stats = Stats()
        self.model = Model(self.violations)
        self.notes: list[str] = []
        self._t0 = time.monotonic()
        self.tracker = RunTracker(self.model, self.stats, self.violations, self.clock)
        self.stop_workload = threading.Event()
        self.stop_faults = threading.Event()
        self.stop_background = threading.Event()
        self.last_db: DbState | None = None
        self.final: TrackedRun | None = None
        self.threads: list[threading.Thread] = []
        #: What the projection applied (tests/soak/consumers.py).
        self.seen = ProjectionModel()
        self.projection: Projection | None = None
        self.restorer: Restorer | None = None
        #: Its seeds: drawn apart from ``rng``, so a seed's fault schedule and workload
        #: stay what they were before the projection and the restores existed.
        self.consumer_rng = random.Random(f"{seed}/consumers")
        #: The highest position each compaction deleted (its archive entry), by id.
        self.deleted_up_to: dict[str, int] = {}
        self.archive_checked: dict[str, int] = {}
        #: The pyeventsourcing application (tests/soak/esapp.py), seeded apart too.
        self.app_rng = random.Random(f"{seed}/application")
        self.app_model = AppModel(services.app_env)
        self.app_writer: AppWriter | None = None
        self.app_follower: AppFollower | None = None
        self.app_store: AppStore | None = None
        #: When the workload ended (epoch seconds): the application's compactions before
        #: it were the fan-outs', not the final run's.
        self.workload_ended_at: float | None = None

    def clock(self) -> float:
        """Seconds since the workload started."""
        return time.monotonic() - self._t0

    def say(self, text: str) -> None:
        print(f"soak [{self.clock():6.1f}s] {text}", flush=True)

    # -- the run --------------------------------------------------------------------------

    def run(self) -> Report:
        began = time.monotonic()
        self.services.start_backends()
        store = SqlEventStore.from_url(self.services.db_url, pool_size=10, max_overflow=10)
        try:
            self.projection = Projection(
                self.seen,
                store,
                self.consumer_rng.randrange(2**32),
                self.stats,
                self.violations,
                self.stop_background,
                page=self.config.projection_page,
                follow=self.config.projection_follow,
                pause=self.config.projection_pause,
            )
            self.projection.register()  # before any event exists: it holds back everything
            self.seed_streams(store)
            self.start_application()
            self.say(
                f"seeded {len(self.model.streams)} streams and {len(self.app_model.purses)} "
                f"{APP_NAME} purses; starting workers"
            )
            self.services.start_workers()
            schedule = make_schedule(
                self.rng.randrange(2**32),
                self.config.seconds,
                self.config.workers,
                self.config.fault_gap,
            )
            self.say("fault schedule: " + "; ".join(f"{p.at}s {p.kind}" for p in schedule))
            self._t0 = time.monotonic()
            injector = self.start_threads(store, schedule)
            self.workload_phase(injector)
            workload_s = self.clock()
            self.quiesce(injector, store)
            db = self.final_check(store)
        finally:
            self.stop_workload.set()
            self.stop_faults.set()
            self.stop_background.set()
            store.engine.dispose()
            if self.app_follower is not None:
                self.app_follower.close()
        return self.build_report(injector, db, workload_s, time.monotonic() - began)

    def seed_streams(self, store: SqlEventStore) -> None:
        writers = self.config.writers
        for i in range(self.config.ledger_streams):
            self._seed(store, StreamModel("ledger", f"s-{i:03d}", "ledger", i % writers), 1, 30)
        for i in range(self.config.slow_streams):
            self._seed(store, StreamModel("slow", f"slow-{i:02d}", "slow", i % writers), 20, 60)
        for kind in STRICT_KINDS:
            for i in range(self.config.strict_streams):
                stream = StreamModel(kind, f"{kind}-{i:02d}", kind, i % writers)
                self._seed(store, stream, 1, 30)
        bad: list[tuple[str, str, list[NewEvent]]] = [
            (
                "ledger",
                "bad-boom",
                [NewEvent("Deposited", {"amount": i}) for i in range(1, 11)]
                + [NewEvent("Boom", {})]
                + [NewEvent("Deposited", {"amount": i}) for i in range(12, BAD_EVENTS + 1)],
            ),
            ("ghost", "bad-ghost", [NewEvent("Deposited", {"amount": 1})] * BAD_EVENTS),
            (
                "lossy",
                "bad-lossy",
                [NewEvent("Tagged", {"tag": f"t{i % 7}"}) for i in range(BAD_EVENTS)],
            ),
        ]
        for (stream_type, stream_id, events), kind in zip(bad, BAD_KINDS, strict=True):
            store.append(stream_type, stream_id, events, expected_version=0)
            stream = StreamModel(stream_type, stream_id, kind, owner=-1)
            stream.record([0] * len(events))  # only the count matters for bad input
            self.model.add(stream)

    def start_application(self) -> None:
        """The purses (a few deposits each) and the follower, before the workers start:
        its tracking table exists, at nothing processed, when they first look."""
        config = self.config
        self.app_model.open_purses(config.app_aggregates, self.app_rng)
        self.app_follower = AppFollower(
            self.app_model.env,
            self.app_rng.randrange(2**32),
            self.stats,
            self.violations,
            self.stop_background,
            follow=config.app_follow,
            pause=config.app_pause,
        )

    def _seed(self, store: SqlEventStore, stream: StreamModel, low: int, high: int) -> None:
        amounts = [self.rng.randint(1, 1000) for _ in range(self.rng.randint(low, high))]
        events = deposit_events(stream, amounts)
        store.append(stream.stream_type, stream.stream_id, events, expected_version=0)
        stream.record(amounts)
        self.model.add(stream)

    def start_threads(self, store: SqlEventStore, schedule: Any) -> FaultInjector:
        appendable = self.model.of_kind(*FOLD_KINDS)
        for i in range(self.config.writers):
            owned = [s for s in appendable if s.owner == i]
            writer = Writer(
                i,
                owned,
                appendable,
                store,
                self.rng.randrange(2**32),
                self.stats,
                self.violations,
                self.stop_workload,
            )
            self.threads.append(writer)
        for i in range(self.config.readers):
            reader = Reader(
                i,
                self.model,
                store,
                self.rng.randrange(2**32),
                self.stats,
                self.violations,
                self.stop_workload,
            )
            self.threads.append(reader)
        assert self.projection is not None
        self.restorer = Restorer(
            self.model,
            self.seen,
            store,
            LocalArchive(self.services.archive_dir),
            self.consumer_rng.randrange(2**32),
            self.stats,
            self.violations,
            self.stop_workload,
            every=self.config.restore_every,
            limit=self.config.max_restores,
        )
        self.app_writer = AppWriter(
            self.app_model,
            self.app_rng.randrange(2**32),
            self.stats,
            self.violations,
            self.stop_workload,
            pace=self.config.app_pace,
            stale_every=self.config.app_stale_every,
            stale_pending=self.config.app_stale_pending,
        )
        assert self.app_follower is not None
        self.threads += [self.projection, self.restorer, self.app_writer, self.app_follower]
        for thread in self.threads:
            thread.start()
        # The fleet's modules are imported here, once, before the fan-out and run threads
        # use them: Celery's top-level module replaces itself while it is first imported,
        # and a second thread importing it at that moment finds no ``Celery`` in it.
        importlib.import_module("eskit_tasks.fleet.runs")
        importlib.import_module("eskit_tasks.tasks")
        self._loop("soak-fanouts", self._fan_out, self.stop_workload, self.rng.randrange(2**32))
        self._loop(
            "soak-app-fanouts", self._app_fan_out, self.stop_workload, self.app_rng.randrange(2**32)
        )
        self._loop("soak-runs", lambda _rng: self._poll_runs(), self.stop_background, 0)
        self._loop("soak-checker", lambda _rng: self._check_now(), self.stop_background, 0)
        injector = FaultInjector(
            schedule,
            self.services,
            self.tracker,
            self.violations,
            self.rng.randrange(2**32),
            self.clock,
            self.stop_faults,
        )
        injector.start()
        return injector

    def _loop(self, name: str, step: Any, stop: threading.Event, seed: int) -> None:
        """Run ``step(rng)`` until ``stop``, waiting the seconds it returns in between."""
        rng = random.Random(seed)

        def loop() -> None:
            while not stop.wait(step(rng)):
                pass

        thread = threading.Thread(target=loop, name=name, daemon=True)
        thread.start()
        self.threads.append(thread)

    def _fan_out(self, rng: random.Random) -> float:
        policy = random_policy(rng)
        running = [r for r in self.tracker.running() if r.kind != "app"]  # those go alone
        if len(running) >= self.config.max_running_runs:
            self.stats.add("fanouts_skipped_busy")
        else:
            self.tracker.start(policy, "scheduled")
        return rng.uniform(*self.config.fanout_every)

    def _app_fan_out(self, rng: random.Random) -> float:
        """A run over the application's purses only, one at a time: the fan-outs over
        every type reach them after the store's streams, which a run lost to a Redis
        restart never gets past."""
        if any(r.kind == "app" for r in self.tracker.running()):
            self.stats.add("app:fanouts_skipped_busy")
        else:
            self.tracker.start(app_policy(rng), "app")
        return rng.uniform(*self.config.app_fanout_every)

    def _poll_runs(self) -> float:
        try:
            self.tracker.poll()
        except Exception as exc:
            self.violations.add("harness", f"run tracker: {type(exc).__name__}: {exc}")
        return 1.0

    def _check_now(self) -> float:
        self.check_database(final=False)
        return self.config.check_every

    def check_database(self, *, final: bool) -> DbState | None:
        acked = self.model.acked_snapshot()  # before the snapshot: a lower bound of heads
        try:
            with self.services.checker_connection() as conn:
                db = read_db_state(conn)
        except psycopg.Error as exc:
            if final:
                raise
            self.stats.add(f"check_error:{type(exc).__name__}")
            return None
        for obs in check_db(db, self.model, acked, self.violations, final=final):
            self.model.observe(obs)
        self.stats.add("db_checks")
        self.last_db = db
        return db

    def workload_phase(self, injector: FaultInjector) -> None:
        end = self.config.seconds
        every = self.config.progress_every
        next_line = every
        while self.clock() < end:
            time.sleep(min(0.5, max(0.0, end - self.clock())))
            if every and self.clock() >= next_line:
                next_line += every
                self.say(self.progress_line(injector))

    def progress_line(self, injector: FaultInjector) -> str:
        runs = Counter(r.status for r in self.tracker.runs)
        deletions = 0 if self.last_db is None else self.last_db.audit_rows
        return (
            f"appends {self.stats.get('appends')}, reads {self.stats.get('reads')}, "
            f"projection at {self.seen.last} ({self.seen.events} events), "
            f"restores {self.stats.get('restores:restored')}, "
            f"{APP_NAME} appends {self.stats.get('app:appends')} (follower "
            f"{0 if self.app_follower is None else len(self.app_follower.processed)} events, "
            f"stale refused {self.stats.get('app:stale_refused')}), "
            f"runs {dict(runs)}, deletions {deletions}, "
            f"faults {sum(injector.injected.values())}, violations {self.violations.count}"
        )

    # -- quiesce --------------------------------------------------------------------------

    def quiesce(self, injector: FaultInjector, store: SqlEventStore) -> None:
        self.say("workload over: stopping faults, writers, readers and restores")
        self.workload_ended_at = time.time()
        self.stop_faults.set()
        injector.join(timeout=300)
        if injector.is_alive():
            self.violations.add("harness", "the fault injector did not stop in 300 s")
        self.notes.extend(self.services.ensure_all_up())
        self.stop_workload.set()
        self.join_threads(
            "soak-writer",
            "soak-reader",
            "soak-fanouts",
            "soak-restorer",
            "soak-app-writer",
            "soak-app-fanouts",
        )
        self.say("the projection and the application's follower catch up")
        self.projection_caught_up(store)
        assert self.app_follower is not None
        self.app_follower.finish()
        if not self.app_follower.caught_up_at_end:
            self.violations.add("liveness", f"the {APP_NAME} follower could not catch up")
        self.say("draining the runs and queues")
        self.drain(self.config.drain_timeout)
        self.final_run()
        self.drain(60.0, runs=False)
        if self.app_writer is not None:
            self.app_writer.finish()  # the stale copies the final run passed
        self.services.stop_workers()
        self.stop_background.set()
        self.join_threads("soak-runs", "soak-checker")
        self._poll_runs()

    def projection_caught_up(self, store: SqlEventStore) -> None:
        """Nothing is appended any more: the projection reads to the end and saves its
        checkpoint there, so that the final run may compact everything."""
        assert self.projection is not None
        self.projection.finish()
        if not self.projection.caught_up_at_end:
            self.violations.add("liveness", "the projection could not catch up after the faults")
            return
        checkpoint = store.checkpoints().get(PROJECTION)
        unread = store.events_after(self.seen.last)
        if checkpoint != self.seen.last or unread:
            self.violations.add(
                "projection",
                f"caught up at position {self.seen.last}, yet its stored checkpoint is "
                f"{checkpoint} and {unread} events are after it",
            )

    def join_threads(self, *prefixes: str) -> None:
        for thread in self.threads:
            if thread.name.startswith(prefixes):
                thread.join(timeout=60)
                if thread.is_alive():
                    self.violations.add("harness", f"{thread.name} did not stop in 60 s")

    def broker_idle(self) -> bool:
        """No message queued, none delivered and unacknowledged (running or waiting
        for a retry countdown in a worker)."""
        client = redis.Redis(port=self.services.broker.port, db=0, socket_timeout=5)
        try:
            queued = sum(
                int(client.llen(key)) for key in client.scan_iter("compaction*", _type="list")
            )
            return queued == 0 and int(client.hlen("unacked")) == 0
        finally:
            client.close()

    def drain(self, timeout: float, *, runs: bool = True) -> None:
        """Wait until the broker is idle (and, with ``runs``, every run ended), for at
        most ``timeout``; an idle broker for 15 s with runs still going means those
        runs are stuck (reported as notes)."""
        deadline = time.monotonic() + timeout
        idle_since: float | None = None
        while time.monotonic() < deadline:
            idle = self.broker_idle()
            now = time.monotonic()
            idle_since = (idle_since or now) if idle else None
            settled = idle_since is not None and now - idle_since >= 2.0
            if settled and (not runs or not self.tracker.running()):
                return
            if idle_since is not None and now - idle_since >= 15.0:
                break
            time.sleep(0.5)
        stuck = self.tracker.running() if runs else []
        if stuck or not self.broker_idle():
            self.notes.append(
                f"drain after {timeout:.0f} s max: broker idle {self.broker_idle()}, runs "
                f"still going: {[(r.run_id, r.kind) for r in stuck]}"
            )

    def final_run(self) -> None:
        """One last run with nothing else going on: it must finish, compact every good
        stream and report exactly the bad-input streams as failed."""
        run: TrackedRun | None = None
        deadline = time.monotonic() + 60
        while run is None and time.monotonic() < deadline:
            run = self.tracker.start(dict(FINAL_POLICY), "final")
            if run is None:
                time.sleep(1)
        if run is None:
            self.violations.add("liveness", "the final run could not be started in 60 s")
            return
        self.final = run
        self.say(f"final run {run.run_id}")
        wait_for(lambda: run.status != "running", self.config.drain_timeout, poll=0.5)
        if run.status != "finished":
            self.violations.add(
                "liveness",
                f"the final run {run.run_id} ended {run.status} (error {run.error}): "
                f"{run.done} of {run.candidates} streams reported",
            )
            return
        for entry in run.failed_streams:
            stream = self.model.get(entry["stream_type"], entry["stream_id"])
            if stream is None or stream.kind not in BAD_KINDS:
                self.violations.add(
                    "liveness",
                    f"final run, no faults: {entry['stream_type']}/{entry['stream_id']} "
                    f"ended {entry['outcome']}: {entry['error']}",
                )

    # -- the final check ------------------------------------------------------------------

    def final_check(self, store: SqlEventStore) -> DbState:
        self.say("final check")
        db = self.check_database(final=True)
        assert db is not None
        for row in db.streams.values():
            stream = self.model.get(row.stream_type, row.stream_id)
            if stream is None or not stream.folds or stream.broken:
                continue
            if row.compacted_through != row.head:
                self.violations.add(
                    "liveness",
                    f"{stream.label}: compacted through {row.compacted_through} of "
                    f"{row.head} after the final run (retain_last 0)",
                )
        self.check_loads(store)
        self.stats.add("deferred_observations", self.model.check_deferred())
        self.check_projection(db)
        self.check_archive(db)
        self.check_application()
        return db

    def check_application(self) -> None:
        """The purses as a fresh application loads them, its SQLite file (live events,
        audit rows, snapshots; after the final run, every purse compacted through
        head - 1), and what the follower processed and when."""
        assert self.app_follower is not None
        model = self.app_model
        purses = {i: p for i, p in model.purses.items() if not p.broken}
        heads = {i: p.head for i, p in purses.items()}
        expected = {i: state_of(p.held) for i, p in purses.items()}
        for problem in app_state_problems(expected, fresh_states(model.env, list(purses))):
            self.violations.add("app", problem)
        self.app_store = store = read_app_store(model.bank_path)
        for problem in app_store_problems(store, heads):
            self.violations.add("app", problem)
        for purse_id, head in heads.items():
            if store.points.get(purse_id, 0) != head - 1:
                self.violations.add(
                    "liveness",
                    f"{APP_NAME}/{purse_id}: compacted through "
                    f"{store.points.get(purse_id, 0)} of {head} after the final run",
                )
        processed = self.app_follower.processed
        for problem in app_follower_problems(processed, heads):
            self.violations.add("app_follower", problem)
        for problem in app_gate_problems(store, processed):
            self.violations.add("app_gate", problem)

    def check_projection(self, db: DbState) -> None:
        """Every event exactly once: read once more (nothing new may come: nothing was
        appended since it caught up, and restores put events back below it), then each
        stream's versions 1..head, each once, with its writer's payloads."""
        assert self.projection is not None
        before = self.seen.events
        if not self.projection.catch_up(60.0, after_the_end=True):
            self.violations.add("harness", "the projection could not read after the final run")
        self.stats.add("projection:after_final", self.seen.events - before)
        for problem in projection_problems(self.seen, db.heads(), self.model):
            self.violations.add("projection", problem)

    def check_archive(self, db: DbState) -> None:
        """Every deletion's archive entry reads back (checksum, count) and holds events
        the projection had seen, at their positions, with their writers' payloads."""
        archive = LocalArchive(self.services.archive_dir)
        entries = events = 0
        for rows in db.audit.values():
            for row in rows:
                if row.archive_uri is None or row.archive_sha256 is None:
                    continue  # check_db reported it
                ref = ArchiveRef(row.archive_uri, row.archive_sha256, row.events_deleted)
                try:
                    archived = list(archive.read(ref))
                except ArchiveError as exc:
                    self.violations.add("archive", f"{row.stream_type}/{row.stream_id}: {exc}")
                    continue
                entries += 1
                events += len(archived)
                if archived:
                    self.deleted_up_to[row.compaction_id] = max(e.position for e in archived)
                stream = self.model.get(row.stream_type, row.stream_id)
                for kind, problem in archived_problems(row, archived, self.seen, stream):
                    self.violations.add(kind, problem)
        self.archive_checked = {
            "entries": entries,
            "events": events,
            "restored_rows": db.restored_rows,
        }

    def check_loads(self, store: SqlEventStore) -> None:
        """load_state of every stream equals the fold of what its writer appended."""
        snapshots = SqlSnapshotStore(store.engine, create_tables=False)
        for stream in self.model.streams.values():
            if stream.broken or stream.kind == "ghost":
                continue
            decider, state_type = FOLDERS[stream.kind]
            try:
                state, version = load_state(
                    store, snapshots, decider, state_type, stream.stream_type, stream.stream_id
                )
            except StreamIntegrityError as exc:
                if stream.kind != "boom":
                    self.violations.add("state", f"final load_state({stream.label}): {exc}")
                continue
            except StoreError as exc:
                self.violations.add("harness", f"final load_state({stream.label}): {exc}")
                continue
            if stream.kind == "boom":
                self.violations.add("bad_input", f"{stream.label} folded past its Boom event")
            elif stream.kind == "lossy":
                expected = {"tags": {f"t{i % 7}" for i in range(BAD_EVENTS)}}
                difference = first_difference((expected, BAD_EVENTS), (state, version))
                if difference is not None:
                    self.violations.add(
                        "state", f"{stream.label}: {shown(state)} at {version}, {difference}"
                    )
            elif version != stream.acked():
                self.violations.add(
                    "state",
                    f"final load_state({stream.label}) is at version {version}; the model "
                    f"says {stream.acked()}",
                )
            else:
                problem = state_problem(version, state, stream.state_at(version))
                if problem is not None:
                    self.violations.add("state", f"final load_state({stream.label}): {problem}")
            self.stats.add("final_loads")

    def task_results(self) -> list[dict[str, Any]]:
        """Every compact_stream result stored in the result backend, and each stream's
        of every compact_batch (small streams go in batches)."""
        from eskit_tasks.fleet.runs import (  # imported by now (see run)
            batch_results_of,
            compaction_result_of,
        )

        client = redis.Redis(port=self.services.broker.port, db=1)
        found = []
        try:
            for key in client.scan_iter("celery-task-meta-*", count=1000):
                # A result that needs attention is stored as FAILURE, carrying it.
                meta = json.loads(client.get(key) or b"{}")
                result = compaction_result_of(meta)
                if result is not None:
                    found.append(result)
                found += batch_results_of(meta)
        finally:
            client.close()
        return found

    def logged_attempts(self) -> list[dict[str, Any]]:
        """Every compaction attempt the workers logged (one JSON line each)."""
        found = []
        for _name, text in self.services.worker_logs():
            for line in text.splitlines():
                if not line.startswith("{"):
                    continue
                try:
                    fields = json.loads(line)
                except ValueError:
                    continue  # a line cut short by kill -9
                if fields.get("event") == "compaction":
                    found.append(fields)
        return found

    # -- the report -----------------------------------------------------------------------

    def application_summary(
        self, results: list[dict[str, Any]], attempts: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """The application's results and logged attempts against its audit log, and what
        its writer and follower did."""
        store = self.app_store if self.app_store is not None else AppStore()
        processed = [] if self.app_follower is None else self.app_follower.processed
        audit = store.audit_by_id()
        # A Model of the purses as streams, for check_results (unknown streams, outcomes).
        streams = Model(self.violations)
        for purse_id in self.app_model.purses:
            streams.add(StreamModel(APP_NAME, str(purse_id), APP_NAME, owner=-1))
        backend = check_results(results, audit, streams, self.violations, "app task result")
        logged = check_results(attempts, audit, streams, self.violations, "app log line")
        for problem in app_held_back_problems(results, processed):
            self.violations.add("app_gate", problem)
        held = Counter(
            "limited" if r.get("outcome") in ("compacted", "dry_run") else "held"
            for r in results
            if r.get("held_back_by")
        )
        ops = self.stats.prefixed("app:")
        summary = {
            "purses": len(self.app_model.purses),
            "appends": ops.get("appends", 0),
            "appended_events": ops.get("appended_events", 0),
            "events": self.app_model.events(),
            "reads": ops.get("reads", 0),
            "load_raced": sum(v for k, v in ops.items() if k.startswith("load_raced:")),
            "compactions": store.audit_rows,
            "compactions_in_workload": sum(
                1
                for moment in store.compacted_at.values()
                if self.workload_ended_at is not None
                and moment.timestamp() < self.workload_ended_at
            ),
            "events_deleted": store.events_deleted,
            "purses_compacted": len(store.audit),
            "attempts": logged.by_outcome,
            "task_results": backend.by_outcome,
            "unreported_deletions": logged.unreported_deletions,
            "held_back": {k: held.get(k, 0) for k in ("limited", "held")},
            "stale_refused": ops.get("stale_refused", 0),
            "stale_refused_at_end": ops.get("stale_refused_at_end", 0),
            "stale_not_passed": ops.get("stale_not_passed", 0),
            "follower_events": len(processed),
            "follower_pauses": ops.get("follower_pauses", 0),
            "errors": self.stats.prefixed("app_error:"),
        }
        deletions = {}
        if store.audit_rows:
            deletions[APP_NAME] = {
                "deletions": store.audit_rows,
                "events": store.events_deleted,
                "streams": len(store.audit),
            }
        return {"summary": summary, "logged": logged, "deletions_by_type": deletions}

    def retain_by_compaction(self, attempts: list[dict[str, Any]]) -> dict[str, int]:
        """Each compaction's ``retain_last``: a logged one's from the policy of its run,
        a racing one's as the restorer chose it."""
        retain = {r.run_id: int(r.policy.get("retain_last") or 0) for r in self.tracker.runs}
        found = {
            str(a["compaction_id"]): retain[a["run_id"]]
            for a in attempts
            if a.get("run_id") in retain
        }
        if self.restorer is not None:
            found.update(self.restorer.retain_last)
        return found

    def build_report(
        self, injector: FaultInjector, db: DbState, workload_s: float, total_s: float
    ) -> Report:
        audit = db.audit_by_id()
        results, app_results = _split(self.task_results())
        attempts, app_attempts = _split(self.logged_attempts())
        # The compactions that raced restores ran here, not in the fleet: checked on their
        # own, and no fleet result is expected for their deletions.
        raced = [] if self.restorer is None else list(self.restorer.results)
        check_results(raced, audit, self.model, self.violations, "racing compaction")
        ours = {str(r.get("compaction_id")) for r in raced}
        fleet = {cid: row for cid, row in audit.items() if cid not in ours}
        backend = check_results(results, fleet, self.model, self.violations, "task result")
        logged = check_results(attempts, fleet, self.model, self.violations, "log line")
        every_result = [*results, *raced]
        for problem in held_back_problems(every_result, self.deleted_up_to, self.seen.saved):
            self.violations.add("gate", problem)
        held = held_back_summary(every_result, self.retain_by_compaction(attempts))
        application = self.application_summary(app_results, app_attempts)
        app_logged = application.pop("logged")
        ops = dict(self.stats.counts)
        errors = {
            k: v
            for k, v in ops.items()
            if k.split(":")[0]
            in (
                "append_error",
                "read_error",
                "stale_append_error",
                "fanout_not_started",
                "projection_error",
                "restore_error",
            )
            or k.startswith("check_error")
        }
        ops = {
            k: v
            for k, v in ops.items()
            if k not in errors
            and not k.startswith(("projection:", "restores:", "app:", "app_error:"))
        }
        assert self.projection is not None
        projection = {
            "events": self.seen.events,
            "streams": len(self.seen.streams),
            **self.stats.prefixed("projection:"),
            "paused_s": round(self.projection.paused_s, 1),
            "max_catch_up": self.projection.max_catch_up,
            "checkpoint": self.seen.last,
        }
        statuses = Counter(r.status for r in self.tracker.runs)
        ops.update({f"runs:{k}": v for k, v in statuses.items()})
        ops["observations"] = self.model.checked
        run_outcomes: Counter[str] = Counter()
        for run in self.tracker.runs:
            if run.status == "finished":
                run_outcomes.update(run.outcomes)
        final = self.final
        if injector.terminated_backends:
            ops["terminated_backends"] = injector.terminated_backends
        return Report(
            seed=self.seed,
            config=self.config.to_json(),
            workload_s=round(workload_s, 1),
            total_s=round(total_s, 1),
            operations=dict(sorted(ops.items())),
            errors=dict(sorted(errors.items())),
            faults=dict(sorted(injector.injected.items())),
            fault_schedule=[p.to_json() for p in injector.schedule],
            fault_log=list(injector.log),
            compactions=logged.by_outcome,
            task_results=backend.by_outcome,
            run_outcomes=dict(sorted(run_outcomes.items())),
            bad_input=logged.bad_input,
            compactions_by_type={**logged.by_type, **app_logged.by_type},
            deletions_by_type={**db.deletions_by_type(), **application["deletions_by_type"]},
            audit_rows=db.audit_rows,
            events_deleted=sum(r.events_deleted for rows in db.audit.values() for r in rows),
            unreported_deletions=logged.unreported_deletions,
            unacknowledged_commits=logged.unacknowledged_commits,
            superseded_attempts=logged.superseded_attempts,
            runs=[asdict(r) for r in self.tracker.runs],
            projection=projection,
            held_back=held,
            restores=self.stats.prefixed("restores:"),
            archive=self.archive_checked,
            application=application["summary"],
            final_run={}
            if final is None
            else {"status": final.status, "candidates": final.candidates, **final.outcomes},
            violation_count=self.violations.count,
            violations_by_kind=dict(self.violations.by_kind),
            violations=list(self.violations.messages),
            notes=self.notes,
        )


def _split(results: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The event store's results, and the pyeventsourcing application's."""
    app = [r for r in results if r.get("stream_type") == APP_NAME]
    return [r for r in results if r.get("stream_type") != APP_NAME], app
