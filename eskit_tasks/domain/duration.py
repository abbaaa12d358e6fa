"""Durations as operators write them: ``90``, ``30d``, ``1d12h``, ``2 weeks``, ``P30D``.

The one grammar for every age and retention the package reads from a flag, a setting
or a task message (``retain_younger_than``, ``purge-archive --keep``).
"""

from __future__ import annotations

import re
from datetime import timedelta

from pydantic import TypeAdapter, ValidationError

#: What :func:`parse_duration` accepts, for error messages.
DURATION_FORMS = (
    'seconds ("90", "1.5"), a number and a unit ("30d", "12h", "90m", "45s", "2w", '
    '"2 weeks", "3 days"), several of them ("1d12h", "1w 2d") or ISO 8601 ("P30D")'
)

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
# Every name of a unit, by its short form: "m", "min", "mins", "minute", "minutes".
_NAMES = {
    "s": ("s", "sec", "secs", "second", "seconds"),
    "m": ("m", "min", "mins", "minute", "minutes"),
    "h": ("h", "hr", "hrs", "hour", "hours"),
    "d": ("d", "day", "days"),
    "w": ("w", "wk", "wks", "week", "weeks"),
}
_UNIT_OF = {name: short for short, names in _NAMES.items() for name in names}
# Longest names first, so that "minutes" is not read as "m" followed by "inutes".
_UNIT = "|".join(sorted(_UNIT_OF, key=len, reverse=True))
_PART = re.compile(rf"(\d+(?:\.\d+)?)\s*({_UNIT})(?![a-z])")
_PARTS = re.compile(rf"(?:{_PART.pattern}[\s,]*)+")
_SECONDS = re.compile(r"\d+(?:\.\d+)?")
_ISO = TypeAdapter(timedelta)


def parse_duration(text: str) -> timedelta:
    """Read a duration: plain seconds, number-and-unit parts (summed), or ISO 8601.

    Units are s, m, h, d, w or their words (``sec``, ``minutes``, ``hour``, ``days``,
    ``week``...), singular or plural, with or without a space before them.

    Raises:
        ValueError: anything else, or too long; the message lists the accepted forms.
    """
    given = text.strip()
    if _SECONDS.fullmatch(given):
        seconds = float(given)
    elif _PARTS.fullmatch(given):
        seconds = sum(float(m[1]) * _UNITS[_UNIT_OF[m[2]]] for m in _PART.finditer(given))
    elif given.startswith("P"):
        try:
            return _ISO.validate_python(given)
        except ValidationError:
            raise ValueError(f"cannot read {text!r} as a duration: use {DURATION_FORMS}") from None
    else:
        raise ValueError(f"cannot read {text!r} as a duration: use {DURATION_FORMS}")
    try:
        return timedelta(seconds=seconds)
    except OverflowError:
        raise ValueError(f"duration {text!r} is too long") from None
