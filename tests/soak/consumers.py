"""A consumer of the store and the trash bin: a projection that lags, and restores.

* :class:`Projection` follows the whole store with ``read_all(after_position=...)`` a
  page at a time into its own model (model.py, :class:`~tests.soak.model.ProjectionModel`)
  and saves its checkpoint (:data:`~tests.soak.model.PROJECTION`, every stream type)
  after each page. Now and then it stops reading for a few seconds, so that compactions
  meet its checkpoint (the gate must cut them short or hold them back entirely), then
  catches up. It reads from its own last applied position, not from the saved
  checkpoint: a page applied and then a save lost to a terminated connection is not
  read again (the saved checkpoint only lags, which the gate can only make safer).
* :class:`Restorer` now and then puts a compacted stream's archived events back
  (:func:`eskit_tasks.restore`), checks the stream right away (checker.restore_problems)
  and hands its ``load_state`` to the model. About half the time an in-process
  compaction of the same stream (archived too, no lock: only fencing orders the two)
  starts at the same moment. A restore that meets a compaction of the stream (compacted
  again since the restore looked) is refused with RestoreError: counted, not a
  violation; the compaction's results are checked like the fleet's.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any

from eskit_tasks import (
    ArchiveError,
    CompactionPolicy,
    Compactor,
    RestoreError,
    SqlEventStore,
    SqlSnapshotStore,
    StoreError,
    StreamIntegrityError,
    VersionGapError,
    load_state,
    restore,
)
from eskit_tasks.ports import StreamInfo
from eskit_tasks.stores.archive import LocalArchive
from tests.soak.checker import restore_problems
from tests.soak.kinds import FOLD_KINDS, FOLDERS
from tests.soak.model import (
    PROJECTION,
    Model,
    Observation,
    ProjectionModel,
    Stats,
    StreamModel,
    Violations,
)

#: Seconds the final catch-up may take (the database is up again by then).
CATCH_UP_TIMEOUT_S = 120.0
#: Compacted streams a restore looks for among this many random ones.
RESTORE_PICKS = 20
#: Chance that a compaction of the stream races the restore.
RACE_CHANCE = 0.5
#: ``retain_last`` of the racing compaction.
RACE_RETAIN = (0, 0, 1, 5)
#: Seconds the restore waits after the racing compaction starts (uniform): a compaction
#: takes tens of milliseconds, so either may commit first.
RACE_DELAY = (0.0, 0.15)


class Projection(threading.Thread):
    """Follows the store into ``seen``, lagging now and then; :meth:`finish` makes it
    catch up one last time and stop."""

    def __init__(
        self,
        seen: ProjectionModel,
        store: SqlEventStore,
        seed: int,
        stats: Stats,
        violations: Violations,
        abort: threading.Event,
        *,
        page: int,
        follow: tuple[float, float],
        pause: tuple[float, float],
    ) -> None:
        super().__init__(name="soak-projection", daemon=True)
        self.seen = seen
        self.store = store
        self.rng = random.Random(seed)
        self.stats = stats
        self.violations = violations
        self.abort = abort
        self.page = page
        self.follow = follow
        self.pause = pause
        self._finish = threading.Event()
        #: The last position saved as the checkpoint (as far as this thread knows).
        self._saved = 0
        self.caught_up_at_end = False
        #: The most events read in one catch-up after a pause.
        self.max_catch_up = 0
        self.paused_s = 0.0

    def register(self) -> None:
        """Register at position 0 (before anything is compacted): it holds every event
        back until it has read it."""
        self.seen.note_saved(0)
        self.store.save_checkpoint(PROJECTION, 0)

    def finish(self, timeout: float = CATCH_UP_TIMEOUT_S + 30) -> None:
        """Stop lagging, catch up (the writers have stopped), save, stop."""
        self._finish.set()
        self.join(timeout)
        if self.is_alive():
            self.violations.add("harness", f"the projection did not stop in {timeout:.0f} s")

    def run(self) -> None:
        try:
            follow_until = time.monotonic() + self.rng.uniform(*self.follow)
            while not self.abort.is_set():
                if self._finish.is_set():
                    self.caught_up_at_end = self.catch_up(CATCH_UP_TIMEOUT_S)
                    return
                if time.monotonic() >= follow_until:
                    self.lag()
                    follow_until = time.monotonic() + self.rng.uniform(*self.follow)
                    continue
                read = self.read_page()
                if read is not None and read < self.page:
                    self._finish.wait(self.rng.uniform(0.05, 0.3))
        except Exception as exc:  # a dead projection would hold every compaction back
            self.violations.add("harness", f"{self.name} crashed: {type(exc).__name__}: {exc}")

    def lag(self) -> None:
        """Read nothing for a while (the checkpoint stays where it is), then catch up."""
        pause = self.rng.uniform(*self.pause)
        began = time.monotonic()
        self._finish.wait(pause)
        self.paused_s += time.monotonic() - began
        self.stats.add("projection:pauses")
        before = self.seen.events
        self.catch_up(CATCH_UP_TIMEOUT_S)
        self.max_catch_up = max(self.max_catch_up, self.seen.events - before)

    def catch_up(self, timeout: float, *, after_the_end: bool = False) -> bool:
        """Read pages until one comes back short and its checkpoint is saved; False if
        that did not happen within ``timeout`` (the database down all along).
        ``after_the_end``: called by the final check, once the thread has stopped and the
        soak's background threads are told to stop."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (after_the_end or not self.abort.is_set()):
            read = self.read_page(save_empty=True)
            if read is not None and read < self.page and self.saved_up_to_date:
                return True
        return False

    @property
    def saved_up_to_date(self) -> bool:
        return self._saved == self.seen.last

    def read_page(self, *, save_empty: bool = False) -> int | None:
        """Apply the next page (up to ``page`` events) and save the checkpoint; the number
        of events read, None when the database failed (retried later)."""
        read = 0
        try:
            for event in self.store.read_all(after_position=self.seen.last, limit=self.page):
                for problem in self.seen.apply(event):
                    self.violations.add("projection", problem)
                read += 1
        except StoreError as exc:  # a terminated connection: the next read starts after
            self.stats.add(f"projection_error:{type(exc).__name__}")  # what was applied
            self.stats.add("projection:read", read)
            time.sleep(0.2)
            return None
        self.stats.add("projection:read", read)
        self.stats.add("projection:pages")
        if read or (save_empty and not self.saved_up_to_date):
            self.save()
        return read

    def save(self) -> None:
        position = self.seen.last
        self.seen.note_saved(position)  # before: a save whose answer is lost may commit
        try:
            stored = self.store.save_checkpoint(PROJECTION, position)
        except StoreError as exc:
            self.stats.add(f"projection_error:{type(exc).__name__}")
            return
        self.stats.add("projection:checkpoints")
        self._saved = position
        if stored != position:
            self.violations.add(
                "projection",
                f"checkpoint saved at {position} is stored as {stored} (only the projection "
                "moves it, forward only)",
            )


