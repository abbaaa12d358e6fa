"""Writers do not wait for a compaction's delete on PostgreSQL (issue 15), and the
fence still stops a stale compaction.

Each test pauses a transaction at a chosen statement (a listener on its engine blocks
right after the statement ran, the transaction still open) and then drives the other
actors. Nothing here measures time: an actor that should not wait is watched until it
either finishes or shows up in ``pg_stat_activity`` waiting on a lock, which fails the
test at once. The actors use engines of their own, so a pause hooks one actor only.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from eskit_tasks import (
    CompactionPolicy,
    Compactor,
    Outcome,
    SqlEventStore,
    SqlSnapshotStore,
)
from eskit_tasks.domain.result import CompactionResult
from eskit_tasks.testing.deciders import Ledger, deposits
from eskit_tasks.testing.services import scratch_database

N = 40
#: A bound on how long a step may take before the test gives up (never reached when
#: the code is right; a wrong lock order is caught by the lock watcher first).
PATIENCE_S = 30.0


@pytest.fixture
def url(postgres_url: str) -> Iterator[str]:
    with scratch_database(postgres_url, "eskit_writer_wait") as made:
        yield made


class Pause:
    """Blocks the engine's connection right after its first statement that starts with
    ``prefix`` has run, inside its transaction, until :meth:`release`."""

    def __init__(self, engine: sa.Engine, prefix: str) -> None:
        self.prefix = prefix
        self.reached, self.go = threading.Event(), threading.Event()
        sa.event.listen(engine, "after_cursor_execute", self._after)

    def _after(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().startswith(self.prefix) and not self.reached.is_set():
            self.reached.set()
            self.go.wait(PATIENCE_S)

    def release(self) -> None:
        # The listener stays (removing it while the paused thread is inside it would
        # mutate the list being iterated); it pauses once only.
        self.go.set()


class Actor(threading.Thread):
    """Runs ``work`` in a thread of its own; keeps its result or its exception."""

    def __init__(self, name: str, work: Callable[[], Any]) -> None:
        super().__init__(name=name, daemon=True)
        self.work, self.result, self.error = work, None, None

    def run(self) -> None:
        try:
            self.result = self.work()
        except BaseException as exc:  # reported by the test
            self.error = exc


class World:
    """One database seen by independent actors, each on its own engine."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engines: list[sa.Engine] = []
        self.store = self.events()
        self.store.append("account", "a-1", deposits(*range(1, N + 1)), expected_version=0)

    def events(self) -> SqlEventStore:
        store = SqlEventStore.from_url(self.url)
        self.engines.append(store.engine)
        return store

    def compactor(self) -> tuple[Compactor, SqlEventStore]:
        store = self.events()
        compactor = Compactor(
            store=store,
            snapshot_store=SqlSnapshotStore(store.engine, create_tables=False),
            decider=Ledger(),
            state_type=dict,
            policy=CompactionPolicy(retain_last=0),
        )
        return compactor, store

    def lock_waiters(self) -> list[str]:
        """The queries of this database's backends that wait on a lock now."""
        with self.store.engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT query FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
                )
            )
            return [r[0] for r in rows]

    def until(self, done: Callable[[], bool], *, may_wait: bool, what: str) -> None:
        """Poll until ``done``; when ``may_wait`` is False, fail as soon as any backend
        waits on a lock (the thing under test must not)."""
        deadline = time.monotonic() + PATIENCE_S
        while not done():
            if not may_wait and (waiting := self.lock_waiters()):
                pytest.fail(f"{what}: a backend waits on a lock instead: {waiting}")
            if time.monotonic() > deadline:
                pytest.fail(f"{what}: not done after {PATIENCE_S} s")
            time.sleep(0.005)

    def waits_on_a_lock(self, what: str) -> None:
        self.until(lambda: bool(self.lock_waiters()), may_wait=True, what=what)

    def row(self) -> tuple[int, int, int]:
        info = self.store.stream_info("account", "a-1")
        assert info is not None
        return info.head_version, info.compacted_through, info.fence_token

    def versions(self) -> list[int]:
        return [e.version for e in self.store.read("account", "a-1")]

    def close(self) -> None:
        for engine in self.engines:
            engine.dispose()


@pytest.fixture
def world(url: str) -> Iterator[World]:
    made = World(url)
    yield made
    made.close()


def _compaction(world: World, name: str, pause_at: str | None) -> tuple[Actor, Pause | None]:
    compactor, store = world.compactor()
    pause = None if pause_at is None else Pause(store.engine, pause_at)
    actor = Actor(name, lambda: compactor.compact("account", "a-1"))
    actor.start()
    if pause is not None:
        world.until(pause.reached.is_set, may_wait=True, what=f"{name} reaching {pause_at}")
    return actor, pause


def _finish(actor: Actor) -> CompactionResult:
    actor.join(PATIENCE_S)
    assert not actor.is_alive(), f"{actor.name} did not finish"
    assert actor.error is None, actor.error
    assert isinstance(actor.result, CompactionResult)
    assert actor.result.outcome is not Outcome.FAILED, actor.result.error
    return actor.result


DELETE_EVENTS = "DELETE FROM eskit_events"


