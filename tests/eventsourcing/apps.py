"""Applications of the real eventsourcing library for the tests: a bank whose accounts
take deposits, a follower that audits them, and aggregates whose state the library's
transcoder cannot keep."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError, Application, ProcessingEvent
from eventsourcing.dispatch import singledispatchmethod
from eventsourcing.domain import Aggregate, DomainEvent, DomainEventProtocol, event
from eventsourcing.system import ProcessApplication

__all__ = [
    "Account",
    "AccountLogged",
    "AggregateNotFoundError",
    "Aliased",
    "Audit",
    "Bank",
    "Ledgerish",
    "Slotted",
    "state_of",
]


class Account(Aggregate):
    @event("Opened")
    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.balance = 0
        self.deposits = 0

    @event("Deposited")
    def deposit(self, amount: int) -> None:
        self.balance += amount
        self.deposits += 1


class Ledgerish(Aggregate):
    """Keeps a tuple and an int-keyed dict: the JSON transcoder gives back a list and
    string keys, so a snapshot of it is not the aggregate."""

    @event("Started")
    def __init__(self) -> None:
        self.tags: tuple[str, ...] = ()
        self.by_day: dict[int, int] = {}

    @event("Booked")
    def book(self, day: int, tag: str) -> None:
        self.tags = (*self.tags, tag)
        self.by_day[day] = self.by_day.get(day, 0) + 1


class Slotted(Aggregate):
    """Keeps part of its state in a slot, outside vars(): a snapshot drops it."""

    __slots__ = ("secret",)

    @event("Made")
    def __init__(self) -> None:
        self.n = 0

    @event("Hidden")
    def hide(self, secret: str) -> None:
        self.secret = secret

    @event("Bumped")
    def bump(self) -> None:
        self.n += 1


class Aliased(Aggregate):
    """One list under two names: a snapshot decodes two lists, and the next append
    changes one of them only."""

    @event("Made")
    def __init__(self) -> None:
        self.all: list[int] = []
        self.open = self.all

    @event("Added")
    def add(self, x: int) -> None:
        self.open.append(x)


class AccountLogged(DomainEvent):
    """An event of an event-sourced log (EventSourcedLog), not of an aggregate."""

    account_id: UUID


class Bank(Application):
    is_snapshotting_enabled = True

    def open(self, owner: str) -> UUID:
        account = Account(owner)
        self.save(account)
        return account.id

    def deposit(self, account_id: UUID, *amounts: int) -> None:
        account: Account = self.repository.get(account_id)
        for amount in amounts:
            account.deposit(amount)
        self.save(account)

    def start_ledger(self, days: int) -> UUID:
        ledger = Ledgerish()
        for day in range(days):
            ledger.book(day % 3, f"t{day}")
        self.save(ledger)
        return ledger.id


class Audit(ProcessApplication):
    """Counts the deposits it has processed, per account, in its own database."""

    @singledispatchmethod
    def policy(self, domain_event: DomainEventProtocol, processing_event: ProcessingEvent) -> None:
        """Ignore what is not a deposit."""

    @policy.register(Account.Deposited)
    def _(self, domain_event: Any, processing_event: ProcessingEvent) -> None:
        self.seen.append((domain_event.originator_id, domain_event.originator_version))

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[UUID, int]] = []


def state_of(aggregate: Any) -> dict[str, Any]:
    """An aggregate's attributes, but the events it has not saved."""
    return {k: v for k, v in vars(aggregate).items() if k != "_pending_events"}
