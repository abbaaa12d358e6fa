"""Quarantine with real workers, PostgreSQL and redis-servers (issue 14): a stream whose
decider fails three runs in a row is quarantined in the database, the next run skips
it, and once the fixed decider is deployed and the backoff is over, a run compacts it
and releases it."""

from __future__ import annotations

import time

from eskit_tasks import compact_all
from eskit_tasks.stores.sql_quarantine import SqlQuarantine
from tests.fleet.conftest import Fleet

MODULES = "tests.fleet_deciders"


def test_a_failing_stream_is_quarantined_skipped_and_healed_by_a_fixed_decider(fleet: Fleet):
    fleet.seed("brittle", "b-1", 20)
    fleet.seed("ledger", "ok", 20)
    env = {"ESKIT_DECIDER_MODULES": MODULES, "ESKIT_QUARANTINE_BACKOFF": "3"}
    broken = fleet.worker("w1", ESKIT_TEST_BROKEN="1", **env)
    quarantine = SqlQuarantine(fleet.store.engine)

    for _ in range(3):
        final = compact_all(min_events=1, retain_last=1).wait(timeout=60)
        assert final.outcomes.get("failed") == 1, fleet.worker_logs()
        fleet.seed("ledger", "ok", 2)  # the healthy stream has work in every run
    [entry] = quarantine.entries()
    assert (entry.stream_type, entry.stream_id, entry.failures) == ("brittle", "b-1", 3)
    assert "a bug in this deployment's decider" in (entry.last_error or "")

    skipped = compact_all(min_events=1, retain_last=1).wait(timeout=60)
    assert skipped.outcomes == {"compacted": 1}, fleet.worker_logs()  # "ok" alone

    broken.stop()  # the fixed decider is deployed
    fleet.worker("w2", ESKIT_TEST_BROKEN="0", **env)
    wait = (entry.retry_after.timestamp() - time.time()) if entry.retry_after else 0
    time.sleep(max(wait, 0) + 0.2)
    healed = compact_all(min_events=1, retain_last=1).wait(timeout=60)
    assert healed.outcomes == {"compacted": 1}, fleet.worker_logs()
    assert quarantine.entries(quarantined_only=False) == []
    assert [e.version for e in fleet.store.read("brittle", "b-1")] == [20]
