"""The workload: writers, readers, and fan-outs with random policies (and their tracking).

Writers append to the streams they own with optimistic concurrency, and now and then
try an append with a stale expected version on any stream (it must be rejected); each
stream kind makes its events of the amounts drawn (tests/soak/kinds.py). Readers call
``load_state`` on random streams, with the kind's decider and state type, and hand what
they saw to the model.
The scheduler starts ``compact_all`` runs every few seconds; the tracker follows every
run to its end and checks that each finished run reported the bad-input streams as
failed.

The Celery names (``eskit_tasks.fleet.runs``/``tasks``) are imported inside functions: this
module is imported before the soak's environment exists.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kombu.exceptions import OperationalError as KombuOperationalError
from redis.exceptions import RedisError

from eskit_tasks import (
    ConcurrencyError,
    NewEvent,
    SqlEventStore,
    SqlSnapshotStore,
    StoreError,
    StreamIntegrityError,
    VersionGapError,
    load_state,
)
from eskit_tasks.errors import ServiceUnavailableError
from tests.soak.kinds import FOLD_KINDS, FOLDERS, STRICT_KINDS, events_for
from tests.soak.model import (
    BAD_KINDS,
    BAD_OUTCOMES,
    Model,
    Observation,
    Stats,
    StreamModel,
    Violations,
)

#: Seconds a writer keeps asking for the head after an append whose outcome is unknown.
RESOLVE_TIMEOUT_S = 120.0
#: Chance per append that the writer also tries a stale append somewhere.
STALE_APPEND_CHANCE = 0.05


def deposit_events(stream: StreamModel, amounts: list[int]) -> list[NewEvent]:
    """The events of ``amounts`` for ``stream``'s kind (deposits for the Ledger)."""
    return events_for(stream.kind, stream.stream_id, amounts)


class Writer(threading.Thread):
    """Appends to the streams it owns; nobody else appends to them successfully."""

    def __init__(
        self,
        index: int,
        owned: list[StreamModel],
        everyone: list[StreamModel],
        store: SqlEventStore,
        seed: int,
        stats: Stats,
        violations: Violations,
        stop: threading.Event,
        pace: float = 0.02,
    ) -> None:
        super().__init__(name=f"soak-writer-{index}", daemon=True)
        self.owned = owned
        self.everyone = everyone
        self.store = store
        self.rng = random.Random(seed)
        self.stats = stats
        self.violations = violations
        self.stop = stop
        self.pace = pace

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                live = [s for s in self.owned if not s.broken]
                if not live:
                    return
                self.append(self.rng.choice(live))
                if self.rng.random() < STALE_APPEND_CHANCE:
                    self.stale_append(self.rng.choice(self.everyone))
                self.stop.wait(self.rng.uniform(0, self.pace))
        except Exception as exc:  # a crashed writer would silently shrink the workload
            self.violations.add("harness", f"{self.name} crashed: {type(exc).__name__}: {exc}")

    def append(self, stream: StreamModel) -> None:
        amounts = [self.rng.randint(1, 1000) for _ in range(self.rng.randint(1, 4))]
        expected = stream.acked()
        try:
            head = self.store.append(
                stream.stream_type,
                stream.stream_id,
                deposit_events(stream, amounts),
                expected_version=expected,
            )
        except ConcurrencyError as exc:
            stream.broken = True
            self.violations.add(
                "concurrency",
                f"{stream.label}: the owner's append after version {expected} was rejected: {exc}",
            )
            return
        except StoreError as exc:  # connection terminated: did it commit?
            self.stats.add(f"append_error:{type(exc).__name__}")
            self.resolve(stream, expected, amounts)
            return
        if head != expected + len(amounts):
            self.violations.add(
                "head", f"{stream.label}: append of {len(amounts)} after {expected} gave {head}"
            )
        stream.record(amounts)
        self.stats.add("appends")
        self.stats.add("appended_events", len(amounts))

    def resolve(self, stream: StreamModel, expected: int, amounts: list[int]) -> None:
        """The append's outcome is unknown: the head (only we append) tells."""
        deadline = time.monotonic() + RESOLVE_TIMEOUT_S
        while True:
            try:
                head = self.store.head_version(stream.stream_type, stream.stream_id)
                break
            except StoreError:
                if time.monotonic() > deadline:
                    stream.broken = True
                    self.violations.add(
                        "harness", f"{stream.label}: could not read the head for 120 s"
                    )
                    return
                time.sleep(0.2)
        if head == expected + len(amounts):
            stream.record(amounts)
            self.stats.add("ambiguous_appends_committed")
            self.stats.add("appends")
            self.stats.add("appended_events", len(amounts))
        elif head == expected:
            self.stats.add("ambiguous_appends_lost")
        else:
            stream.broken = True
            self.violations.add(
                "head",
                f"{stream.label}: after an append of {len(amounts)} after {expected} failed, "
                f"the head is {head}",
            )

    def stale_append(self, stream: StreamModel) -> None:
        """An append with an expected version below the acknowledged head must fail."""
        acked = stream.acked()
        if acked == 0 or stream.broken:
            return
        expected = self.rng.randint(0, acked - 1)
        try:
            self.store.append(
                stream.stream_type,
                stream.stream_id,
                deposit_events(stream, [1_000_000]),
                expected_version=expected,
            )
        except ConcurrencyError:
            self.stats.add("stale_appends_rejected")
            return
        except StoreError as exc:
            # Unknown outcome; had it committed, the owner's next append or the final
            # head check would say so.
            self.stats.add(f"stale_append_error:{type(exc).__name__}")
            return
        stream.broken = True
        self.violations.add(
            "concurrency",
            f"{stream.label}: an append expecting version {expected} succeeded although "
            f"{acked} events were acknowledged",
        )


