"""A pyeventsourcing application in the soak: a writer, a stale writer and a follower.

The application (:class:`SoakBank`, its :class:`Purse` aggregates) keeps its events in a
SQLite file in the soak's work directory, its follower (:class:`SoakAudit`, a
``ProcessApplication``) its tracking table in another (one application per file, as
the library needs: ``SOAKBANK_SQLITE_DBNAME``, ``SOAKAUDIT_SQLITE_DBNAME``). The
workers compact the purses through the ordinary fan-outs: tests/soak/fleet_deciders.py
registers the application, with its follower, from the environment in
:data:`ENV_VAR` (set for the workers by tests/soak/environment.py); besides the
fan-outs over every type (which reach the purses after the store's streams), runs over
the purses only start every few seconds (:func:`app_policy`). PostgreSQL faults
do not reach it; kill -9, pauses and Redis restarts of the workers do.

* :class:`AppWriter` owns every purse: it keeps each as the object it last saved (the
  model), and deposits on a copy that replaces it once the save committed. Now and
  then it loads a purse through the repository (compared strictly with the model) and
  keeps that copy as a *stale* one; once a compaction's point (``eskit_streams`` in
  the application's database) has passed the copy's next version, it deposits on the
  copy and saves it: the guard must refuse it with the library's ``IntegrityError``.
* :class:`AppFollower` follows the application with ``pull_and_process``, pausing now
  and then (the compactions must be held back by its position), and records every
  event it processed, with its notification id and the moment its processing began.

The checks of what they did are in tests/soak/checker.py (``app_*``).
"""

from __future__ import annotations

import copy
import random
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

import sqlalchemy as sa
from eventsourcing.application import Application, ProcessingEvent
from eventsourcing.domain import Aggregate, DomainEventProtocol, event
from eventsourcing.persistence import IntegrityError, Tracking
from eventsourcing.system import ProcessApplication

from tests.soak.model import Stats, Violations

#: The application's name: the stream type of its aggregates in results and the audit log.
APP_NAME = "SoakBank"
#: The follower's name (what ``held_back_by`` names).
FOLLOWER_NAME = "SoakAudit"
#: The application's environment (JSON), for the workers' decider module.
ENV_VAR = "ESKIT_SOAK_APP_ENV"
#: Keys of the newest amounts a purse keeps, in the order they came (a dict whose order
#: a snapshot must keep).
RECENT = 5
#: The deposit of a stale writer (no writer deposits this much).
STALE_AMOUNT = 1_000_000
#: Attempts at loading a purse that a compaction keeps cutting under the load.
LOAD_ATTEMPTS = 5


def app_env(workdir: Path) -> dict[str, str]:
    """The application's and its follower's environment: a SQLite file each."""
    folder = workdir / "application"
    folder.mkdir(parents=True, exist_ok=True)
    return {
        "PERSISTENCE_MODULE": "eventsourcing.sqlite",
        f"{APP_NAME.upper()}_SQLITE_DBNAME": str(folder / "bank.sqlite"),
        f"{FOLLOWER_NAME.upper()}_SQLITE_DBNAME": str(folder / "audit.sqlite"),
        # Past a paused worker's transaction (the library's default is 5 s).
        "SQLITE_LOCK_TIMEOUT": "30",
    }


class Purse(Aggregate):
    @event("Opened")
    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.balance = 0
        self.deposits = 0
        self.recent: dict[str, int] = {}

    @event("Deposited")
    def deposit(self, amount: int) -> None:
        self.balance += amount
        self.deposits += 1
        key = f"k{amount % 7}"
        self.recent.pop(key, None)
        self.recent[key] = amount
        while len(self.recent) > RECENT:
            del self.recent[next(iter(self.recent))]


class SoakBank(Application[UUID]):
    is_snapshotting_enabled = True


@dataclass(frozen=True)
class Processed:
    """An event the follower processed: whose, which version, its notification id, and
    when its processing began (epoch seconds, before the tracking record was written)."""

    aggregate_id: UUID
    version: int
    notification_id: int
    started: float


