"""The fleet-wide throttle (issue 14): a token bucket of events deleted per second that a
compaction may put in debt, and leased slots of compactions at once, each global and per
run, set live. Fast tier on fakeredis; tests/fleet/test_throttle_fleet.py measures the
rate of three real workers from the audit log."""

from __future__ import annotations

import time

import fakeredis
import pytest

from eskit_tasks.errors import InvalidPolicyError
from eskit_tasks.fleet.throttle import (
    SLOT_POLL_S,
    Throttle,
    caps_of,
    global_scope,
    run_scope,
    set_caps,
)


@pytest.fixture
def client() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


def test_no_cap_admits_at_once_and_takes_no_slot(client):
    t = Throttle(client, [global_scope(0, 0)], lease=5)
    assert t.try_admit() == 0.0
    t.charge(1_000_000)
    assert Throttle(client, [global_scope(0, 0)], lease=5).try_admit() == 0.0
    t.release()


def test_the_bucket_goes_into_debt_and_the_next_compaction_waits_it_out(client):
    scope = global_scope(100, 0)  # 100 events a second, one second of burst
    first = Throttle(client, [scope], lease=5)
    assert first.try_admit() == 0.0
    first.charge(300)  # a big stream: 100 in the bucket, 200 of debt
    first.release()
    wait = Throttle(client, [scope], lease=5).try_admit()
    assert 1.9 < wait <= 2.0
    time.sleep(0.5)
    assert 1.4 < Throttle(client, [scope], lease=5).try_admit() <= 1.5


def test_slots_cap_compactions_at_once_and_free_on_release(client):
    scope = global_scope(0, 2)
    a, b, c = (Throttle(client, [scope], lease=5) for _ in range(3))
    assert a.try_admit() == 0.0 and b.try_admit() == 0.0
    assert c.try_admit() == SLOT_POLL_S
    assert caps_of(client, scope)["running"] == 2
    a.release()
    assert c.try_admit() == 0.0
    b.release()
    c.release()
    assert caps_of(client, scope)["running"] == 0


def test_a_dead_workers_slot_frees_itself_after_its_lease(client):
    scope = global_scope(0, 1)
    dead = Throttle(client, [scope], lease=0.6)
    assert dead.try_admit() == 0.0
    dead._stop.set()  # its process died: no more renewals, no release
    waiting = Throttle(client, [scope], lease=0.6)
    assert waiting.try_admit() == SLOT_POLL_S
    assert waiting.admit(budget=2.0) is True
    waiting.release()


def test_a_live_compaction_keeps_its_slot_past_the_lease(client):
    scope = global_scope(0, 1)
    live = Throttle(client, [scope], lease=0.6)
    assert live.try_admit() == 0.0
    time.sleep(1.0)  # renewed every 0.2 s
    assert Throttle(client, [scope], lease=0.6).try_admit() == SLOT_POLL_S
    live.release()


def test_caps_set_live_override_the_environment_and_runs_have_their_own(client):
    scope = global_scope(0, 0)
    set_caps(client, scope, max_concurrent=1)
    assert caps_of(client, scope)["max_concurrent"] == 1
    holder = Throttle(client, [scope], lease=5)
    assert holder.try_admit() == 0.0
    assert Throttle(client, [scope], lease=5).try_admit() == SLOT_POLL_S
    set_caps(client, scope, max_concurrent=0)  # removed live
    assert Throttle(client, [scope], lease=5).try_admit() == 0.0
    holder.release()
    run = run_scope("a" * 32)
    set_caps(client, run, events_per_second=10)
    both = Throttle(client, [scope, run], lease=5)
    assert both.try_admit() == 0.0
    both.charge(30)
    both.release()
    assert Throttle(client, [scope], lease=5).try_admit() == 0.0  # the fleet is not in debt
    assert Throttle(client, [scope, run], lease=5).try_admit() > 1.5  # the run is


def test_a_gate_that_refuses_gives_back_the_slots_of_the_gates_before_it(client):
    fleet_scope, run = global_scope(0, 5), run_scope("b" * 32)
    set_caps(client, run, max_concurrent=1)
    first = Throttle(client, [fleet_scope, run], lease=5)
    assert first.try_admit() == 0.0
    second = Throttle(client, [fleet_scope, run], lease=5)
    assert second.try_admit() == SLOT_POLL_S
    assert caps_of(client, fleet_scope)["running"] == 1  # not held by the refused one
    first.release()


def test_compact_all_refuses_negative_caps():
    from eskit_tasks.fleet.runs import compact_all

    with pytest.raises(InvalidPolicyError, match="max_events_per_second"):
        compact_all(max_events_per_second=-1, app=object())  # type: ignore[arg-type]
