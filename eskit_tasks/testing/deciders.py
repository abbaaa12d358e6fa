"""The deciders the contract suites compact, each built to expose one way a compaction
can go wrong (a nondeterministic fold, a lossy state type, a set or an enum that only
compares equal, a state type that changed between deployments ...).

Plain classes with no I/O; ``tests/`` and the soak use them too.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any
from zoneinfo import ZoneInfo

from pydantic import BaseModel

from eskit_tasks.domain.events import NewEvent, RecordedEvent


class Ledger:
    """dict state; every event's amount is summed and its version remembered.

    The state pins down exactly which events were folded: ``count`` and ``last`` reveal a
    gap or a double fold, ``total`` a wrong payload.
    """

    def initial_state(self) -> dict[str, Any]:
        return {"total": 0, "count": 0, "last": 0}

    def evolve(self, state: dict[str, Any], event: RecordedEvent) -> dict[str, Any]:
        if event.type == "Boom":
            raise RuntimeError("cannot fold a Boom")
        return {
            "total": state["total"] + event.data.get("amount", 0),
            "count": state["count"] + 1,
            "last": event.version,
        }

    def decide(self, command: Any, state: dict[str, Any]) -> list[NewEvent]:
        return [NewEvent(type="Deposited", data={"amount": int(command)})]


class MutatingLedger(Ledger):
    """Mutates the state in place, as deciders are allowed to."""

    def evolve(self, state: dict[str, Any], event: RecordedEvent) -> dict[str, Any]:
        state["total"] += event.data.get("amount", 0)
        state["count"] += 1
        state["last"] = event.version
        return state


class CountingLedger(Ledger):
    """Not deterministic: the state records how often evolve ran in this object's life,
    so folding the same events twice gives different states."""

    def __init__(self) -> None:
        self.calls = 0

    def evolve(self, state: dict[str, Any], event: RecordedEvent) -> dict[str, Any]:
        self.calls += 1
        return {**super().evolve(state, event), "calls": self.calls}


class ReorderingLedger(Ledger):
    """Not deterministic in a way ``==`` forgives: folding an event it folded before
    gives the same values with the keys in reverse order."""

    def __init__(self) -> None:
        self.folded: set[int] = set()

    def evolve(self, state: dict[str, Any], event: RecordedEvent) -> dict[str, Any]:
        new = super().evolve(state, event)
        if event.version in self.folded:
            return dict(reversed(new.items()))
        self.folded.add(event.version)
        return new


class LedgerModel(BaseModel):
    total: int = 0
    count: int = 0
    last: int = 0


class ModelLedger:
    """The same fold with a pydantic model as the state type."""

    def initial_state(self) -> LedgerModel:
        return LedgerModel()

    def evolve(self, state: LedgerModel, event: RecordedEvent) -> LedgerModel:
        return LedgerModel(
            total=state.total + event.data.get("amount", 0),
            count=state.count + 1,
            last=event.version,
        )

    def decide(self, command: Any, state: LedgerModel) -> list[NewEvent]:
        return []


class LossyTagger:
    """State holds a set in a dict: pydantic encodes it as a list, which decodes as a list.

    With ``state_type=dict`` the round trip changes the state — a lossy codec.
    """

    def initial_state(self) -> dict[str, Any]:
        return {"tags": set()}

    def evolve(self, state: dict[str, Any], event: RecordedEvent) -> dict[str, Any]:
        return {"tags": state["tags"] | {event.data["tag"]}}

    def decide(self, command: Any, state: dict[str, Any]) -> list[NewEvent]:
        return []


def deposits(*amounts: int) -> list[NewEvent]:
    return [NewEvent(type="Deposited", data={"amount": a}) for a in amounts]


def ledger_fold(amounts: list[int]) -> dict[str, Any]:
    """The model: what Ledger must give after depositing ``amounts`` in order."""
    return {"total": sum(amounts), "count": len(amounts), "last": len(amounts)}


# -- states that are equal to their snapshot, yet behave differently ([1/6] case 1) -----


class RecentKeys:
    """A dict used as an insertion-ordered queue: keeps the newest ``capacity`` keys and
    evicts the oldest. A snapshot that sorts the keys evicts the wrong one next time."""

    capacity = 3

    def initial_state(self) -> dict[str, int]:
        return {}

    def evolve(self, state: dict[str, int], event: RecordedEvent) -> dict[str, int]:
        state = {**state, event.data["key"]: event.version}
        while len(state) > self.capacity:
            del state[next(iter(state))]
        return state

    def decide(self, command: Any, state: dict[str, int]) -> list[NewEvent]:
        return []


def pushes(*keys: str) -> list[NewEvent]:
    return [NewEvent("Pushed", {"key": k}) for k in keys]


class Reminder(BaseModel):
    due: datetime | None = None


class Reminders:
    """A pydantic state holding a datetime in its own time zone; postponing moves the
    wall clock, so a fixed offset in place of ``Europe/Berlin`` drifts an hour at DST."""

    def initial_state(self) -> Reminder:
        return Reminder()

    def evolve(self, state: Reminder, event: RecordedEvent) -> Reminder:
        if event.type == "Scheduled":
            zone = ZoneInfo(event.data["zone"])
            return Reminder(due=datetime.fromisoformat(event.data["at"]).replace(tzinfo=zone))
        assert state.due is not None
        return Reminder(due=state.due + timedelta(days=event.data["days"]))

    def decide(self, command: Any, state: Reminder) -> list[NewEvent]:
        return []


class Status(StrEnum):
    OPEN = "open"
    CLOSED = "closed"


class Tickets:
    """An enum member inside a plain dict state: ``"open" == Status.OPEN``, but the next
    event calls ``.name`` on it."""

    def initial_state(self) -> dict[str, Any]:
        return {"status": Status.OPEN, "history": []}

    def evolve(self, state: dict[str, Any], event: RecordedEvent) -> dict[str, Any]:
        history = [*state["history"], state["status"].name]
        return {"status": Status(event.data["status"]), "history": history}

    def decide(self, command: Any, state: dict[str, Any]) -> list[NewEvent]:
        return []


# -- state types that change between deployments ([1/6] case 2) -------------------------


class BalanceV1(BaseModel):
    balance: int = 0


class BalanceV2(BaseModel):
    """V1 plus a field with a default: pydantic would silently fill it."""

    balance: int = 0
    deposits: int = 0


class Renamed(BaseModel):
    """V1 with ``balance`` renamed: pydantic would ignore the old key."""

    amount: int = 0


class Balances:
    """Folds deposits into whichever of the balance models it is given."""

    def __init__(self, state_type: type[BaseModel] = BalanceV1, **declared: Any) -> None:
        self.state_type = state_type
        self.__dict__.update(declared)  # state_version / upcasters, as a decider declares

    def initial_state(self) -> Any:
        return self.state_type()

    def evolve(self, state: Any, event: RecordedEvent) -> Any:
        fields = state.model_dump()
        amount = event.data.get("amount", 0)
        for name in ("balance", "amount"):
            if name in fields:
                fields[name] += amount
        if "deposits" in fields:
            fields["deposits"] += 1
        return self.state_type(**fields)

    def decide(self, command: Any, state: Any) -> list[NewEvent]:
        return []


class TagSet(BaseModel):
    tags: set[int] = set()


class Tagger:
    """A typed set state: snapshots list its members in whatever order the set iterates."""

    def initial_state(self) -> TagSet:
        return TagSet()

    def evolve(self, state: TagSet, event: RecordedEvent) -> TagSet:
        tags = set(state.tags)
        if "add" in event.data:
            tags.add(event.data["add"])
        else:
            tags.discard(event.data["remove"])
        return TagSet(tags=tags)

    def decide(self, command: Any, state: TagSet) -> list[NewEvent]:
        return []


class CalendarState(BaseModel):
    by_start: dict[datetime, str] = {}


class Calendar:
    """Datetimes in their own zone as dict keys: equal to a fixed offset, not the same."""

    def initial_state(self) -> CalendarState:
        return CalendarState()

    def evolve(self, state: CalendarState, event: RecordedEvent) -> CalendarState:
        at = datetime.fromisoformat(event.data["at"]).replace(tzinfo=ZoneInfo("Europe/Berlin"))
        return CalendarState(by_start={**state.by_start, at: event.data["what"]})

    def decide(self, command: Any, state: CalendarState) -> list[NewEvent]:
        return []