class Reader(threading.Thread):
    """Calls load_state on random streams of every folded kind; every result goes to
    the model."""

    def __init__(
        self,
        index: int,
        model: Model,
        store: SqlEventStore,
        seed: int,
        stats: Stats,
        violations: Violations,
        stop: threading.Event,
        pace: float = 0.01,
    ) -> None:
        super().__init__(name=f"soak-reader-{index}", daemon=True)
        self.model = model
        self.streams = model.of_kind(*FOLD_KINDS)
        self.store = store
        self.snapshots = SqlSnapshotStore(store.engine, create_tables=False)
        self.rng = random.Random(seed)
        self.stats = stats
        self.violations = violations
        self.stop = stop
        self.pace = pace

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.read(self.rng.choice(self.streams))
                self.stop.wait(self.rng.uniform(0, self.pace))
        except Exception as exc:
            self.violations.add("harness", f"{self.name} crashed: {type(exc).__name__}: {exc}")

    def read(self, stream: StreamModel) -> None:
        before = stream.acked()
        decider, state_type = FOLDERS[stream.kind]
        try:
            state, version = load_state(
                self.store,
                self.snapshots,
                decider,
                state_type,
                stream.stream_type,
                stream.stream_id,
            )
        except VersionGapError as exc:
            if "kept disappearing" in str(exc):  # compactions outran it: liveness, not loss
                self.stats.add("read_error:retries_exhausted")
                return
            self.violations.add("state", f"load_state({stream.label}) found a gap: {exc}")
            return
        except StreamIntegrityError as exc:
            self.violations.add("state", f"load_state({stream.label}): {exc}")
            return
        except StoreError as exc:
            self.stats.add(f"read_error:{type(exc).__name__}")
            time.sleep(0.05)
            return
        self.stats.add("reads")
        self.model.observe(Observation(stream, version, state, before, "reader"))


# -- fan-outs --------------------------------------------------------------------------


def random_policy(rng: random.Random) -> dict[str, Any]:
    """A compact_all policy. Bad-input streams (30 events) stay candidates under all of
    them: min_events <= 20 and retain_last <= 10."""
    return {
        "min_events": rng.choice([1, 1, 2, 3, 5, 10, 20]),
        "retain_last": rng.choice([0, 0, 0, 1, 2, 5, 10]),
        "dry_run": rng.random() < 0.15,
        "max_streams": rng.choice([None, None, None, None, None, 20, 100]),
        # Mostly without the slow streams, so that they grow long between compactions.
        "stream_types": rng.choice(
            [None] * 3
            + [["ledger", *STRICT_KINDS, "lossy", "ghost"]] * 4
            + [["ledger"], [*STRICT_KINDS]]
        ),
    }


@dataclass
class TrackedRun:
    run_id: str
    kind: str
    policy: dict[str, Any]
    started: float
    status: str = "running"  # running, finished, failed (run error), lost (progress gone)
    ended: float | None = None
    candidates: int = 0
    done: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    failed_streams: list[dict[str, Any]] = field(default_factory=list)
    #: The Redis for locks (and run progress) restarted while this run was going.
    disturbed: bool = False


