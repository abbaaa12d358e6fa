"""A demo domain (bank accounts) and the embedded demo run.

``python -m eskit_tasks.demo`` seeds an SQLite file with a few long account streams,
compacts them (keeping the newest events as an audit trail), proves that every
account's balance is unchanged, and prints a summary. No broker, no server.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

from eskit_tasks.compactor import Compactor
from eskit_tasks.errors import EskitError
from eskit_tasks.events import NewEvent, RecordedEvent
from eskit_tasks.loading import load_state
from eskit_tasks.policy import CompactionPolicy
from eskit_tasks.registry import register_decider
from eskit_tasks.result import CompactionResult, Outcome
from eskit_tasks.stores.dialects import mask_url
from eskit_tasks.stores.sql import SqlEventStore, SqlSnapshotStore

STREAM_TYPE = "account"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class AccountState(BaseModel):
    """A bank account folded from its events."""

    opened: bool = False
    owner: str = ""
    balance_cents: int = 0
    deposits: int = 0
    withdrawals: int = 0


class Account:
    """Decider for the demo accounts: Opened, Deposited, Withdrawn."""

    def initial_state(self) -> AccountState:
        return AccountState()

    def evolve(self, state: AccountState, event: RecordedEvent) -> AccountState:
        data = event.data
        if event.type == "Opened":
            return state.model_copy(update={"opened": True, "owner": data["owner"]})
        if event.type == "Deposited":
            return state.model_copy(
                update={
                    "balance_cents": state.balance_cents + data["cents"],
                    "deposits": state.deposits + 1,
                }
            )
        if event.type == "Withdrawn":
            return state.model_copy(
                update={
                    "balance_cents": state.balance_cents - data["cents"],
                    "withdrawals": state.withdrawals + 1,
                }
            )
        raise ValueError(f"unknown account event {event.type!r}")

    def decide(self, command: Any, state: AccountState) -> list[NewEvent]:
        kind, cents = command
        if kind == "withdraw" and cents > state.balance_cents:
            return []  # refused: insufficient funds
        return [
            NewEvent(type="Deposited" if kind == "deposit" else "Withdrawn", data={"cents": cents})
        ]


# Workers that list this module in ESKIT_DECIDER_MODULES can compact the demo accounts.
register_decider(STREAM_TYPE, Account(), AccountState)


def seed(
    store: SqlEventStore, stream_id: str, events: int, rng: random.Random, batch: int = 1000
) -> int:
    """Append ``events`` events to a new (or existing) account stream; return its head."""
    decider = Account()
    head = store.head_version(STREAM_TYPE, stream_id)
    state = AccountState()
    if head == 0:
        head = store.append(
            STREAM_TYPE,
            stream_id,
            [NewEvent(type="Opened", data={"owner": stream_id})],
            expected_version=0,
        )
        state = state.model_copy(update={"opened": True, "owner": stream_id})
    pending: list[NewEvent] = []
    for _ in range(events - 1):
        kind = "deposit" if rng.random() < 0.6 else "withdraw"
        new = decider.decide((kind, rng.randint(100, 50_000)), state)
        for event in new:
            state = decider.evolve(state, RecordedEvent(0, event.type, event.data, {}, _EPOCH))
        pending.extend(new)
        if len(pending) >= batch:
            head = store.append(STREAM_TYPE, stream_id, pending, expected_version=head)
            pending = []
    if pending:
        head = store.append(STREAM_TYPE, stream_id, pending, expected_version=head)
    return head


def run(database: str, streams: int, events: int, retain_last: int, out: Any = sys.stdout) -> int:
    """Seed, compact, verify and print; return a process exit status."""
    store = SqlEventStore.from_url(database)
    snapshots = SqlSnapshotStore(store.engine)
    rng = random.Random(7)  # noqa: S311 -- demo data, not security
    ids = [f"acct-{n:03d}" for n in range(1, streams + 1)]
    print(f"database   {mask_url(store.engine.url)}", file=out)
    started = time.perf_counter()
    for stream_id in ids:
        seed(store, stream_id, events, rng)
    print(
        f"seeded     {streams} accounts x {events} events in {time.perf_counter() - started:.1f}s",
        file=out,
    )

    decider = Account()
    before = {
        sid: load_state(store, snapshots, decider, AccountState, STREAM_TYPE, sid) for sid in ids
    }
    compactor = Compactor(
        store=store,
        snapshot_store=snapshots,
        decider=decider,
        state_type=AccountState,
        policy=CompactionPolicy(retain_last=retain_last),
    )
    started = time.perf_counter()
    results = [compactor.compact(STREAM_TYPE, sid) for sid in ids]
    elapsed = time.perf_counter() - started
    after = {
        sid: load_state(store, snapshots, decider, AccountState, STREAM_TYPE, sid) for sid in ids
    }

    print(file=out)
    print(
        f"{'stream':<12}{'outcome':<20}{'head':>8}{'snapshot':>10}{'deleted':>9}"
        f"{'kept':>6}{'balance':>14}",
        file=out,
    )
    for r in results:
        state, _ = after[r.stream_id]
        print(
            f"{r.stream_id:<12}{r.outcome.value:<20}{r.head_version:>8}"
            f"{r.snapshot_version or '-':>10}{r.events_deleted:>9}{r.events_retained:>6}"
            f"{state.balance_cents / 100:>14,.2f}",
            file=out,
        )
    _summary(results, elapsed, out)
    unchanged = before == after
    print(f"state after compaction equals state before: {'yes' if unchanged else 'NO'}", file=out)
    failed = [r for r in results if not r.ok]
    for r in failed:
        print(f"FAILED {r.stream_id}: {r.error}", file=out)
    return 0 if unchanged and not failed else 1


def _summary(results: Sequence[CompactionResult], elapsed: float, out: Any) -> None:
    by: dict[Outcome, int] = {}
    for r in results:
        by[r.outcome] = by.get(r.outcome, 0) + 1
    deleted = sum(r.events_deleted for r in results if r.outcome == Outcome.COMPACTED)
    reclaimed = sum(r.bytes_reclaimed for r in results if r.outcome == Outcome.COMPACTED)
    outcomes = ", ".join(f"{n} {o.value}" for o, n in sorted(by.items()))
    print(file=out)
    print(
        f"compacted  {outcomes} in {elapsed:.2f}s ({deleted / max(elapsed, 1e-9):,.0f} events/s)",
        file=out,
    )
    print(f"deleted    {deleted:,} events, ~{reclaimed / 1024 / 1024:.1f} MiB reclaimed", file=out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eskit_tasks.demo", description=__doc__)
    parser.add_argument(
        "--database", default="sqlite:///eskit-demo.db", help="database URL (default: %(default)s)"
    )
    parser.add_argument("--streams", type=int, default=5, help="accounts to seed (default: 5)")
    parser.add_argument(
        "--events", type=int, default=20_000, help="events per account (default: 20000)"
    )
    parser.add_argument(
        "--retain-last",
        type=int,
        default=100,
        help="newest events to keep per account (default: 100)",
    )
    args = parser.parse_args(argv)
    if args.streams < 1 or args.events < 1:
        parser.error("--streams and --events must be at least 1")
    try:
        return run(args.database, args.streams, args.events, args.retain_last)
    except EskitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
