"""Consumers and the trash bin through the fleet: a real worker, PostgreSQL, Redis."""

from __future__ import annotations

from pathlib import Path

from eskit_tasks import LocalArchive, Outcome, compact_all
from tests.fleet.conftest import Fleet, stream_results


def _compacted_results(fleet: Fleet) -> list[dict]:
    return stream_results(fleet.broker)


def test_a_lagging_consumer_holds_streams_back_and_workers_archive(fleet: Fleet, tmp_path: Path):
    for n in range(20):  # one stream after the other: s-00..s-09 get the lower positions
        fleet.seed("ledger", f"s-{n:02d}", 10)
    tenth = [e.position for e in fleet.store.read("ledger", "s-09")][-1]
    fleet.store.save_checkpoint("projection", tenth)
    trash = tmp_path / "trash"
    fleet.worker("w1", ESKIT_ARCHIVE_URL=str(trash))

    run = compact_all(min_events=1, retain_last=1)
    final = run.wait(timeout=120)
    # The fan-out did not queue the ten streams the consumer holds back entirely.
    assert (final.candidates, final.outcomes) == (10, {"compacted": 10}), fleet.worker_logs()
    results = _compacted_results(fleet)
    assert sorted(r["stream_id"] for r in results) == [f"s-{n:02d}" for n in range(10)]
    assert all(r["archive_uri"].startswith("file://") for r in results)
    for n in range(10, 20):
        assert fleet.live_versions("ledger", f"s-{n:02d}") == list(range(1, 11))
    entries = list(LocalArchive(trash).entries())
    assert sorted(e.stream_id for e in entries) == [f"s-{n:02d}" for n in range(10)]
    rows = {r.compaction_id: r for r in fleet.store.compaction_log(limit=100)}
    assert {e.ref.sha256 for e in entries} == {r.archive_sha256 for r in rows.values()}

    fleet.store.save_checkpoint("projection", fleet.store.last_position())  # caught up
    again = compact_all(min_events=2, retain_last=1).wait(timeout=120)
    assert (again.candidates, again.outcomes) == (10, {"compacted": 10}), fleet.worker_logs()
    fleet.assert_nothing_lost()


def test_a_consumer_that_registers_during_a_compaction_is_not_outrun(fleet: Fleet):
    """Registered after the worker planned the cut (it is folding the stream): the delete
    transaction reads the checkpoints again and deletes nothing the consumer has not read."""
    fleet.seed("slow", "s-1", 200)
    fleet.worker("w1", ESKIT_TEST_SLOW_S="0.01")
    run = compact_all(min_events=1)
    fleet.wait_for_marker("s-1")
    fleet.store.save_checkpoint("late", 0)
    final = run.wait(timeout=120)
    assert final.outcomes == {Outcome.NOTHING_TO_COMPACT.value: 1}, fleet.worker_logs()
    [result] = _compacted_results(fleet)
    assert result["held_back_by"] == {"consumer": "late", "position": 0}
    assert result["events_deleted"] == 0
    assert fleet.live_versions("slow", "s-1") == list(range(1, 201))
    assert fleet.store.compaction_log() == []
