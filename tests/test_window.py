"""The maintenance window of scheduled runs (issue 14): ESKIT_WINDOW="HH:MM-HH:MM TZ";
outside it a beat run's fan-out enqueues nothing and waits for the next window; runs
started by hand ignore it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from eskit_tasks.domain.window import parse_window
from eskit_tasks.errors import ConfigurationError
from eskit_tasks.fleet.constants import FAN_OUT_TASK
from eskit_tasks.fleet.resources import resources_of
from eskit_tasks.fleet.runs import CompactionRun, compact_all
from eskit_tasks.fleet.settings import EskitSettings
from tests.test_fleet_in_process import InProcessFleet, _running, fleet  # noqa: F401


def at(hour: int, minute: int = 0) -> datetime:
    return datetime(2026, 12, 3, hour, minute, tzinfo=UTC)


def test_a_window_within_a_day_and_one_across_midnight():
    night = parse_window("01:00-05:00 UTC")
    assert night is not None
    assert [night.contains(at(h)) for h in (0, 1, 4, 5, 12)] == [False, True, True, False, False]
    assert night.opens_in(at(0, 30)) == 1800 and night.opens_in(at(2)) == 0
    assert night.opens_in(at(6)) == 19 * 3600
    late = parse_window("22:00-04:00 UTC")
    assert late is not None
    assert [late.contains(at(h)) for h in (21, 22, 23, 3, 4)] == [False, True, True, True, False]


def test_a_window_is_in_its_own_timezone():
    berlin = parse_window("01:00-05:00 Europe/Berlin")  # UTC+1 in December
    assert berlin is not None
    assert berlin.contains(at(0, 30)) and not berlin.contains(at(4, 30))
    assert str(berlin) == "01:00-05:00 Europe/Berlin"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("01:00-05:00", "timezone is required"),
        ("1-5 UTC", "HH:MM-HH:MM TZ"),
        ("25:00-05:00 UTC", "hour must be in"),
        ("03:00-03:00 UTC", "empty"),
        ("01:00-05:00 Mars/Olympus", "unknown timezone"),
    ],
)
def test_a_bad_window_says_what_is_wrong_and_the_accepted_form(text: str, says: str):
    with pytest.raises(ConfigurationError, match=says):
        parse_window(text)
    with pytest.raises(ValueError, match="ESKIT_WINDOW"):
        EskitSettings(window=text)


def test_none_or_empty_is_any_time():
    assert parse_window("") is None and parse_window(None) is None


def test_a_scheduled_run_outside_its_window_enqueues_nothing_but_a_manual_run_goes(
    fleet: InProcessFleet,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
):
    res = resources_of(fleet.app)
    now = datetime.now(UTC)
    closed = f"{(now.hour + 2) % 24:02d}:00-{(now.hour + 3) % 24:02d}:00 UTC"
    monkeypatch.setattr(res, "settings", res.settings.model_copy(update={"window": closed}))
    fleet.seed("s-0", 8)
    sent: list[dict[str, Any]] = []
    task = fleet.app.tasks[FAN_OUT_TASK]
    monkeypatch.setattr(task, "apply_async", lambda *a, **k: sent.append(k))
    answer = task.apply(kwargs={"min_events": 5}).get()  # as beat sends it: no run id
    assert answer["waiting_for_window"] == closed and answer["seconds"] > 3000
    assert sent and 0 < sent[0]["countdown"] <= 600  # looks again, within the poll cap
    run = CompactionRun(answer["run_id"], app=fleet.app)
    assert (run.progress().candidates, fleet.live("s-0")) == (0, list(range(1, 9)))
    monkeypatch.undo()
    monkeypatch.setattr(res, "settings", res.settings.model_copy(update={"window": closed}))
    manual = compact_all(min_events=5, app=fleet.app).wait(timeout=60, poll=0.05)
    assert manual.outcomes == {"compacted": 1}  # started by hand: the window does not apply
