"""The maintenance window of scheduled runs (``ESKIT_WINDOW="01:00-05:00 UTC"``): outside
it a beat-started run's fan-out enqueues nothing and looks again when the next window
opens. Always given with its timezone, so a window means the same on every host."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from eskit_tasks.errors import ConfigurationError

_WINDOW = re.compile(r"\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s+(\S+)\s*")
FORMS = '"HH:MM-HH:MM TZ", e.g. "01:00-05:00 UTC" or "22:00-04:00 Europe/Berlin"'


@dataclass(frozen=True)
class Window:
    """Every day from ``start`` to ``end`` (crossing midnight when end < start) in ``tz``."""

    start: time
    end: time
    tz: ZoneInfo

    def contains(self, now: datetime) -> bool:
        local = now.astimezone(self.tz).time().replace(tzinfo=None)
        if self.start <= self.end:
            return self.start <= local < self.end
        return local >= self.start or local < self.end

    def opens_in(self, now: datetime) -> float:
        """Seconds until the window next opens (0 while it is open)."""
        if self.contains(now):
            return 0.0
        local = now.astimezone(self.tz)
        opening = local.replace(
            hour=self.start.hour, minute=self.start.minute, second=0, microsecond=0
        )
        if opening <= local:
            opening += timedelta(days=1)
        return max((opening - local).total_seconds(), 1.0)

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M} {self.tz.key}"


def parse_window(text: str | None) -> Window | None:
    """The window ``text`` describes; None for an empty or unset one.

    Raises:
        ConfigurationError: not of the form ``HH:MM-HH:MM TZ``, an impossible time, an
            empty window, or an unknown timezone.
    """
    if text is None or not text.strip():
        return None
    match = _WINDOW.fullmatch(text)
    if match is None:
        raise ConfigurationError(
            f"ESKIT_WINDOW {text!r} is not a window: give {FORMS} (the timezone is required)"
        )
    h1, m1, h2, m2, zone = match.groups()
    try:
        start, end = time(int(h1), int(m1)), time(int(h2), int(m2))
    except ValueError as exc:
        raise ConfigurationError(f"ESKIT_WINDOW {text!r}: {exc}; give {FORMS}") from None
    if start == end:
        raise ConfigurationError(f"ESKIT_WINDOW {text!r} is empty: start and end are equal")
    try:
        tz = ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigurationError(
            f"ESKIT_WINDOW {text!r}: unknown timezone {zone!r}; give an IANA name such as "
            "UTC or Europe/Berlin"
        ) from None
    return Window(start, end, tz)
