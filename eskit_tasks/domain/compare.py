"""The strict comparison: are two states *indistinguishable*, not merely ``==``?

Compaction deletes events on the strength of a snapshot, so "the snapshot rebuilds the
state" must mean more than ``==``. Python's equality forgives differences that change
what a decider does next: ``"open" == Status.OPEN``, ``1 == True == 1.0``,
``{"a": 1, "b": 2} == {"b": 2, "a": 1}`` (an insertion-ordered dict used as a queue
evicts a different entry), a datetime in ``Europe/Berlin`` equals the same instant at a
fixed ``+01:00`` (120 days later the two are an hour apart), ``Decimal("1.0") ==
Decimal("1.00")``. :func:`first_difference` refuses all of these:

* the same type at every node (``type(a) is type(b)``: enum vs str, bool vs int,
  tuple vs list, set vs list, a model class vs another);
* dicts: the same keys *in the same order*, each key of the same type;
* floats: the same value and sign (``-0.0`` is not ``0.0``); NaN equals NaN;
* ``Decimal``: the same sign, digits and exponent;
* datetimes and times: the same wall-clock fields, ``fold`` and time zone. A
  ``ZoneInfo`` is identified by its key; fixed-offset zones (``datetime.timezone``,
  pydantic's ``TzInfo``) by their offset, so ``UTC`` survives a round trip;
* pydantic models: the same class, the same fields in order, extra fields and
  private attributes; dataclasses and plain objects: the same attributes;
* sets: the same members, each of the same type;
* anything else: the same type and ``==``.

One function serves every check of a state: the round trip of the snapshot, its read
back, the tail replay and the soak's checker.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, tzinfo
from decimal import Decimal
from enum import Enum
from typing import Any
from zoneinfo import ZoneInfo

from pydantic import BaseModel

#: Longest repr of a value shown in a difference.
SHOWN_WIDTH = 80


@dataclass(frozen=True, slots=True)
class Difference:
    """Where and how two states differ.

    Args:
        path: Where inside the state, e.g. ``$.items['x'][2]`` (``$`` is the state).
        reason: What differs, e.g. ``"type"``, ``"key order"``, ``"time zone"``.
        expected: The value in the state that was replayed.
        actual: The value in the state that was rebuilt.
    """

    path: str
    reason: str
    expected: Any
    actual: Any

    def __str__(self) -> str:
        return (
            f"at {self.path} ({self.reason}): expected {_shown(self.expected)}, "
            f"got {_shown(self.actual)}"
        )


def indistinguishable(expected: Any, actual: Any) -> bool:
    """True when ``actual`` cannot be told apart from ``expected``; see the module doc."""
    return first_difference(expected, actual) is None


def first_difference(expected: Any, actual: Any, path: str = "$") -> Difference | None:
    """The first place where ``actual`` can be told apart from ``expected``, or None.

    A state nested too deeply for Python's recursion limit is reported as a difference
    (it cannot be proved the same).
    """
    try:
        return _compare(expected, actual, path)
    except RecursionError:
        return Difference(path, "nested too deeply to compare", expected, actual)


def _compare(a: Any, b: Any, path: str) -> Difference | None:
    if a is b:
        return None
    kind = type(a)
    if kind is not type(b):
        return Difference(path, "type", _typed(a), _typed(b))
    compare = _BY_TYPE.get(kind)
    if compare is not None:
        found: Difference | None = compare(a, b, path)
        return found
    if isinstance(a, Enum):
        return None if a is b else Difference(path, "enum member", a, b)
    if isinstance(a, BaseModel):
        return _model(a, b, path)
    if isinstance(a, dict):
        return _dict(a, b, path)
    if isinstance(a, list | tuple):
        return _sequence(a, b, path)
    if isinstance(a, set | frozenset):
        return _set(a, b, path)
    if isinstance(a, datetime | time):
        return _clock(a, b, path)
    if isinstance(a, float):
        return _float(a, b, path)
    if dataclasses.is_dataclass(a):
        return _dataclass(a, b, path)
    if _has_plain_identity(a) and hasattr(a, "__dict__"):
        return _attributes(vars(a), vars(b), path)
    return None if a == b else Difference(path, "value", a, b)


def _equal(a: Any, b: Any, path: str) -> Difference | None:
    return None if a == b else Difference(path, "value", a, b)


def _float(a: float, b: float, path: str) -> Difference | None:
    if math.isnan(a) and math.isnan(b):
        return None
    if a == b and math.copysign(1.0, a) == math.copysign(1.0, b):
        return None
    return Difference(path, "value", a, b)


def _decimal(a: Decimal, b: Decimal, path: str) -> Difference | None:
    if a.as_tuple() == b.as_tuple():
        return None
    return Difference(path, "decimal digits or exponent", a, b)


def _clock(a: datetime | time, b: datetime | time, path: str) -> Difference | None:
    if a.fold != b.fold or a.replace(tzinfo=None) != b.replace(tzinfo=None):
        return Difference(path, "value", a, b)
    if not _same_zone(a.tzinfo, b.tzinfo):
        return Difference(path, "time zone", _zone(a.tzinfo), _zone(b.tzinfo))
    return None


def _same_zone(a: tzinfo | None, b: tzinfo | None) -> bool:
    if a is b:
        return True
    if a is None or b is None:
        return False
    if isinstance(a, ZoneInfo) or isinstance(b, ZoneInfo):
        return type(a) is type(b) and str(a) == str(b)
    if _fixed(a) and _fixed(b):
        return a.utcoffset(None) == b.utcoffset(None)
    return type(a) is type(b) and a == b


def _fixed(zone: tzinfo) -> bool:
    """A zone with one offset whatever the date (``utcoffset(None)`` answers)."""
    try:
        return isinstance(zone.utcoffset(None), timedelta)
    except Exception:  # a zone that needs a datetime to answer is not a fixed one
        return False


def _zone(zone: tzinfo | None) -> _Shown:
    if zone is None:
        return _Shown("no time zone (naive)")
    if isinstance(zone, ZoneInfo):
        return _Shown(f"ZoneInfo({str(zone)!r})")
    if _fixed(zone):
        return _Shown(f"a fixed offset of {zone.utcoffset(None)}")
    return _Shown(repr(zone))


def _dict(a: dict[Any, Any], b: dict[Any, Any], path: str) -> Difference | None:
    if len(a) != len(b):
        missing = [k for k in a if k not in b]
        extra = [k for k in b if k not in a]
        if missing:
            return Difference(f"{path}[{missing[0]!r}]", "missing key", a[missing[0]], ABSENT)
        if extra:
            return Difference(f"{path}[{extra[0]!r}]", "unexpected key", ABSENT, b[extra[0]])
    for (ka, va), (kb, vb) in zip(a.items(), b.items(), strict=False):
        if type(ka) is not type(kb) or ka != kb:
            # 1 and True are one dict key to Python: the order is at fault only when the
            # very key (same type) is elsewhere in the other dict.
            reason = "key order" if any(type(k) is type(ka) and k == ka for k in b) else "key"
            return Difference(f"{path} keys", reason, list(a)[:8], list(b)[:8])
        # Equal keys can still be told apart (a ZoneInfo datetime and the same instant
        # at a fixed offset; (1,) and (True,)): the key itself must be indistinguishable.
        found = _compare(ka, kb, f"{path} key {ka!r}")
        if found is None:
            found = _compare(va, vb, f"{path}[{ka!r}]")
        if found is not None:
            return found
    return None


def _sequence(
    a: list[Any] | tuple[Any, ...], b: list[Any] | tuple[Any, ...], path: str
) -> Difference | None:
    for i, (va, vb) in enumerate(zip(a, b, strict=False)):
        found = _compare(va, vb, f"{path}[{i}]")
        if found is not None:
            return found
    if len(a) != len(b):
        return Difference(f"{path}", "length", len(a), len(b))
    return None


def _set(
    a: set[Any] | frozenset[Any], b: set[Any] | frozenset[Any], path: str
) -> Difference | None:
    # 1, 1.0 and True are one set member to Python; pairing each member with its type
    # tells them apart.
    typed_b = {(type(x), x): x for x in b}
    for x in a:
        twin = typed_b.get((type(x), x), ABSENT)
        if twin is ABSENT:
            return Difference(f"{path} member", "missing member", _typed(x), ABSENT)
        # Equal members can still be told apart (time zones, Decimal exponents).
        found = _compare(x, twin, f"{path} member {x!r}")
        if found is not None:
            return found
    if len(a) != len(b):
        return Difference(path, "members", a, b)
    return None


def _model(a: BaseModel, b: BaseModel, path: str) -> Difference | None:
    found = _attributes(a.__dict__, b.__dict__, path, ordered=True)
    if found is None:
        found = _compare(a.__pydantic_extra__, b.__pydantic_extra__, f"{path} (extra fields)")
    if found is None:
        found = _compare(
            a.__pydantic_private__, b.__pydantic_private__, f"{path} (private attributes)"
        )
    return found


def _dataclass(a: Any, b: Any, path: str) -> Difference | None:
    if hasattr(a, "__dict__"):
        return _attributes(vars(a), vars(b), path)
    for f in dataclasses.fields(a):
        found = _compare(getattr(a, f.name), getattr(b, f.name), f"{path}.{f.name}")
        if found is not None:
            return found
    return None


def _attributes(
    a: dict[str, Any], b: dict[str, Any], path: str, *, ordered: bool = False
) -> Difference | None:
    if list(a) != list(b) and (ordered or set(a) != set(b)):
        return Difference(f"{path} fields", "field names", list(a), list(b))
    for name, value in a.items():
        found = _compare(value, b[name], f"{path}.{name}")
        if found is not None:
            return found
    return None


def _has_plain_identity(value: Any) -> bool:
    """An object whose class keeps ``object``'s ``==`` (identity): compare attributes."""
    equality: Any = type(value).__eq__
    return equality is object.__eq__


_BY_TYPE: dict[type, Any] = {
    str: _equal,
    int: _equal,
    bool: _equal,
    bytes: _equal,
    type(None): _equal,
    float: _float,
    Decimal: _decimal,
    datetime: _clock,
    time: _clock,
    date: _equal,
    timedelta: _equal,
    dict: _dict,
    list: _sequence,
    tuple: _sequence,
}


class _Shown:
    """Text shown as it is in a difference (no quotes)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


#: Shown for the side of a difference that lacks a key or member.
ABSENT = _Shown("(absent)")


class _Typed:
    """A value shown with its type, for differences of type."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"{_shown(self.value)} ({type(self.value).__qualname__})"


def _typed(value: Any) -> _Typed:
    return _Typed(value)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= SHOWN_WIDTH else text[: SHOWN_WIDTH - 3] + "..."
