"""The fleet-wide rate cap with three real workers, PostgreSQL and redis-servers (issue
14), measured from the audit log's timestamps: the events deleted per second stay
within 10% of the cap once the bucket's one second of burst is spent. A behaviour
check with a generous bound, not a benchmark."""

from __future__ import annotations

from eskit_tasks import compact_all
from tests.fleet.conftest import Fleet

STREAMS, EVENTS, CAP = 60, 250, 2500.0


def test_three_workers_delete_at_the_runs_capped_rate(fleet: Fleet):
    for n in range(STREAMS):
        fleet.seed("ledger", f"r-{n:03d}", EVENTS, batch=EVENTS)
    for name in ("w1", "w2", "w3"):
        fleet.worker(name, concurrency=1, ESKIT_DECIDER_MODULES="tests.fleet_deciders")
    run = compact_all(min_events=1, max_events_per_second=CAP)
    final = run.wait(timeout=180)
    assert final.outcomes == {"compacted": STREAMS}, fleet.worker_logs()

    rows = sorted(
        fleet.store.compaction_log(run_id=run.run_id, limit=STREAMS), key=lambda r: r.compacted_at
    )
    deleted = sum(r.events_deleted for r in rows)
    assert deleted == STREAMS * EVENTS
    # The bucket starts full (one second's worth): measure after the burst is spent,
    # from the first compaction 1.5 s in to the last.
    start = rows[0].compacted_at.timestamp() + 1.5
    later = [r for r in rows if r.compacted_at.timestamp() >= start]
    span = later[-1].compacted_at.timestamp() - later[0].compacted_at.timestamp()
    assert span > 3, (span, len(later))
    rate = sum(r.events_deleted for r in later[1:]) / span
    assert 0.9 * CAP <= rate <= 1.1 * CAP, (rate, span, fleet.worker_logs()[-3000:])
    fleet.assert_nothing_lost()
