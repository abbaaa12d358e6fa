"""A fleet run end to end: compact_all -> fan_out -> compact_stream on two real workers."""

from __future__ import annotations

import random

from eskit_tasks import Outcome, compact_all
from eskit_tasks.tasks import fan_out
from tests.fleet.conftest import Fleet, results_in_backend


def test_fan_out_over_300_streams_on_two_workers_matches_the_database(fleet: Fleet):
    rng = random.Random(3)
    for n in range(320):
        fleet.seed("ledger", f"s-{n:03d}", rng.randint(6, 30))
    for n in range(15):  # below min_events: not candidates
        fleet.seed("ledger", f"small-{n}", 3)
    fleet.worker("w1")
    fleet.worker("w2")

    run = compact_all(min_events=5, retain_last=2)
    final = run.wait(timeout=240)

    assert final.candidates == 320
    assert final.done == 320
    assert final.outcomes == {"compacted": 320}, fleet.worker_logs()
    results = [
        meta
        for meta in results_in_backend(fleet.broker).values()
        if meta.get("name") == "eskit_tasks.compact_stream"
    ]
    assert len(results) == 320
    assert {meta["worker"].split("@")[0] for meta in results} == {"w1", "w2"}
    log = {row.compaction_id: row for row in fleet.store.compaction_log(limit=10_000)}
    assert len(log) == 320
    deleted_total = 0
    for meta in results:
        result = meta["result"]
        assert meta["status"] == "SUCCESS"
        assert result["outcome"] == Outcome.COMPACTED
        row = log[result["compaction_id"]]
        assert (row.stream_type, row.stream_id) == (result["stream_type"], result["stream_id"])
        assert row.events_deleted == result["events_deleted"]
        assert row.through_version == result["snapshot_version"] == result["head_version"] - 2
        head = fleet.store.head_version("ledger", result["stream_id"])
        assert fleet.live_versions("ledger", result["stream_id"]) == [head - 1, head]
        deleted_total += row.events_deleted
    assert final.events_deleted == deleted_total
    assert final.bytes_reclaimed == sum(r.bytes_reclaimed for r in log.values())
    for n in range(15):
        assert fleet.live_versions("ledger", f"small-{n}") == [1, 2, 3]
    fleet.assert_nothing_lost()

    summary = run.summary()
    assert summary.finished and summary.failed_streams == []
    # The first page, delivered again, finds the cursor moved and enqueues nothing.
    again = fan_out.apply_async(kwargs={"run_id": run.run_id, "cursor": 0, "min_events": 5})
    assert again.get(timeout=30)["duplicate_page"] == 0
    assert run.progress().candidates == 320