def test_an_append_commits_while_the_delete_transaction_is_open(world: World):
    """(a) The compaction is paused after its DELETE, its transaction open; an append to
    the same stream commits meanwhile (before: it waited on the row lock the delete
    transaction took first)."""
    compaction, pause = _compaction(world, "compaction", DELETE_EVENTS)
    assert pause is not None
    writer = world.events()
    append = Actor(
        "append", lambda: writer.append("account", "a-1", deposits(7), expected_version=N)
    )
    append.start()
    try:
        world.until(lambda: not append.is_alive(), may_wait=False, what="the append")
        assert append.error is None and append.result == N + 1
        # The append has committed, and the delete transaction is still open: its
        # DELETE is invisible, the compaction point has not moved.
        assert compaction.is_alive() and not pause.go.is_set()
        assert world.row()[:2] == (N + 1, 0)
        assert world.versions() == list(range(1, N + 2))
    finally:
        pause.release()
    result = _finish(compaction)
    assert (result.outcome, result.events_deleted, result.head_version) == (
        Outcome.COMPACTED,
        N,
        N,
    )
    # The cut is the planned head; the appended event and the new head are kept.
    assert world.row()[:2] == (N + 1, N)
    assert world.versions() == [N + 1]
    [logged] = world.store.compaction_log("account", "a-1")
    assert (logged.through_version, logged.head_version) == (N, N)


def test_an_append_holding_the_row_at_the_fence_keeps_its_events_and_head(world: World):
    """(c) The append has updated the head (it holds the row) when the compaction
    reaches its fence: the fence waits for the append, re-reads the row, still finds
    its token and moves the compaction point only; the head stays the append's."""
    compaction, pause = _compaction(world, "compaction", DELETE_EVENTS)
    assert pause is not None
    writer = world.events()
    held = Pause(writer.engine, "UPDATE eskit_streams SET head_version")
    append = Actor(
        "append", lambda: writer.append("account", "a-1", deposits(7, 8), expected_version=N)
    )
    append.start()
    try:
        world.until(held.reached.is_set, may_wait=False, what="the append's head update")
        pause.release()  # the compaction goes on to its fence, and waits for the append
        world.waits_on_a_lock("the fence behind the append")
        assert compaction.is_alive()
    finally:
        pause.release()
        held.release()
    append.join(PATIENCE_S)
    assert append.error is None and append.result == N + 2
    result = _finish(compaction)
    assert (result.outcome, result.events_deleted) == (Outcome.COMPACTED, N)
    assert world.row()[:2] == (N + 2, N)
    assert world.versions() == [N + 1, N + 2]
    latest = SqlSnapshotStore(world.store.engine, create_tables=False).latest("account", "a-1")
    assert latest is not None and latest.verified and latest.version == N


def test_a_fence_taken_during_the_delete_does_not_wait_and_stops_it(world: World):
    """(b) A newer compaction takes its fencing token while the older one's DELETE is
    done but not committed (before: acquire_fence waited for that transaction). The
    older one is then refused at its fence: nothing deleted, nothing logged."""
    stale, pause = _compaction(world, "stale", DELETE_EVENTS)
    assert pause is not None
    _, token_before = world.row()[1:]
    newer = world.events()
    fence = Actor("fence", lambda: newer.acquire_fence("account", "a-1"))
    fence.start()
    try:
        world.until(lambda: not fence.is_alive(), may_wait=False, what="the newer fence")
        assert fence.error is None and fence.result is not None
        assert fence.result.fence_token == token_before + 1
        assert stale.is_alive()
    finally:
        pause.release()
    result = _finish(stale)
    assert (result.outcome, result.events_deleted) == (Outcome.FENCED, 0)
    assert "stale" in (result.error or "")
    assert world.row() == (N, 0, token_before + 1)
    assert world.versions() == list(range(1, N + 1))
    assert world.store.compaction_log("account", "a-1") == []
    assert (
        SqlSnapshotStore(world.store.engine, create_tables=False).latest("account", "a-1") is None
    )


def test_two_compactions_deleting_at_once_delete_once(world: World):
    """(b) A newer compaction runs whole while a stale one's DELETE is uncommitted: its
    own DELETE waits for the stale one's row locks; the stale one is then refused at its
    fence and rolls back, and the newer deletes the events, once."""
    stale, pause = _compaction(world, "stale", DELETE_EVENTS)
    assert pause is not None
    newer, _ = _compaction(world, "newer", None)
    try:
        world.waits_on_a_lock("the newer DELETE behind the stale one")
        assert stale.is_alive() and newer.is_alive()
    finally:
        pause.release()
    refused, done = _finish(stale), _finish(newer)
    assert (refused.outcome, refused.events_deleted) == (Outcome.FENCED, 0)
    assert (done.outcome, done.events_deleted) == (Outcome.COMPACTED, N)
    assert world.row()[:2] == (N, N)
    assert world.versions() == []
    [logged] = world.store.compaction_log("account", "a-1")
    assert (logged.compaction_id, logged.events_deleted) == (done.compaction_id, N)
    latest = SqlSnapshotStore(world.store.engine, create_tables=False).latest("account", "a-1")
    assert latest is not None and latest.verified and latest.version == N


def test_a_stale_delete_that_starts_after_the_newer_committed_is_fenced(world: World):
    """(b) The stale compaction passed its early checks (the row still showed its
    token) and is paused before its DELETE; a newer compaction commits whole; the stale
    DELETE then finds nothing to delete, and the fence, checked before the row count,
    reports it as fenced, not as a mismatch."""
    stale, pause = _compaction(world, "stale", "SELECT eskit_snapshots.state_hash")
    assert pause is not None
    newer, _ = _compaction(world, "newer", None)
    try:
        done = _finish(newer)  # nothing of the stale one stands in its way
    finally:
        pause.release()
    refused = _finish(stale)
    assert (done.outcome, done.events_deleted) == (Outcome.COMPACTED, N)
    assert (refused.outcome, refused.events_deleted) == (Outcome.FENCED, 0)
    assert world.row()[:2] == (N, N)
    assert [r.compaction_id for r in world.store.compaction_log("account", "a-1")] == [
        done.compaction_id
    ]