class SoakAudit(ProcessApplication[UUID]):
    """Processes every event of the bank (its tracking table says how far it got)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.processed: list[Processed] = []

    def policy(
        self, domain_event: DomainEventProtocol[UUID], processing_event: ProcessingEvent[UUID]
    ) -> None:
        """Nothing to decide: the tracking record is what the soak needs."""

    def process_event(self, domain_event: Any, tracking: Tracking) -> None:
        started = time.time()
        super().process_event(domain_event, tracking)  # committed with its tracking record
        self.processed.append(
            Processed(
                domain_event.originator_id,
                domain_event.originator_version,
                tracking.notification_id,
                started,
            )
        )


def state_of(aggregate: Any) -> tuple[type, dict[str, Any]]:
    """What a purse is: its class and attributes by name, but the unsaved events."""
    found = vars(aggregate)
    return type(aggregate), {k: found[k] for k in sorted(found) if k != "_pending_events"}


@dataclass(eq=False)
class PurseModel:
    """One purse as its writer knows it: the object it last saved, and its deposits."""

    held: Any
    amounts: list[int] = field(default_factory=list)
    #: The model lost track of it (reported already).
    broken: bool = False

    @property
    def id(self) -> UUID:
        return UUID(str(self.held.id))

    @property
    def head(self) -> int:
        return 1 + len(self.amounts)


@dataclass
class AppModel:
    env: dict[str, str]
    purses: dict[UUID, PurseModel] = field(default_factory=dict)

    @property
    def bank_path(self) -> str:
        return self.env[f"{APP_NAME.upper()}_SQLITE_DBNAME"]

    def open_purses(self, count: int, rng: random.Random) -> None:
        """The purses, each with a few deposits (before the workers start)."""
        bank = SoakBank(env=self.env)
        try:
            for i in range(count):
                purse = Purse(f"owner-{i:02d}")
                amounts = [rng.randint(1, 1000) for _ in range(rng.randint(1, 30))]
                for amount in amounts:
                    purse.deposit(amount)
                bank.save(purse)
                self.purses[purse.id] = PurseModel(purse, amounts)
        finally:
            bank.close()

    def events(self) -> int:
        return sum(p.head for p in self.purses.values())


def read_sqlite(path: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    """Rows of a query on the application's SQLite file ([] if the table is not there)."""
    conn = sqlite3.connect(path, timeout=30)
    try:
        return conn.execute(query, params).fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise
    finally:
        conn.close()


def compaction_points(path: str) -> dict[UUID, int]:
    """Each compacted purse's compaction point (what the guard reads)."""
    rows = read_sqlite(
        path,
        "SELECT stream_id, compacted_through FROM eskit_streams WHERE stream_type = ?",
        APP_NAME,
    )
    return {UUID(stream_id): int(point) for stream_id, point in rows}


def compaction_log_rows(path: str) -> list[dict[str, Any]]:
    """The application's audit log (eskit's table in its database), read through eskit's
    own table definition (its UTC timestamps)."""
    from eskit_tasks.stores.schema import compaction_log

    engine = sa.create_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table("eskit_compaction_log"):
                return []
            query = sa.select(compaction_log).order_by(compaction_log.c.id)
            return [dict(row._mapping) for row in conn.execute(query)]
    finally:
        engine.dispose()