class Restorer(threading.Thread):
    """Every few seconds (at most ``limit`` times) restores a random compacted stream."""

    def __init__(
        self,
        model: Model,
        seen: ProjectionModel,
        store: SqlEventStore,
        archive: LocalArchive,
        seed: int,
        stats: Stats,
        violations: Violations,
        stop: threading.Event,
        *,
        every: tuple[float, float],
        limit: int,
    ) -> None:
        super().__init__(name="soak-restorer", daemon=True)
        self.model = model
        self.streams = model.of_kind(*FOLD_KINDS)
        self.seen = seen
        self.store = store
        self.snapshots = SqlSnapshotStore(store.engine, create_tables=False)
        self.archive = archive
        self.rng = random.Random(seed)
        self.stats = stats
        self.violations = violations
        self.stop = stop
        self.every = every
        self.limit = limit
        self.attempts = 0
        #: Results of the racing compactions (CompactionResult JSON), for the checker.
        self.results: list[dict[str, Any]] = []
        #: Their policies' ``retain_last``, by compaction id.
        self.retain_last: dict[str, int] = {}

    def run(self) -> None:
        try:
            while self.attempts < self.limit and not self.stop.wait(self.rng.uniform(*self.every)):
                self.restore_one()
        except Exception as exc:
            self.violations.add("harness", f"{self.name} crashed: {type(exc).__name__}: {exc}")

    def pick(self) -> tuple[StreamModel, StreamInfo] | None:
        live = [s for s in self.streams if not s.broken]
        for stream in self.rng.sample(live, min(RESTORE_PICKS, len(live))):
            info = self.store.stream_info(stream.stream_type, stream.stream_id)
            if info is not None and info.compacted_through > 0:
                return stream, info
        return None

    def restore_one(self) -> None:
        try:
            picked = self.pick()
        except StoreError as exc:
            self.stats.add(f"restore_error:{type(exc).__name__}")
            return
        if picked is None:
            self.stats.add("restores:no_candidate")
            return
        stream, info = picked
        self.attempts += 1
        self.stats.add("restores:attempted")
        racer = None
        if self.rng.random() < RACE_CHANCE:
            retain = self.rng.choice(RACE_RETAIN)
            racer = threading.Thread(
                target=self.compact, args=(stream, retain), name="soak-race", daemon=True
            )
            racer.start()
            time.sleep(self.rng.uniform(*RACE_DELAY))
        try:
            self.attempt(stream, info)
        finally:
            if racer is not None:
                racer.join(60)

    def compact(self, stream: StreamModel, retain_last: int) -> None:
        """An in-process compaction of ``stream`` (a thread of its own)."""
        decider, state_type = FOLDERS[stream.kind]
        try:
            result = Compactor(
                store=self.store,
                snapshot_store=self.snapshots,
                decider=decider,
                state_type=state_type,
                policy=CompactionPolicy(retain_last=retain_last),
                archive=self.archive,
            ).compact(stream.stream_type, stream.stream_id)
        except Exception as exc:  # compact() reports every failure in its result
            self.violations.add(
                "harness", f"racing compaction of {stream.label}: {type(exc).__name__}: {exc}"
            )
            return
        self.retain_last[result.compaction_id] = retain_last
        self.results.append(result.model_dump(mode="json"))
        self.stats.add(f"restores:race_{result.outcome.value}")

    def attempt(self, stream: StreamModel, info: StreamInfo) -> None:
        before = stream.acked()
        try:
            done = restore(self.store, stream.stream_type, stream.stream_id, archive=self.archive)
        except RestoreError as exc:
            self.refused(stream, info, exc)
            return
        except ArchiveError as exc:
            self.violations.add(
                "restore", f"{stream.label}: a committed compaction's archive entry: {exc}"
            )
            return
        except StoreError as exc:  # outcome unknown; the database checks see either
            self.stats.add(f"restore_error:{type(exc).__name__}")
            return
        self.stats.add("restores:restored")
        self.stats.add("restores:events", done.events_restored)
        self.stats.add("restores:compactions_undone", len(done.compactions))
        self.check(stream, done.events_restored, before)

    def refused(self, stream: StreamModel, info: StreamInfo, exc: RestoreError) -> None:
        """Refused is fine when a compaction cut the stream again since the restore
        looked; any other refusal means a deletion that cannot be undone."""
        try:
            now = self.store.stream_info(stream.stream_type, stream.stream_id)
        except StoreError:
            now = None
        if now is not None and now.compacted_through != info.compacted_through:
            self.stats.add("restores:refused")
            return
        if now is None:  # cannot tell
            self.stats.add("restores:refused_unexplained")
            return
        self.violations.add(
            "restore",
            f"{stream.label}: restore refused although the stream stayed compacted through "
            f"{info.compacted_through}: {exc}",
        )

    def check(self, stream: StreamModel, restored: int, acked_before: int) -> None:
        """The events are back where the projection saw them, and the stream replays."""
        try:
            live = [
                (e.version, e.position, e.data)
                for e in self.store.read(stream.stream_type, stream.stream_id)
            ]
            info = self.store.stream_info(stream.stream_type, stream.stream_id)
        except StoreError as exc:
            self.stats.add(f"restore_error:{type(exc).__name__}")
            return
        problems = restore_problems(
            stream, restored, live, 0 if info is None else info.compacted_through, self.seen
        )
        if problems is None:
            self.stats.add("restores:compacted_before_check")
        for problem in problems or []:
            self.violations.add("restore", f"{stream.label}: {problem}")
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
                self.stats.add("restore_error:retries_exhausted")
                return
            self.violations.add("restore", f"load_state({stream.label}) after a restore: {exc}")
            return
        except StreamIntegrityError as exc:
            self.violations.add("restore", f"load_state({stream.label}) after a restore: {exc}")
            return
        except StoreError as exc:
            self.stats.add(f"restore_error:{type(exc).__name__}")
            return
        self.stats.add("restores:loads")
        self.model.observe(Observation(stream, version, state, acked_before, "restore"))
