"""A demo domain: bank accounts, their decider, and a seeder of long streams.

``eskit-tasks demo`` uses it to seed an embedded SQLite file, compact it and prove the
balances unchanged. Importing this module registers the ``account`` stream type, so a
fleet with ``ESKIT_DECIDER_MODULES=eskit_tasks.demo`` can compact the demo accounts.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

from eskit_tasks.core.registry import register_decider
from eskit_tasks.domain.events import NewEvent, RecordedEvent
from eskit_tasks.stores.sql import SqlEventStore

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