class AppWriter(threading.Thread):
    """Deposits into the purses, loads them now and then, and tries stale saves."""

    def __init__(
        self,
        model: AppModel,
        seed: int,
        stats: Stats,
        violations: Violations,
        stop: threading.Event,
        *,
        pace: float,
        stale_every: float,
        stale_pending: int,
    ) -> None:
        super().__init__(name="soak-app-writer", daemon=True)
        self.model = model
        self.rng = random.Random(seed)
        self.stats = stats
        self.violations = violations
        self.stop = stop
        self.pace = pace
        self.stale_every = stale_every
        self.stale_pending = stale_pending
        #: Stale copies waiting for a compaction to pass them, by purse.
        self.pending: dict[UUID, Any] = {}
        self.bank: Any = None

    def run(self) -> None:
        self.bank = SoakBank(env=self.model.env)
        try:
            next_stale = time.monotonic()
            while not self.stop.is_set():
                live = [p for p in self.model.purses.values() if not p.broken]
                if not live:
                    return
                self.append(self.rng.choice(live))
                if time.monotonic() >= next_stale:
                    next_stale = time.monotonic() + self.stale_every
                    self.try_stale()
                    self.take_stale(live)
                self.stop.wait(self.rng.uniform(0, self.pace))
        except Exception as exc:
            self.violations.add("harness", f"{self.name} crashed: {type(exc).__name__}: {exc}")

    def append(self, purse: PurseModel) -> None:
        amounts = [self.rng.randint(1, 1000) for _ in range(self.rng.randint(1, 3))]
        changed = copy.deepcopy(purse.held)
        for amount in amounts:
            changed.deposit(amount)
        try:
            self.bank.save(changed)
        except IntegrityError as exc:
            purse.broken = True
            self.violations.add(
                "app", f"{APP_NAME}/{purse.id}: the owner's save after {purse.head} refused: {exc}"
            )
            return
        except Exception as exc:  # SQLite busy past its timeout: did it commit?
            self.stats.add(f"app_error:save:{type(exc).__name__}")
            if not self.resolve(purse, len(amounts)):
                return
        purse.held = changed
        purse.amounts.extend(amounts)
        self.stats.add("app:appends")
        self.stats.add("app:appended_events", len(amounts))

    def resolve(self, purse: PurseModel, count: int) -> bool:
        """Whether the save whose outcome is unknown committed (only we save)."""
        rows = read_sqlite(
            self.model.bank_path,
            "SELECT max(originator_version) FROM stored_events WHERE originator_id = ?",
            purse.id.hex,
        )
        head = rows[0][0] if rows else None
        if head == purse.head + count:
            return True
        if head != purse.head:
            purse.broken = True
            self.violations.add(
                "app", f"{APP_NAME}/{purse.id}: after a failed save at {purse.head}, head {head}"
            )
        return False

    def load(self, purse: PurseModel) -> Any | None:
        """The purse through the repository, compared strictly with the model; None if
        compactions kept cutting under the load (the library reads the snapshot and the
        events after it in two transactions) or it differs (reported)."""
        from eskit_tasks.domain.compare import first_difference

        for _ in range(LOAD_ATTEMPTS):
            try:
                loaded = self.bank.repository.get(purse.id)
                break
            except Exception as exc:
                self.stats.add(f"app:load_raced:{type(exc).__name__}")
                time.sleep(0.05)
        else:
            self.stats.add("app:load_given_up")
            return None
        self.stats.add("app:reads")
        difference = first_difference(state_of(purse.held), state_of(loaded))
        if difference is not None:
            purse.broken = True
            self.violations.add(
                "app", f"{APP_NAME}/{purse.id}: loaded at {loaded.version}: {difference}"
            )
            return None
        return loaded

    def take_stale(self, live: list[PurseModel]) -> None:
        """Load a purse (checked against the model) and keep it as a stale copy, if
        fewer than ``stale_pending`` are waiting."""
        free = [p for p in live if p.id not in self.pending]
        room = len(self.pending) < self.stale_pending and free
        purse = self.rng.choice(free if room else live)
        loaded = self.load(purse)
        if room and loaded is not None:
            self.pending[purse.id] = loaded

    def try_stale(self, *, final: bool = False) -> None:
        """Save each stale copy that a compaction has passed (its next version is at or
        below the point): the guard must refuse it. ``final``: the last look; the
        copies not passed are dropped."""
        try:
            points = compaction_points(self.model.bank_path)
        except sqlite3.Error as exc:
            self.stats.add(f"app_error:points:{type(exc).__name__}")
            return
        for purse_id, stale in list(self.pending.items()):
            if points.get(purse_id, 0) < stale.version + 1:
                if final:
                    self.stats.add("app:stale_not_passed")
                continue
            del self.pending[purse_id]
            self.stale_save(self.model.purses[purse_id], stale, points[purse_id], final)
        if final:
            self.pending.clear()

    def stale_save(self, purse: PurseModel, stale: Any, point: int, final: bool) -> None:
        stale.deposit(STALE_AMOUNT)
        try:
            self.bank.save(stale)
        except IntegrityError:
            self.stats.add("app:stale_refused")
            if final:
                self.stats.add("app:stale_refused_at_end")
            return
        except Exception as exc:
            self.stats.add(f"app_error:stale:{type(exc).__name__}")
            return
        purse.broken = True
        self.violations.add(
            "app",
            f"{APP_NAME}/{purse.id}: a stale save of version {stale.version} went through "
            f"although the compaction point was {point}",
        )

    def finish(self) -> None:
        """After the final run (the writer has stopped): the last stale saves."""
        if self.bank is None:
            return
        self.try_stale(final=True)
        self.bank.close()


