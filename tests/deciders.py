"""Deciders used by the tests."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from eskit_tasks import NewEvent, RecordedEvent


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


@dataclass
class Tags:
    names: set[str] = field(default_factory=set)


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
