"""The model: what the writers know they appended, and the states that implies.

Each stream has exactly one owning writer thread, so the owner always knows the head:
an append that succeeded is recorded, and one whose outcome is unknown (its connection
was terminated around the commit) is resolved by reading the head afterwards. The
model of a stream is the list of acknowledged amounts (the integers its events were
made of, tests/soak/kinds.py); the Ledger state at version v is the fold of the first v
of them, which pins down exactly which events were folded (``count``/``last`` reveal a
gap or a double fold, ``total`` a wrong one). The strictly compared kinds (``recent``,
``agenda``, ``ticket``) are folded here by the model's own code, state by state.

Every state anyone observed (a reader's ``load_state``, a verified snapshot in the
database) is checked against the model: immediately when the model already reaches
its version, otherwise at the end, when every append is resolved. "Is the model's
state" means *indistinguishable* from it (:func:`eskit_tasks.domain.compare.first_difference`):
the same types at every node (an enum is not its value), dict keys in the same order,
datetimes in the same time zone; a snapshot's stored JSON must also be the JSON of the
model's state, key for key and in order.
"""

from __future__ import annotations

import functools
import json
import threading
import zlib
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from zoneinfo import ZoneInfo

from pydantic import TypeAdapter, ValidationError

from eskit_tasks import RecordedEvent
from eskit_tasks.domain.compare import first_difference
from tests.soak.kinds import (
    AGENDA_BASE,
    FOLD_KINDS,
    FOLDERS,
    RECENT_CAPACITY,
    TICKET_HISTORY,
    ZONES,
    Agenda,
    Priority,
    Status,
    Ticket,
    events_for,
    recent_key,
)

#: Longest repr of a state in a violation.
SHOWN_WIDTH = 160
#: Bad input: a Boom event the Ledger cannot fold, a type without a decider, a state
#: whose codec does not round-trip. Never compacted; every event must stay.
BAD_KINDS = ("boom", "ghost", "lossy")
#: What every compaction of a bad stream must report.
BAD_OUTCOMES = frozenset({"failed", "verification_failed"})
#: How each bad stream fails when nothing else goes wrong: (outcome, error_type).
BAD_RESULTS: dict[str, tuple[str, str | None]] = {
    "boom": ("failed", "EvolveError"),
    "ghost": ("failed", "UnknownStreamTypeError"),
    "lossy": ("verification_failed", None),
}
#: The soak's consumer of the store (tests/soak/consumers.py): its checkpoint covers
#: every stream type, so it holds back compactions of every stream.
PROJECTION = "soak-projection"
#: Error types of an attempt that failed because of a fault (then retried), whatever the
#: stream: the database or Redis was unreachable.
TRANSIENT_ERRORS = frozenset(
    {"DatabaseUnavailableError", "ConnectionError", "TimeoutError", "RedisError"}
)


def ledger_state(total: int, version: int) -> dict[str, int]:
    """The Ledger's state after ``version`` deposits summing to ``total``."""
    return {"total": total, "count": version, "last": version}


# -- the model's folds of the strictly compared kinds (tests/soak/kinds.py has the
# deciders; these work on the amounts, not on the events) --------------------------------


def recent_state(state: dict[str, int], amount: int, version: int) -> dict[str, int]:
    """``recent``: the key moves to the end; only the newest keys stay."""
    key = recent_key(amount)
    order = [k for k in state if k != key] + [key]
    values = {**state, key: version}
    return {k: values[k] for k in order[-RECENT_CAPACITY:]}


def agenda_state(state: Agenda, amount: int, version: int) -> Agenda:
    """``agenda``: every fifth amount schedules in one of the zones, others postpone."""
    if amount % 5 == 0:
        zone = ZoneInfo(ZONES[amount % len(ZONES)])
        due = (AGENDA_BASE + timedelta(hours=amount)).replace(tzinfo=zone)
        return Agenda(due=due, moves=0, last=version)
    moved = None if state.due is None else state.due + timedelta(days=amount % 9, hours=amount % 4)
    return Agenda(due=moved, moves=state.moves + 1, last=version)


