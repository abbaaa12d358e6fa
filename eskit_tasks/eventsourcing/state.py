"""What a pyeventsourcing snapshot keeps of an aggregate, and what the comparison of a
snapshot with its replay looks at: :func:`state_of` and :func:`unkept`."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import date, datetime, timedelta
from datetime import time as dt_time
from decimal import Decimal
from enum import Enum
from typing import Any


def unkept(aggregate: Any) -> str | None:
    """What a snapshot (``vars()`` through the transcoder) cannot keep of ``aggregate``:
    attributes in ``__slots__`` (outside ``vars()``), or one mutable object reachable
    under two names (a snapshot decodes two copies, and a later event changes one)."""
    for cls in type(aggregate).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        for slot in (slots,) if isinstance(slots, str) else slots:
            if slot not in ("__dict__", "__weakref__") and hasattr(aggregate, slot):
                return (
                    f"{cls.__name__}.{slot} is a slot, which a snapshot does not keep "
                    "(snapshots keep vars())"
                )
    seen: dict[int, str] = {}
    for name, value in vars(aggregate).items():
        if name != "_pending_events":
            shared = _shared(value, seen, name)
            if shared is not None:
                return shared
    return None


def _shared(value: Any, seen: dict[int, str], path: str) -> str | None:
    """The first mutable object reachable twice from ``value`` (``seen``: the paths of
    the ones met so far), said as two paths."""
    if value is None or isinstance(value, (*_ATOMS, type, Enum)):
        return None
    mutable = isinstance(value, list | dict | set | bytearray) or hasattr(value, "__dict__")
    if mutable:
        if id(value) in seen:
            return f"{seen[id(value)]} and {path} are one and the same object"
        seen[id(value)] = path
    if isinstance(value, dict):
        children: Iterable[tuple[str, Any]] = ((f"{path}[{k!r}]", v) for k, v in value.items())
    elif isinstance(value, list | tuple | set | frozenset):
        children = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    elif hasattr(value, "__dict__"):
        children = ((f"{path}.{k}", v) for k, v in vars(value).items())
    else:
        return None
    for where, child in children:
        found = _shared(child, seen, where)
        if found is not None:
            return found
    return None


#: Values that hold no mutable object (what ``_shared`` need not look into).
_ATOMS = (
    str,
    bytes,
    int,
    float,
    complex,
    bool,
    Decimal,
    datetime,
    date,
    dt_time,
    timedelta,
    uuid.UUID,
)


def state_of(aggregate: Any) -> tuple[type, dict[str, Any]]:
    """What makes an aggregate what it is: its class and its attributes (but the events it
    has not saved yet, which a replay never has), by name: the order an object's
    attributes were set in is not state (a snapshot sets the library's own last), while
    the values inside are compared strictly, dict order included."""
    attributes = vars(aggregate)
    return type(aggregate), {k: attributes[k] for k in sorted(attributes) if k != "_pending_events"}
