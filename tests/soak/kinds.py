"""The soak's stream kinds: how each is appended to, folded and typed.

Besides the Ledger (``ledger``, ``slow``) the soak appends to three kinds whose states
``==`` would forgive a lossy snapshot of, yet which round-trip when done right, so the
checker's strict comparison (:func:`eskit_tasks.domain.compare.first_difference`) catches a
snapshot that comes back merely equal:

* ``recent`` (``dict[str, int]``): a dict used as an insertion-ordered structure, the
  newest :data:`RECENT_CAPACITY` keys (key -> version of its last touch), the oldest
  evicted first. Keys arrive in no sorted order: a snapshot that sorted its keys would
  evict another key next.
* ``agenda`` (:class:`Agenda`): a pydantic model holding a datetime in a ``ZoneInfo``
  (:data:`ZonedDatetime` stores it as ``{"at": wall clock, "zone": key}``); postponing
  moves the wall clock, so a fixed offset in its place drifts at the next DST change.
* ``ticket`` (:class:`Ticket`): a pydantic model with a StrEnum and an IntEnum field, a
  list and a dict of enum members; ``"open" == Status.OPEN`` and ``2 == Priority.NORMAL``,
  but a decider calls ``.name`` on them.

Every kind's events are derived from the integers the writers draw (``amounts``), so the
model (model.py) keeps one list of integers per stream and folds it with its own code.

This module registers nothing: the workers import tests.soak.fleet_deciders.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from enum import IntEnum, StrEnum
from typing import Annotated, Any
from zoneinfo import ZoneInfo

from pydantic import BaseModel, BeforeValidator, PlainSerializer, WithJsonSchema

from eskit_tasks import NewEvent, RecordedEvent
from eskit_tasks.testing.deciders import Ledger, LossyTagger

#: Kinds folded by the Ledger.
LEDGER_KINDS = ("ledger", "slow")
#: Kinds whose states only a strict comparison tells apart from a lossy copy.
STRICT_KINDS = ("recent", "agenda", "ticket")
#: Every kind with a known state (the model computes it; never bad input).
FOLD_KINDS = LEDGER_KINDS + STRICT_KINDS

# -- recent: an insertion-ordered dict ---------------------------------------------------

#: How many keys a ``recent`` state keeps.
RECENT_CAPACITY = 5
#: The keys, in no sorted order (a key is drawn from its amount).
RECENT_KEYS = "qwertyuiopasdfghjklzxcvbnm"


def recent_key(amount: int) -> str:
    return RECENT_KEYS[amount % len(RECENT_KEYS)]


class RecentKeys:
    """``dict[str, int]``: touching a key moves it to the end with the event's version;
    beyond :data:`RECENT_CAPACITY` keys the first (oldest) one is evicted."""

    def initial_state(self) -> dict[str, int]:
        return {}

    def evolve(self, state: dict[str, int], event: RecordedEvent) -> dict[str, int]:
        key = event.data["key"]
        state = {k: v for k, v in state.items() if k != key}
        state[key] = event.version
        while len(state) > RECENT_CAPACITY:
            del state[next(iter(state))]
        return state

    def decide(self, command: Any, state: dict[str, int]) -> list[NewEvent]:
        return [NewEvent("Touched", {"key": str(command)})]


# -- agenda: a datetime whose zone must survive ------------------------------------------

#: The zones an agenda's appointment can be in ("UTC" too: a ZoneInfo, not timezone.utc).
ZONES = ("Europe/Berlin", "America/New_York", "Australia/Sydney", "Asia/Kolkata", "UTC")
#: Appointments are scheduled in the hours after this wall-clock time: the weeks around
#: the March DST changes in America, Europe and Australia (April).
AGENDA_BASE = datetime(2024, 3, 1, 0, 30)


def _zoned_from_json(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"at", "zone"}:
        return datetime.fromisoformat(value["at"]).replace(tzinfo=ZoneInfo(value["zone"]))
    return value  # a datetime from Python; anything else fails as a datetime


def _zoned_to_json(value: datetime) -> dict[str, str]:
    if not isinstance(value.tzinfo, ZoneInfo) or value.fold:
        raise ValueError(f"{value!r} is not a wall-clock time in a ZoneInfo")
    return {"at": value.replace(tzinfo=None).isoformat(), "zone": value.tzinfo.key}


#: A datetime in a ``ZoneInfo``, stored as its wall clock and the zone's key (a plain
#: ``datetime`` field would come back at a fixed offset, which compaction refuses).
ZonedDatetime = Annotated[
    datetime,
    BeforeValidator(_zoned_from_json),
    PlainSerializer(_zoned_to_json),
    WithJsonSchema(
        {
            "type": "object",
            "properties": {"at": {"type": "string"}, "zone": {"type": "string"}},
            "required": ["at", "zone"],
        }
    ),
]


class Agenda(BaseModel):
    due: ZonedDatetime | None = None
    moves: int = 0
    last: int = 0


def agenda_event(amount: int) -> NewEvent:
    """Every fifth amount schedules (a wall clock and a zone), the others postpone."""
    if amount % 5 == 0:
        at = AGENDA_BASE + timedelta(hours=amount)
        return NewEvent("Scheduled", {"at": at.isoformat(), "zone": ZONES[amount % len(ZONES)]})
    return NewEvent("Postponed", {"days": amount % 9, "hours": amount % 4})


class Agendas:
    """:class:`Agenda`: Scheduled sets the appointment, Postponed moves its wall clock
    (nothing to move before the first Scheduled); ``moves`` counts the postponements."""

    def initial_state(self) -> Agenda:
        return Agenda()

    def evolve(self, state: Agenda, event: RecordedEvent) -> Agenda:
        if event.type == "Scheduled":
            zone = ZoneInfo(event.data["zone"])
            due = datetime.fromisoformat(event.data["at"]).replace(tzinfo=zone)
            return Agenda(due=due, moves=0, last=event.version)
        moved = state.due
        if moved is not None:
            moved += timedelta(days=event.data["days"], hours=event.data["hours"])
        return Agenda(due=moved, moves=state.moves + 1, last=event.version)

    def decide(self, command: Any, state: Agenda) -> list[NewEvent]:
        return [agenda_event(int(command))]


# -- ticket: enums declared by the state type --------------------------------------------


class Status(StrEnum):
    OPEN = "open"
    IN_PROGRESS = "in_progress"
    BLOCKED = "blocked"
    CLOSED = "closed"


class Priority(IntEnum):
    LOW = 1
    NORMAL = 2
    HIGH = 3
    URGENT = 4


#: How many earlier statuses a ticket remembers.
TICKET_HISTORY = 4


class Ticket(BaseModel):
    status: Status = Status.OPEN
    priority: Priority = Priority.NORMAL
    #: The statuses before the current one, oldest first.
    history: list[Status] = []
    #: By status *name*, in the order first reached: the highest priority it had then.
    reached: dict[str, Priority] = {}
    last: int = 0


def ticket_event(amount: int) -> NewEvent:
    statuses = list(Status)
    return NewEvent(
        "Moved",
        {"status": statuses[amount % 4].value, "priority": 1 + (amount // 4) % 4},
    )


class Tickets:
    """:class:`Ticket`: each move sets the status and priority, remembers the previous
    status and, by the new status's *name*, the highest priority it was reached with."""

    def initial_state(self) -> Ticket:
        return Ticket()

    def evolve(self, state: Ticket, event: RecordedEvent) -> Ticket:
        status = Status(event.data["status"])
        priority = Priority(event.data["priority"])
        reached = dict(state.reached)
        name = status.name  # an enum's own behaviour: a str in its place has no .name
        reached[name] = max(reached.get(name, Priority.LOW), priority)
        return Ticket(
            status=status,
            priority=priority,
            history=[*state.history, state.status][-TICKET_HISTORY:],
            reached=reached,
            last=event.version,
        )

    def decide(self, command: Any, state: Ticket) -> list[NewEvent]:
        return [ticket_event(int(command))]


# -- by kind -----------------------------------------------------------------------------


def events_for(kind: str, stream_id: str, amounts: list[int]) -> list[NewEvent]:
    """The events a writer appends to a stream of ``kind`` for ``amounts``."""
    if kind == "recent":
        return [NewEvent("Touched", {"key": recent_key(a)}) for a in amounts]
    if kind == "agenda":
        return [agenda_event(a) for a in amounts]
    if kind == "ticket":
        return [ticket_event(a) for a in amounts]
    # The stream id in the metadata: the "slow" decider's marker files name it.
    return [NewEvent("Deposited", {"amount": a}, {"stream": stream_id}) for a in amounts]


#: What a reader or the final check folds each kind with: (decider, state_type). The
#: workers register the same (tests.fleet_deciders, tests.soak.fleet_deciders).
FOLDERS: dict[str, tuple[Any, Any]] = {
    "ledger": (Ledger(), dict),
    "slow": (Ledger(), dict),
    "lossy": (LossyTagger(), dict),
    "boom": (Ledger(), dict),
    "recent": (RecentKeys(), dict[str, int]),
    "agenda": (Agendas(), Agenda),
    "ticket": (Tickets(), Ticket),
}