class RunTracker:
    """Starts fleet runs and follows each one until it finishes or its progress is lost."""

    def __init__(
        self, model: Model, stats: Stats, violations: Violations, clock: Callable[[], float]
    ) -> None:
        self.model = model
        self.stats = stats
        self.violations = violations
        self.clock = clock
        self.runs: list[TrackedRun] = []
        self._lock = threading.Lock()
        self._send = threading.Lock()  # one Celery/Redis client call at a time

    def start(self, policy: dict[str, Any], kind: str) -> TrackedRun | None:
        from eskit_tasks.fleet.runs import compact_all

        try:
            with self._send:
                run = compact_all(**policy)
        except (RedisError, KombuOperationalError, ServiceUnavailableError) as exc:
            self.stats.add(f"fanout_not_started:{type(exc).__name__}")
            return None
        return self._track(run.run_id, kind, policy)

    def start_duplicate(self, policy: dict[str, Any]) -> TrackedRun | None:
        """The same fan-out twice at once: one run id, its first page sent twice."""
        from eskit_tasks.fleet.app import resources
        from eskit_tasks.fleet.messages import policy_kwargs
        from eskit_tasks.fleet.progress import new_run_id
        from eskit_tasks.tasks import fan_out

        run_id = new_run_id()
        kwargs = {
            "run_id": run_id,
            "min_events": policy["min_events"],
            "stream_types": policy["stream_types"],
            "max_streams": policy["max_streams"],
            **policy_kwargs(policy["retain_last"], None, policy["dry_run"]),
        }
        try:
            with self._send:
                resources().progress.create(run_id, kwargs)
                fan_out.apply_async(kwargs=kwargs)
                fan_out.apply_async(kwargs=kwargs)
        except (RedisError, KombuOperationalError, ServiceUnavailableError) as exc:
            self.stats.add(f"fanout_not_started:{type(exc).__name__}")
            return None
        return self._track(run_id, "duplicate", policy)

    def _track(self, run_id: str, kind: str, policy: dict[str, Any]) -> TrackedRun:
        tracked = TrackedRun(run_id, kind, policy, round(self.clock(), 3))
        with self._lock:
            self.runs.append(tracked)
        self.stats.add(f"fanouts:{kind}")
        return tracked

    def running(self) -> list[TrackedRun]:
        with self._lock:
            return [r for r in self.runs if r.status == "running"]

    def mark_disturbed(self) -> None:
        for run in self.running():
            run.disturbed = True

    def poll(self) -> None:
        """Look at every running run once."""
        from eskit_tasks.errors import RunNotFoundError
        from eskit_tasks.fleet.app import resources
        from eskit_tasks.fleet.runs import CompactionRun

        for run in self.running():
            try:
                with self._send:
                    progress = CompactionRun(run.run_id).progress()
                    failed = (
                        resources().progress.failed_streams(run.run_id) if progress.finished else []
                    )
            except RunNotFoundError:
                run.status, run.ended = "lost", round(self.clock(), 3)
                continue
            except (RedisError, ServiceUnavailableError):
                return  # Redis is down: look again later
            if not progress.finished:
                continue
            run.candidates, run.done = progress.candidates, progress.done
            run.outcomes, run.error = dict(progress.outcomes), progress.error
            run.failed_streams = [f.model_dump() for f in failed]
            run.status = "failed" if progress.error else "finished"
            run.ended = round(self.clock(), 3)
            self._check_finished(run)

    def _quarantined(self, stream_type: str, stream_id: str) -> bool:
        """The stream is quarantined after failing compactions, with a bad outcome."""
        from eskit_tasks.errors import EskitError
        from eskit_tasks.fleet.app import resources

        quarantine = resources().quarantine
        try:
            entry = None if quarantine is None else quarantine.entry(stream_type, stream_id)
        except EskitError:
            return False
        return entry is not None and entry.quarantined and entry.last_outcome in BAD_OUTCOMES

    def _check_finished(self, run: TrackedRun) -> None:
        """A run that finished undisturbed reported every bad-input stream as failed."""
        for failed in run.failed_streams:
            stream = self.model.get(failed["stream_type"], failed["stream_id"])
            if stream is not None and stream.kind not in BAD_KINDS:
                self.stats.add(f"run_reported_good_stream:{failed['outcome']}")
        if run.status != "finished" or run.disturbed:
            return
        if not run.done == run.candidates == sum(run.outcomes.values()):
            self.violations.add(
                "progress",
                f"run {run.run_id} ({run.kind}) finished with {run.candidates} candidates, "
                f"{run.done} done, outcomes {run.outcomes}",
            )
        if run.policy.get("max_streams") is not None:
            return
        reported = {(f["stream_type"], f["stream_id"]): f for f in run.failed_streams}
        need = max(run.policy.get("min_events", 1), run.policy.get("retain_last", 0) + 1)
        types = run.policy.get("stream_types")
        for stream in self.model.of_kind(*BAD_KINDS):
            if (types is not None and stream.stream_type not in types) or stream.acked() < need:
                continue
            self.stats.add("bad_input_checks")
            entry = reported.get((stream.stream_type, stream.stream_id))
            if entry is None and self._quarantined(stream.stream_type, stream.stream_id):
                # Failed three runs in a row: quarantined, so runs skip it (issue 14).
                self.stats.add("bad_input_quarantined")
            elif entry is None:
                self.violations.add(
                    "bad_input", f"run {run.run_id} ({run.kind}) did not report {stream.label}"
                )
            elif entry["outcome"] not in BAD_OUTCOMES:
                self.violations.add(
                    "bad_input",
                    f"run {run.run_id}: {stream.label} ({stream.kind}) ended "
                    f"{entry['outcome']}: {entry['error']}",
                )
