"""The strict comparison (fast tier): what ``==`` forgives and compaction must not."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from datetime import UTC, datetime, time, timedelta, timezone, tzinfo
from decimal import Decimal
from enum import Enum, StrEnum
from typing import NamedTuple
from zoneinfo import ZoneInfo

import pytest
from pydantic import BaseModel, ConfigDict, PrivateAttr, TypeAdapter

from eskit_tasks.domain.compare import first_difference, indistinguishable


class Status(StrEnum):
    OPEN = "open"
    CLOSED = "closed"


class Colour(Enum):
    RED = 1
    CRIMSON = 1  # an alias: the same member


class Pair(NamedTuple):
    a: int
    b: int


@dataclasses.dataclass
class Box:
    items: list[int]


@dataclasses.dataclass(slots=True)
class Slotted:
    n: int


class Plain:
    """A plain object: ``==`` is identity, so its attributes are compared."""

    def __init__(self, **attributes: object) -> None:
        self.__dict__.update(attributes)


def with_extra_attribute(box: Box) -> Box:
    box.note = "set after construction"  # type: ignore[attr-defined]
    return box


class Account(BaseModel):
    balance: int = 0
    opened: datetime | None = None


class Cached(BaseModel):
    n: int = 0
    _seen: int = PrivateAttr(default=0)


class Loose(BaseModel):
    model_config = ConfigDict(extra="allow")
    n: int = 0


BERLIN = datetime(2026, 1, 10, 9, 0, tzinfo=ZoneInfo("Europe/Berlin"))
BERLIN_SECOND_0230 = datetime(2026, 10, 25, 2, 30, fold=1, tzinfo=ZoneInfo("Europe/Berlin"))


@pytest.mark.parametrize(
    ("expected", "actual", "path", "reason"),
    [
        ({"s": Status.OPEN}, {"s": "open"}, "$['s']", "type"),
        ({"n": 1}, {"n": True}, "$['n']", "type"),
        ({"n": 1}, {"n": 1.0}, "$['n']", "type"),
        ([1, 2], (1, 2), "$", "type"),
        ({"t": {1}}, {"t": [1]}, "$['t']", "type"),
        ({"a": 1, "b": 2}, {"b": 2, "a": 1}, "$ keys", "key order"),
        ({1: "x"}, {"1": "x"}, "$ keys", "key"),
        ({"a": 1}, {"a": 1, "b": 2}, "$['b']", "unexpected key"),
        ({"a": 1, "b": 2}, {"a": 1}, "$['b']", "missing key"),
        (
            {"d": BERLIN},
            {"d": BERLIN.astimezone(timezone(timedelta(hours=1)))},
            "$['d']",
            "time zone",
        ),
        (BERLIN, BERLIN.replace(tzinfo=None), "$", "time zone"),
        (Decimal("1.0"), Decimal("1.00"), "$", "decimal digits or exponent"),
        (0.0, -0.0, "$", "value"),
        ({"x": [1, {"y": 2}]}, {"x": [1, {"y": 3}]}, "$['x'][1]['y']", "value"),
        ([1, 2], [1, 2, 3], "$", "length"),
        ({1, 2}, {True, 2}, "$ member", "missing member"),
        (Pair(1, 2), (1, 2), "$", "type"),
        (Box([1]), Box([2]), "$.items[0]", "value"),
        (Account(balance=1), Account(balance=2), "$.balance", "value"),
        (OrderedDict(a=1), {"a": 1}, "$", "type"),
        (time(9, tzinfo=ZoneInfo("Europe/Berlin")), time(9, tzinfo=UTC), "$", "time zone"),
        ({"s": Status.OPEN}, {"s": Status.CLOSED}, "$['s']", "enum member"),
        (BERLIN, BERLIN + timedelta(hours=1), "$", "value"),
        # 02:30 happens twice on the night clocks go back: fold tells which one.
        (BERLIN.replace(month=10, day=25, hour=2, minute=30), BERLIN_SECOND_0230, "$", "value"),
        # A fixed +01:00 that merely calls itself Europe/Berlin has no summer time.
        (
            BERLIN,
            BERLIN.replace(tzinfo=timezone(timedelta(hours=1), "Europe/Berlin")),
            "$",
            "time zone",
        ),
        (float("nan"), 1.0, "$", "value"),
        (1.0, float("nan"), "$", "value"),
        ({1}, {1, 2}, "$", "members"),
        (Slotted(1), Slotted(2), "$.n", "value"),
        (Plain(a=1), Plain(a=2), "$.a", "value"),
        (Plain(a=1), Plain(a=1, b=2), "$ fields", "field names"),
        (Box([1]), with_extra_attribute(Box([1])), "$ fields", "field names"),
    ],
)
def test_equal_but_distinguishable_states_differ(expected, actual, path, reason):
    found = first_difference(expected, actual)
    assert found is not None, (expected, actual)
    assert (found.path, found.reason) == (path, reason), str(found)


@pytest.mark.parametrize(
    "state",
    [
        {"b": 1, "a": [1, (2, 3)], "c": {"d": None}},
        {Status.OPEN: {1, 2}, "x": frozenset({"a"})},
        float("nan"),
        Decimal("1.50"),
        BERLIN,
        Account(balance=3, opened=BERLIN),
        Box([1, 2]),
        Pair(1, 2),
        Colour.CRIMSON,
    ],
)
def test_a_state_is_indistinguishable_from_itself_and_its_copy(state):
    import copy

    assert indistinguishable(state, state)
    assert indistinguishable(state, copy.deepcopy(state))


def test_fixed_offsets_compare_by_offset_so_utc_survives_pydantic():
    now = datetime.now(UTC)
    decoded = TypeAdapter(datetime).validate_json(TypeAdapter(datetime).dump_json(now))
    assert type(decoded.tzinfo) is not type(now.tzinfo)  # pydantic's own TzInfo
    assert indistinguishable(now, decoded)
    plus_one = datetime(2026, 1, 1, tzinfo=timezone(timedelta(hours=1)))
    assert first_difference(plus_one, datetime(2026, 1, 1, tzinfo=UTC)) is not None


def test_model_private_attributes_and_extras_count():
    a, b = Cached(n=1), Cached(n=1)
    b._seen = 5
    found = first_difference(a, b)
    assert found is not None and "private" in found.path
    found = first_difference(Loose(n=1, x=1), Loose(n=1, x=2))
    assert found is not None
    assert (found.path, found.reason) == ("$ (extra fields)['x']", "value")


def test_model_fields_count_in_order():
    a, b = Account(balance=1), Account(balance=1)
    object.__setattr__(b, "__dict__", {"opened": None, "balance": 1})  # same fields, reordered
    assert a == b
    found = first_difference(a, b)
    assert found is not None and (found.path, found.reason) == ("$ fields", "field names")


def test_equal_dict_keys_and_set_members_must_be_indistinguishable_too():
    fixed = BERLIN.astimezone(timezone(timedelta(hours=1)))
    found = first_difference({BERLIN: "x"}, {fixed: "x"})
    assert found is not None and found.reason == "time zone" and " key " in found.path
    found = first_difference({BERLIN}, {fixed})
    assert found is not None and found.reason == "time zone" and " member " in found.path
    found = first_difference({(1,): "x"}, {(True,): "x"})
    assert found is not None and found.reason == "type"
    found = first_difference({Decimal("1.0")}, {Decimal("1.00")})
    assert found is not None and found.reason == "decimal digits or exponent"


def test_dict_keys_of_another_type_differ():
    found = first_difference({1: "x"}, {True: "x"})  # 1 == True, one hash
    assert found is not None and (found.path, found.reason) == ("$ keys", "key")


class _Shifting(tzinfo):
    """A zone whose offset depends on the date (it needs a datetime to answer)."""

    def utcoffset(self, dt: datetime | None) -> timedelta:
        if dt is None:
            raise TypeError("needs a datetime")
        return timedelta(hours=1 if dt.month < 6 else 2)

    def dst(self, dt: datetime | None) -> timedelta:
        return timedelta(0)


class _OtherShifting(_Shifting):
    """The same offsets today, but another zone."""


def test_zones_that_are_neither_zoneinfo_nor_fixed_compare_by_type_and_equality():
    day = datetime(2026, 1, 10, 9, 0)
    zone = _Shifting()
    assert indistinguishable(day.replace(tzinfo=zone), day.replace(tzinfo=zone))
    found = first_difference(day.replace(tzinfo=zone), day.replace(tzinfo=_OtherShifting()))
    assert found is not None and found.reason == "time zone"


def test_difference_names_path_and_both_values_with_types():
    text = str(first_difference({"items": {"x": Status.OPEN}}, {"items": {"x": "open"}}))
    assert text.startswith("at $['items']['x'] (type):")
    assert "(Status)" in text and "'open' (str)" in text


def test_too_deep_to_compare_is_a_difference_not_a_crash():
    def nested(depth: int) -> list:
        value: list = []
        for _ in range(depth):
            value = [value]
        return value

    found = first_difference(nested(5000), nested(5000))
    assert found is not None and found.reason == "nested too deeply to compare"
