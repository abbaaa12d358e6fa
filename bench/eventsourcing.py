"""ApplicationCompactor against the naive way to compact a pyeventsourcing aggregate.

The naive path is what a user of the library would write: ``app.take_snapshot(id,
version=H-1)`` (the library replays the aggregate and stores its snapshot), then one
``DELETE`` of versions 1..H-1. It verifies nothing, guards nothing, checks no follower.
Ours does the same work plus all of that (strict comparison of the decoded snapshot,
replay of the tail, read-back, exact row count, fencing, audit row). Both run on the
same application and database, on aggregates of the same size, back to back; the
figure is events deleted per second and the median ratio naive time / our time.
"""

from __future__ import annotations

import gc
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from uuid import UUID

import sqlalchemy as sa
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event

from eskit_tasks import CompactionPolicy
from eskit_tasks.eventsourcing import ApplicationCompactor
from eskit_tasks.testing.services import eventsourcing_postgres_env


class Account(Aggregate):
    @event("Opened")
    def __init__(self) -> None:
        self.balance = 0
        self.deposits = 0
        self.last_note = ""

    @event("Deposited")
    def deposit(self, amount: int, note: str) -> None:
        self.balance += amount
        self.deposits += 1
        self.last_note = note


class BenchBank(Application):
    is_snapshotting_enabled = True

    def open_with(self, events: int, batch: int = 5_000) -> UUID:
        account = Account()
        self.save(account)
        done = 1
        while done < events:
            account = self.repository.get(account.id)
            for i in range(min(batch, events - done)):
                account.deposit(i, "x" * 40)
            self.save(account)
            done = account.version
        return account.id


def _naive(app: BenchBank, engine: sa.Engine, table: str, stored: Any, head: int) -> None:
    app.take_snapshot(_id(stored), version=head - 1)
    with engine.begin() as conn:
        gone = conn.execute(
            sa.text(f"DELETE FROM {table} WHERE originator_id = :id AND originator_version < :h"),
            {"id": stored, "h": head},
        ).rowcount
    if gone != head - 1:
        raise RuntimeError(f"the naive path deleted {gone} events, not {head - 1}")


def _id(stored: Any) -> UUID:
    return stored if isinstance(stored, UUID) else UUID(hex=stored)


@contextmanager
def _application(url: str | None) -> Iterator[tuple[BenchBank, str, str]]:
    """The application on PostgreSQL (``url``) or a SQLite file, its SQLAlchemy URL and
    its events table."""
    if url is None:
        with tempfile.TemporaryDirectory() as tmp:
            env = {"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": f"{tmp}/b.db"}
            app = BenchBank(env=env)
            try:
                yield app, f"sqlite:///{tmp}/b.db", "stored_events"
            finally:
                app.close()
        return
    env = eventsourcing_postgres_env(url)
    app = BenchBank(env=env)
    try:
        yield app, url, "benchbank_events"
    finally:
        app.close()


def measure(url: str | None, events: int, rounds: int = 5) -> dict[str, Any]:
    """Compact ``rounds`` pairs of aggregates of ``events`` events each, naive then ours."""
    naive_times, our_times = [], []
    with _application(url) as (app, sa_url, table):
        engine = sa.create_engine(sa_url)
        compactor = ApplicationCompactor(
            app, policy=CompactionPolicy(retain_last=1), vacuum_after=0
        )
        sqlite = engine.dialect.name == "sqlite"
        for _ in range(rounds):
            theirs, mine = app.open_with(events), app.open_with(events)
            gc.collect()
            t = time.perf_counter()
            _naive(app, engine, table, theirs.hex if sqlite else theirs, events)
            naive_times.append(time.perf_counter() - t)
            gc.collect()
            t = time.perf_counter()
            result = compactor.compact(mine)
            our_times.append(time.perf_counter() - t)
            if (result.outcome, result.events_deleted) != ("compacted", events - 1):
                raise RuntimeError(f"our compaction did not succeed: {result}")
            if vars(app.repository.get(theirs))["balance"] != app.repository.get(mine).balance:
                raise RuntimeError("the two paths left different aggregates")
        compactor.close()
        engine.dispose()
        backend = "postgresql" if url else "sqlite"
    ratios = sorted(n / o for n, o in zip(naive_times, our_times, strict=True))
    naive_rate = (events - 1) / min(naive_times)
    our_rate = (events - 1) / min(our_times)
    return {
        "what": f"{events:,}-event aggregates, {backend}",
        "summary": f"{round(our_rate):,} vs {round(naive_rate):,} events/s "
        "(take_snapshot + DELETE)",
        "backend": backend,
        "events": events,
        "rounds": rounds,
        "naive_events_per_s": round(naive_rate),
        "ours_events_per_s": round(our_rate),
        "ratio": round(statistics.median(ratios), 3),
        "ratio_range": [round(ratios[0], 3), round(ratios[-1], 3)],
    }