def ticket_state(state: Ticket, amount: int, version: int) -> Ticket:
    """``ticket``: the status and priority drawn from the amount."""
    status = list(Status)[amount % 4]
    priority = Priority(1 + (amount // 4) % 4)
    reached = dict(state.reached)
    reached[status.name] = max(reached.get(status.name, Priority.LOW), priority)
    history = [*state.history, state.status][-TICKET_HISTORY:]
    return Ticket(status=status, priority=priority, history=history, reached=reached, last=version)


#: Per strictly compared kind: its initial state and the model's fold.
STRICT_FOLDS: dict[str, tuple[Any, Any]] = {
    "recent": (dict, recent_state),
    "agenda": (Agenda, agenda_state),
    "ticket": (Ticket, ticket_state),
}


@functools.cache
def state_adapter(kind: str) -> TypeAdapter[Any]:
    """pydantic's adapter of the state type that ``kind`` is folded and snapshotted as."""
    return TypeAdapter(FOLDERS[kind][1])


@dataclass(eq=False)
class StreamModel:
    """One stream as its owning writer knows it.

    ``amounts`` only grows, and ``prefix`` is extended before ``amounts``, so another
    thread reading ``acked()`` and then ``prefix[v]`` for ``v <= acked()`` needs no lock.
    """

    stream_type: str
    stream_id: str
    kind: str
    owner: int
    amounts: list[int] = field(default_factory=list)
    prefix: list[int] = field(default_factory=lambda: [0])
    #: The model lost track of this stream (already reported): skip further checks.
    broken: bool = False
    #: Strictly compared kinds: the state at each version (extended before ``amounts``).
    states: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind in STRICT_FOLDS and not self.states:
            self.states.append(STRICT_FOLDS[self.kind][0]())

    @property
    def label(self) -> str:
        return f"{self.stream_type}/{self.stream_id}"

    @property
    def folds(self) -> bool:
        return self.kind in FOLD_KINDS

    def acked(self) -> int:
        return len(self.amounts)

    def record(self, amounts: list[int]) -> None:
        fold = STRICT_FOLDS[self.kind][1] if self.kind in STRICT_FOLDS else None
        for amount in amounts:
            self.prefix.append(self.prefix[-1] + amount)
            if fold is not None:
                self.states.append(fold(self.states[-1], amount, len(self.states)))
        self.amounts.extend(amounts)

    def state_at(self, version: int) -> Any | None:
        """The state at ``version`` (the Ledger's, or the strict kind's); None when the
        model does not reach it yet."""
        if version < 0 or version > len(self.amounts):
            return None
        if self.kind in STRICT_FOLDS:
            return self.states[version]
        return ledger_state(self.prefix[version], version)


@dataclass(frozen=True)
class Observation:
    """A state somebody saw: ``source`` "reader" (load_state) or "snapshot" (a verified
    snapshot in the database). ``acked_before`` is the model's head when the read began:
    a reader must see at least that (0 for snapshots). A snapshot's ``state`` is its
    stored JSON text, decoded as the stream kind's state type when it is checked."""

    stream: StreamModel
    version: int
    state: Any
    acked_before: int
    source: str


class Violations:
    """Invariant violations, thread-safe: each distinct one counted once (a broken row is
    found again by every later check), the first ``keep`` kept."""

    def __init__(self, keep: int = 200) -> None:
        self._lock = threading.Lock()
        self.keep = keep
        self.messages: list[str] = []
        self.by_kind: Counter[str] = Counter()
        self._seen: set[str] = set()

    def add(self, kind: str, message: str) -> None:
        with self._lock:
            if message in self._seen:
                return
            self._seen.add(message)
            self.by_kind[kind] += 1
            if len(self.messages) < self.keep:
                self.messages.append(f"[{kind}] {message}")

    @property
    def count(self) -> int:
        return sum(self.by_kind.values())


class Stats:
    """Thread-safe counters."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counts[name] += n

    def get(self, name: str) -> int:
        return self.counts.get(name, 0)

    def prefixed(self, prefix: str) -> dict[str, int]:
        with self._lock:
            return {
                k[len(prefix) :]: v for k, v in sorted(self.counts.items()) if k.startswith(prefix)
            }


class Model:
    """Every stream of the soak, and the observations still waiting to be checked."""

    def __init__(self, violations: Violations) -> None:
        self.streams: dict[tuple[str, str], StreamModel] = {}
        self.violations = violations
        self._deferred: list[Observation] = []
        self._lock = threading.Lock()
        self.checked = 0

    def add(self, stream: StreamModel) -> None:
        self.streams[(stream.stream_type, stream.stream_id)] = stream

    def get(self, stream_type: str, stream_id: str) -> StreamModel | None:
        return self.streams.get((stream_type, stream_id))

    def of_kind(self, *kinds: str) -> list[StreamModel]:
        return [s for s in self.streams.values() if s.kind in kinds]

    def acked_snapshot(self) -> dict[tuple[str, str], int]:
        """Every stream's acknowledged head now (a lower bound of its head from now on)."""
        return {key: s.acked() for key, s in self.streams.items()}

    def observe(self, obs: Observation) -> None:
        """Check ``obs`` now, or keep it for :meth:`check_deferred` when the model does
        not reach its version yet (an append in flight or unresolved)."""
        problem = _problem(obs, final=False)
        with self._lock:
            self.checked += 1
            if problem is _DEFER:
                self._deferred.append(obs)
                return
        if problem is not None:
            self._report(obs, str(problem))

    def check_deferred(self) -> int:
        """At the end, with every append resolved: check the observations kept back."""
        with self._lock:
            pending, self._deferred = self._deferred, []
        for obs in pending:
            problem = _problem(obs, final=True)
            if problem is not None:
                self._report(obs, str(problem))
        return len(pending)

    def _report(self, obs: Observation, problem: str) -> None:
        obs.stream.broken = obs.stream.broken or obs.source == "snapshot"
        kind = "stale_read" if problem.startswith("stale") else "state"
        self.violations.add(kind, f"{obs.source} of {obs.stream.label}: {problem}")


_DEFER = object()


def _problem(obs: Observation, *, final: bool) -> object | None:
    """None if ``obs`` is a state the model had, else what is wrong (or _DEFER)."""
    if obs.stream.broken:
        return None
    if obs.version < obs.acked_before:
        return (
            f"stale read: version {obs.version}, but {obs.acked_before} events were "
            "acknowledged before the read began"
        )
    expected = obs.stream.state_at(obs.version)
    if expected is None:
        if not final:
            return _DEFER
        return (
            f"version {obs.version} is beyond the {obs.stream.acked()} events ever "
            f"acknowledged (state {obs.state})"
        )
    if obs.source == "snapshot":
        return snapshot_problem(obs.stream.kind, obs.version, obs.state, expected)
    return state_problem(obs.version, obs.state, expected)


def state_problem(version: int, state: Any, expected: Any) -> str | None:
    """None if ``state`` is indistinguishable from the model's ``expected``, else the
    violation (with the first difference)."""
    difference = first_difference(expected, state)
    if difference is None:
        return None
    return (
        f"state at version {version} is not the model's, {difference} "
        f"(state {shown(state)}; the model says {shown(expected)})"
    )


def snapshot_problem(kind: str, version: int, stored: str, expected: Any) -> str | None:
    """A verified snapshot's stored JSON: it decodes (as ``kind``'s state type) to the
    model's state, and it is that state's JSON (the same keys, in the same order)."""
    adapter = state_adapter(kind)
    try:
        state = adapter.validate_json(stored)
    except ValidationError as exc:
        first = " ".join(str(exc).splitlines()[:3])
        return f"snapshot at version {version} does not decode as its state type: {first}"
    problem = state_problem(version, state, expected)
    if problem is not None:
        return f"decoded, the snapshot's {problem}"
    difference = first_difference(adapter.dump_python(expected, mode="json"), json.loads(stored))
    if difference is None:
        return None
    return (
        f"the snapshot at version {version} decodes to the model's state, but its stored "
        f"JSON is not that state's JSON, {difference} (stored {shown(stored)})"
    )


def shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= SHOWN_WIDTH else text[: SHOWN_WIDTH - 3] + "..."


# -- the projection's own model (tests/soak/consumers.py follows the store into it) ---------


def fingerprint(data: Any) -> int:
    """A short digest of an event's payload (decoded JSON), the same whether it comes
    from ``read_all`` or from an archive entry's stored JSON text."""
    return zlib.crc32(json.dumps(data, sort_keys=True, separators=(",", ":")).encode())


def appended_data(stream: StreamModel, version: int) -> Any | None:
    """The payload the owning writer appended at ``version`` (None: not known, i.e.
    beyond the model, a bad-input stream, or a stream the model lost track of)."""
    if stream.broken or not stream.folds or not 1 <= version <= stream.acked():
        return None
    return events_for(stream.kind, stream.stream_id, [stream.amounts[version - 1]])[0].data


@dataclass
class SeenStream:
    """One stream as the projection saw it: each event's version, position and payload
    fingerprint, in the order they came (which must be 1, 2, 3...)."""

    versions: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    prints: list[int] = field(default_factory=list)
    #: The highest version seen.
    top: int = 0

    def at(self, version: int) -> tuple[int, int] | None:
        """(position, fingerprint) of ``version`` as first seen; None if never seen."""
        i = version - 1  # where it is when nothing was skipped
        if not (0 <= i < len(self.versions) and self.versions[i] == version):
            i = next((j for j, v in enumerate(self.versions) if v == version), -1)
        return None if i < 0 else (self.positions[i], self.prints[i])


class ProjectionModel:
    """Every event the projection applied, thread-safe. :meth:`apply` flags at once what
    exactly-once delivery rules out (a position twice, a position below one already
    seen, a stream's versions out of 1, 2, 3... order); the checker compares the rest
    with the database at the end (``checker.projection_problems``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.streams: dict[tuple[str, str], SeenStream] = {}
        self.positions: set[int] = set()
        #: The highest position applied: where the next read starts.
        self.last = 0
        self.events = 0
        #: Every checkpoint the projection saved or tried to (a save whose answer was lost
        #: may have committed); the gate may only ever hold a compaction back at one.
        self.saved: set[int] = {0}

    def apply(self, event: RecordedEvent) -> list[str]:
        """Record ``event``; return what is wrong with receiving it now."""
        key = (event.stream_type, event.stream_id)
        what = f"{key[0]}/{key[1]} version {event.version} (position {event.position})"
        with self._lock:
            if event.position in self.positions:
                return [f"{what} was delivered a second time"]
            problems = []
            if event.position <= self.last:
                problems.append(
                    f"{what} came after position {self.last}: read_all went back "
                    "(an event appeared below what the projection had read)"
                )
            seen = self.streams.setdefault(key, SeenStream())
            expected = seen.top + 1
            if event.version > expected:
                problems.append(
                    f"{what} came while version {expected} was due "
                    f"(versions {expected}..{event.version - 1} skipped)"
                )
            elif event.version < expected:
                problems.append(f"{what} came again: it had seen up to version {expected - 1}")
            seen.versions.append(event.version)
            seen.positions.append(event.position)
            seen.prints.append(fingerprint(event.data))
            seen.top = max(seen.top, event.version)
            self.positions.add(event.position)
            self.last = max(self.last, event.position)
            self.events += 1
        return problems

    def note_saved(self, position: int) -> None:
        with self._lock:
            self.saved.add(position)

    def at(self, key: tuple[str, str], version: int) -> tuple[int, int] | None:
        """(position, fingerprint) at which the projection saw ``version`` of ``key``."""
        with self._lock:
            seen = self.streams.get(key)
            return None if seen is None else seen.at(version)

    def versions(self, key: tuple[str, str]) -> list[int]:
        with self._lock:
            seen = self.streams.get(key)
            return [] if seen is None else list(seen.versions)
