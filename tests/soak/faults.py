"""Faults on a seeded schedule, injected one after another while the workload runs.

* ``worker_kill9``: kill -9 of a whole worker (main process and pool children), started
  again a little later as a new process; its unacknowledged tasks come back after the
  visibility timeout.
* ``redis_restart``: the Redis for locks and run progress stopped, then started again
  empty (no persistence): locks and the progress of running runs are gone.
* ``pg_terminate``: pg_terminate_backend of every connection to the soak database except
  the checker's own (workers', writers', readers'), a few times in a row.
* ``worker_pause``: SIGSTOP of a whole worker for longer than the lock TTL, then SIGCONT:
  its compaction wakes up believing it holds a lock that expired.
* ``duplicate_fanout``: the same fan-out (one run id) sent twice at once.

Before a kill or a pause, a run over the slow streams usually starts first, so that the
victim is likely in the middle of a compaction.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from tests.soak.config import LOCK_TTL_S
from tests.soak.environment import SoakServices
from tests.soak.model import Violations
from tests.soak.workload import RunTracker, random_policy

FAULT_KINDS = ("worker_kill9", "redis_restart", "pg_terminate", "worker_pause", "duplicate_fanout")


class FaultSkipped(Exception):
    """The fault could not be done now (e.g. its fan-out could not be sent); not counted."""


@dataclass(frozen=True)
class FaultPlan:
    """One planned fault: ``at`` seconds into the workload (or as soon as the previous
    fault is over), against worker ``target``, lasting ``duration`` seconds."""

    at: float
    kind: str
    target: int
    duration: float
    #: Start a run over the slow streams first, then wait this long (None: do not).
    slow_run_lead: float | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _duration(kind: str, rng: random.Random) -> float:
    if kind == "worker_kill9":
        return rng.uniform(0.5, 3.0)  # until the restart begins
    if kind == "redis_restart":
        return rng.uniform(1.0, 4.0)
    if kind == "worker_pause":
        return LOCK_TTL_S + rng.uniform(1.0, 3.0)  # past the lock's expiry
    if kind == "pg_terminate":
        return rng.uniform(0.5, 2.0)  # a few rounds over this long
    return 0.0


def make_schedule(
    seed: int,
    seconds: float,
    workers: int,
    gap: tuple[float, float] = (2.0, 6.0),
    kinds: tuple[str, ...] = FAULT_KINDS,
) -> list[FaultPlan]:
    """The fault schedule of a run: every kind once early on (in a random order), then
    random kinds until ``seconds`` (minus a few seconds of calm at the end)."""
    rng = random.Random(seed)
    first = list(kinds)
    rng.shuffle(first)
    plans = []
    at = rng.uniform(3.0, 6.0)
    while at < seconds - 5.0:
        kind = first.pop(0) if first else rng.choice(kinds)
        duration = _duration(kind, rng)
        lead = (
            rng.uniform(0.3, 1.0)
            if kind in ("worker_kill9", "worker_pause") and rng.random() < 0.75
            else None
        )
        plans.append(
            FaultPlan(round(at, 2), kind, rng.randrange(workers), round(duration, 2), lead)
        )
        # A killed worker takes a few seconds to boot again.
        busy = duration + (lead or 0.0) + (6.0 if kind == "worker_kill9" else 0.0)
        at += busy + rng.uniform(*gap) * (0.6 if first else 1.0)
    return plans


class FaultInjector(threading.Thread):
    """Works through the schedule; ``stop`` ends it after the fault in progress."""

    def __init__(
        self,
        schedule: list[FaultPlan],
        services: SoakServices,
        tracker: RunTracker,
        violations: Violations,
        seed: int,
        clock: Callable[[], float],
        stop: threading.Event,
    ) -> None:
        super().__init__(name="soak-faults", daemon=True)
        self.schedule = schedule
        self.services = services
        self.tracker = tracker
        self.violations = violations
        self.rng = random.Random(seed)
        self.clock = clock
        self.stop = stop
        self.injected: Counter[str] = Counter()
        self.log: list[str] = []
        self.terminated_backends = 0
        self.active = False

    def run(self) -> None:
        for plan in self.schedule:
            if self.stop.wait(max(0.0, plan.at - self.clock())):
                return
            self.active = True
            try:
                detail = self.inject(plan)
                self.injected[plan.kind] += 1
                self.note(f"{plan.kind}: {detail}")
            except FaultSkipped as exc:
                self.note(f"{plan.kind} skipped: {exc}")
            except Exception as exc:  # a fault that could not be done is the harness's failure
                self.violations.add(
                    "harness", f"fault {plan.kind} failed: {type(exc).__name__}: {exc}"
                )
                self.note(f"{plan.kind} FAILED: {type(exc).__name__}: {exc}")
            finally:
                self.active = False

    def note(self, text: str) -> None:
        self.log.append(f"{self.clock():7.1f}s {text}")

    def inject(self, plan: FaultPlan) -> str:
        if plan.slow_run_lead is not None:
            self.tracker.start(
                {"min_events": 1, "retain_last": 0, "stream_types": ["slow"]}, "slow"
            )
            time.sleep(plan.slow_run_lead)
        if plan.kind == "worker_kill9":
            victim = self.services.kill9(plan.target)
            time.sleep(plan.duration)
            started = time.monotonic()
            again = self.services.restart(plan.target)
            return (
                f"killed {victim}; restarted as {again} after {plan.duration:.1f} s "
                f"(boot {time.monotonic() - started:.1f} s)"
            )
        if plan.kind == "worker_pause":
            victim = self.services.pause(plan.target)
            try:
                time.sleep(plan.duration)
            finally:
                self.services.resume(plan.target)
            return f"paused {victim} for {plan.duration:.1f} s"
        if plan.kind == "redis_restart":
            self.tracker.mark_disturbed()
            self.services.state.stop()
            try:
                time.sleep(plan.duration)
            finally:
                self.services.state.start()
            return f"Redis for locks down for {plan.duration:.1f} s"
        if plan.kind == "pg_terminate":
            return self._terminate(plan.duration)
        if plan.kind == "duplicate_fanout":
            return self._duplicate()
        raise ValueError(f"unknown fault kind {plan.kind!r}")

    def _duplicate(self) -> str:
        """One run's first page sent twice; half the time also a second run with the
        same policy started at the same moment."""
        policy = random_policy(self.rng)
        twin = self.rng.random() < 0.5
        run = self.tracker.start_duplicate(policy)
        other = self.tracker.start(policy, "twin") if twin else None
        if run is None:
            raise FaultSkipped("the fan-out could not be sent")
        return f"run {run.run_id} sent twice" + (
            f", twin run {other.run_id}" if other is not None else ""
        )

    def _terminate(self, over: float) -> str:
        rounds = self.rng.randint(1, 3)
        counts = []
        for i in range(rounds):
            counts.append(self.services.terminate_backends())
            if i + 1 < rounds:
                time.sleep(over / rounds)
        self.terminated_backends += sum(counts)
        return f"terminated {'+'.join(map(str, counts))} backends"