class AppFollower(threading.Thread):
    """Follows the bank, lagging now and then; :meth:`finish` makes it catch up."""

    def __init__(
        self,
        env: dict[str, str],
        seed: int,
        stats: Stats,
        violations: Violations,
        abort: threading.Event,
        *,
        follow: tuple[float, float],
        pause: tuple[float, float],
    ) -> None:
        super().__init__(name="soak-app-follower", daemon=True)
        self.leader = SoakBank(env=env)
        self.audit = SoakAudit(env=env)
        self.audit.follow(self.leader.name, self.leader.notification_log)
        self.rng = random.Random(seed)
        self.stats = stats
        self.violations = violations
        self.abort = abort
        self.follow_s = follow
        self.pause_s = pause
        self._finish = threading.Event()
        self.caught_up_at_end = False

    @property
    def processed(self) -> list[Processed]:
        return self.audit.processed

    def run(self) -> None:
        try:
            follow_until = time.monotonic() + self.rng.uniform(*self.follow_s)
            while not self.abort.is_set():
                if self._finish.is_set():
                    self.caught_up_at_end = self.catch_up(120.0)
                    return
                if time.monotonic() >= follow_until:
                    self._finish.wait(self.rng.uniform(*self.pause_s))
                    self.stats.add("app:follower_pauses")
                    follow_until = time.monotonic() + self.rng.uniform(*self.follow_s)
                    continue
                self.pull()
                self._finish.wait(self.rng.uniform(0.05, 0.3))
        except Exception as exc:  # a dead follower holds every compaction back
            self.violations.add("harness", f"{self.name} crashed: {type(exc).__name__}: {exc}")

    def pull(self) -> bool:
        try:
            self.audit.pull_and_process(APP_NAME)
        except Exception as exc:  # SQLite busy: the next pull starts at the tracking
            self.stats.add(f"app_error:follower:{type(exc).__name__}")
            time.sleep(0.2)
            return False
        return True

    def catch_up(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.pull() and self.position() == self.leader.recorder.max_notification_id():
                return True
        return False

    def position(self) -> int:
        return int(self.audit.recorder.max_tracking_id(APP_NAME) or 0)

    def finish(self, timeout: float = 150.0) -> None:
        self._finish.set()
        self.join(timeout)
        if self.is_alive():
            self.violations.add("harness", f"the app follower did not stop in {timeout:.0f} s")

    def close(self) -> None:
        self.audit.close()
        self.leader.close()


def app_policy(rng: random.Random) -> dict[str, Any]:
    """A compact_all policy over the application's purses only."""
    return {
        "min_events": rng.choice([1, 2, 5, 10]),
        "retain_last": rng.choice([0, 0, 1, 2, 5]),
        "dry_run": rng.random() < 0.1,
        "max_streams": None,
        "stream_types": [APP_NAME],
    }


def fresh_states(env: dict[str, str], ids: list[UUID]) -> dict[UUID, Any]:
    """Each purse as a fresh instance of the application loads it (or the exception)."""
    bank = SoakBank(env=env)
    found: dict[UUID, Any] = {}
    try:
        for purse_id in ids:
            try:
                found[purse_id] = bank.repository.get(purse_id)
            except Exception as exc:
                found[purse_id] = exc
    finally:
        bank.close()
    return found
