"""Positions under concurrent writers on PostgreSQL: a follower that reads with
``read_all`` in a loop never skips an event that commits late below its position.

Writers sleep a random while between taking their positions and COMMIT (a listener on
the engine's commit), which is exactly when a plain sequence lets a higher position
become visible first. A control run without the append lock must catch a skip, which
shows the test can see one.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from eskit_tasks import SqlEventStore
from eskit_tasks.stores import positions
from eskit_tasks.testing.deciders import deposits
from eskit_tasks.testing.services import scratch_database

WRITERS, APPENDS = 6, 30


@pytest.fixture
def store(postgres_url: str) -> Iterator[SqlEventStore]:
    with scratch_database(postgres_url, "eskit_positions") as url:
        made = SqlEventStore.from_url(url, pool_size=WRITERS + 2)
        yield made
        made.engine.dispose()


def _race(store: SqlEventStore, seed: int) -> tuple[set[int], set[int]]:
    """Writers append while a follower follows; return (positions the follower saw,
    positions in the store at the end)."""
    rng = random.Random(seed)
    lock = threading.Lock()

    @sa.event.listens_for(store.engine, "commit")
    def _slow_commit(conn: sa.Connection) -> None:
        if threading.current_thread().name.startswith("writer"):
            with lock:
                pause = rng.uniform(0, 0.02)
            time.sleep(pause)

    def write(n: int) -> None:
        for version in range(APPENDS):
            store.append("w", f"s-{n}", deposits(version), expected_version=version)

    seen: list[int] = []
    done = threading.Event()

    def follow() -> None:
        after = 0
        while True:
            finished = done.is_set()
            for event in store.read_all(after_position=after):
                seen.append(event.position)
                after = event.position
            if finished:
                return

    writers = [
        threading.Thread(target=write, args=(n,), name=f"writer-{n}") for n in range(WRITERS)
    ]
    follower = threading.Thread(target=follow, name="follower")
    follower.start()
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    done.set()
    follower.join()
    sa.event.remove(store.engine, "commit", _slow_commit)
    final = {e.position for e in store.read_all()}
    assert len(seen) == len(set(seen)), "the follower saw a position twice"
    return set(seen), final


def test_a_follower_never_skips_a_position_that_commits_late(store: SqlEventStore):
    seen, final = _race(store, seed=1)
    assert len(final) == WRITERS * APPENDS
    assert final - seen == set(), "the follower skipped events that committed late"


def test_without_the_append_lock_a_follower_skips(
    store: SqlEventStore, monkeypatch: pytest.MonkeyPatch
):
    """The control: a plain sequence (no lock held to COMMIT) lets the follower skip."""
    monkeypatch.setattr(
        positions,
        "_PG_TAKE",
        sa.text(
            "SELECT setval('eskit_events_position_seq', "
            "nextval('eskit_events_position_seq') + :n - 1) WHERE :key IS NOT NULL"
        ),
    )
    skipped: set[int] = set()
    for attempt in range(3):
        seen, final = _race(store, seed=attempt)
        skipped = final - seen
        if skipped:
            break
    assert skipped, "no skip without the lock: the race did not happen, the test is blind"
