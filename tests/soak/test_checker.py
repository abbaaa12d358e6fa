"""The soak's checker has teeth: each invariant it checks catches a database or a result
that breaks it (a soak whose checker never fires proves nothing)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from eskit_tasks import CompactionPolicy, Compactor, Outcome, SqlEventStore, SqlSnapshotStore
from tests.deciders import Ledger
from tests.soak.checker import (
    AuditRow,
    LiveEvents,
    audit_problems,
    check_db,
    check_results,
    live_events_problems,
    read_db_state,
)
from tests.soak.config import admin_url_from_env
from tests.soak.environment import create_database, drop_database, libpq_url
from tests.soak.model import Model, Observation, StreamModel, Violations, ledger_state
from tests.soak.workload import deposit_events


def audit(cid: str, first: int, through: int, deleted: int | None = None) -> AuditRow:
    n = through - first + 1 if deleted is None else deleted
    return AuditRow(cid, 1, "ledger", "a", first, through, through, through + 5, n)


def test_audit_rows_must_tile_the_deleted_range_without_overlap():
    assert audit_problems([audit("c1", 1, 10), audit("c2", 11, 15)], 15) == []
    assert audit_problems([], 0) == []

    overlap = audit_problems([audit("c1", 1, 10), audit("c2", 8, 15)], 15)
    assert any("c2 (8..15) overlaps" in p for p in overlap), overlap
    gap = audit_problems([audit("c1", 1, 10), audit("c2", 12, 15)], 15)
    assert any("leaves a gap" in p for p in gap), gap
    assert any("says 3 events" in p for p in audit_problems([audit("c1", 1, 10, 3)], 10))
    assert any("cover 1..10" in p for p in audit_problems([audit("c1", 1, 10)], 12))
    assert any("cover 1..0" in p for p in audit_problems([], 4))


def test_live_events_must_be_exactly_the_tail_after_the_compaction_point():
    assert live_events_problems(10, 4, LiveEvents(5, 10, 6)) == []
    assert live_events_problems(10, 10, None) == []
    assert live_events_problems(10, 4, None) == ["events 5..10 are missing"]
    assert live_events_problems(10, 4, LiveEvents(5, 10, 5))  # a hole in the middle
    assert live_events_problems(10, 4, LiveEvents(3, 10, 8))  # deleted without the point
    assert live_events_problems(10, 4, LiveEvents(5, 9, 5))  # the head event is gone


def stream_with(*amounts: int) -> StreamModel:
    stream = StreamModel("ledger", "a", "ledger", owner=0)
    stream.record(list(amounts))
    return stream


def test_model_rejects_states_it_never_had_and_stale_reads():
    violations = Violations()
    model = Model(violations)
    stream = stream_with(5, 7)
    model.add(stream)

    model.observe(Observation(stream, 2, ledger_state(12, 2), 1, "reader"))
    model.observe(Observation(stream, 0, ledger_state(0, 0), 0, "reader"))
    assert violations.count == 0

    model.observe(Observation(stream, 2, ledger_state(13, 2), 0, "reader"))  # wrong total
    model.observe(Observation(stream, 1, ledger_state(5, 1), 2, "reader"))  # went back
    assert dict(violations.by_kind) == {"state": 1, "stale_read": 1}

    # Beyond the model: kept until the end; fine if the writer's append is then known...
    model.observe(Observation(stream, 3, ledger_state(20, 3), 2, "reader"))
    model.observe(Observation(stream, 4, ledger_state(21, 4), 2, "reader"))
    stream.record([8])
    assert violations.count == 2
    assert model.check_deferred() == 2
    # ...and a violation if it never was: version 4 was never appended.
    assert violations.by_kind["state"] == 2
    assert "beyond the 3 events" in violations.messages[-1]


def result(outcome: str, cid: str, **fields: Any) -> dict[str, Any]:
    return {
        "stream_type": "ledger",
        "stream_id": "a",
        "outcome": outcome,
        "compaction_id": cid,
        "snapshot_version": 10,
        "events_deleted": 10,
        "compacted_through_before": 0,
        **fields,
    }


def test_results_must_match_the_audit_table():
    violations = Violations()
    model = Model(violations)
    model.add(stream_with(*range(20)))
    bad = StreamModel("lossy", "l", "lossy", owner=-1)
    model.add(bad)
    rows = {"c1": audit("c1", 1, 10), "c2": audit("c2", 11, 12)}

    check = check_results(
        [
            result("compacted", "c1"),
            result("failed", "c2", error_type="DatabaseUnavailableError"),  # answer lost
            {**result("verification_failed", "x"), "stream_type": "lossy", "stream_id": "l"},
            {  # Redis was down: retried
                **result("failed", "x2", error_type="ConnectionError"),
                "stream_type": "lossy",
                "stream_id": "l",
            },
        ],
        rows,
        model,
        violations,
        "test",
    )
    assert violations.count == 0, violations.messages
    assert check.unacknowledged_commits == 1
    assert check.unreported_deletions == 1  # c2: no compacted result for it
    assert check.bad_input == {
        "lossy/l": {"verification_failed/None": 1, "failed/ConnectionError": 1}
    }

    check_results(
        [
            result("compacted", "nowhere"),  # compacted without a deletion
            result("compacted", "c1", events_deleted=9),  # says another count
            result("dry_run", "c1"),  # a dry run that deleted
            {**result("compacted", "y"), "stream_type": "lossy", "stream_id": "l"},
            {  # not how a lossy stream fails
                **result("failed", "y2", error_type="EvolveError"),
                "stream_type": "lossy",
                "stream_id": "l",
            },
            result("verification_failed", "z"),  # a good stream that does not verify
        ],
        rows,
        model,
        violations,
        "test",
    )
    assert dict(violations.by_kind) == {"result": 5, "bad_input": 2}, violations.messages


# -- against a real database -------------------------------------------------------------


@pytest.fixture
def soak_db(postgres_url: str) -> Iterator[str]:
    """A database of its own: the checker reads every stream in it."""
    del postgres_url  # requested for its check that PostgreSQL is up
    name = f"eskit_soakcheck_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    url = create_database(admin_url_from_env(), name)
    yield url
    drop_database(admin_url_from_env(), name)


def kinds_found(url: str, model: Model, *, final: bool = True) -> dict[str, int]:
    """Check the database once; return the violations found, by kind."""
    model.violations = violations = Violations()
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        db = read_db_state(conn)
    for obs in check_db(db, model, model.acked_snapshot(), violations, final=final):
        model.observe(obs)
    return dict(violations.by_kind)


def sql(url: str, statement: str) -> None:
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        conn.execute(statement)


@pytest.mark.slow
def test_checker_catches_each_kind_of_corruption_in_the_database(soak_db: str):
    store = SqlEventStore.from_url(soak_db)
    model = Model(Violations())
    stream = StreamModel("ledger", "a", "ledger", owner=0)
    amounts = list(range(1, 21))
    store.append("ledger", "a", deposit_events(stream, amounts), expected_version=0)
    stream.record(amounts)
    model.add(stream)
    try:
        result = Compactor(
            store=store,
            snapshot_store=SqlSnapshotStore(store.engine),
            decider=Ledger(),
            state_type=dict,
            policy=CompactionPolicy(retain_last=5),
        ).compact("ledger", "a")
        assert result.outcome == Outcome.COMPACTED
        assert kinds_found(soak_db, model) == {}

        # The model knows one event more than the database: the head check.
        stream.record([99])
        assert kinds_found(soak_db, model) == {"head": 1}
        assert kinds_found(soak_db, model, final=False) == {"head": 1}
        stream.amounts.pop()
        stream.prefix.pop()

        sql(soak_db, "UPDATE eskit_snapshots SET state = replace(state, '\"total\"', '\"t\"')")
        assert kinds_found(soak_db, model) == {"state": 1}  # the snapshot's state is wrong
        sql(soak_db, "UPDATE eskit_snapshots SET state = replace(state, '\"t\"', '\"total\"')")
        stream.broken = False

        sql(soak_db, "UPDATE eskit_snapshots SET verified = false")
        assert kinds_found(soak_db, model) == {"snapshot": 1}
        sql(soak_db, "UPDATE eskit_snapshots SET verified = true")
        assert kinds_found(soak_db, model) == {}

        sql(soak_db, "DELETE FROM eskit_events WHERE version = 18")
        assert kinds_found(soak_db, model) == {"events": 1}

        sql(
            soak_db,
            "INSERT INTO eskit_compaction_log (compaction_id, stream_pk, stream_type, "
            "stream_id, from_version, through_version, snapshot_version, head_version, "
            "state_hash, events_deleted, bytes_reclaimed, fence_token, compacted_at) "
            "SELECT 'overlap', stream_pk, stream_type, stream_id, 10, 15, 15, 20, state_hash, "
            "6, 0, fence_token, now() FROM eskit_compaction_log",
        )
        assert kinds_found(soak_db, model) == {"events": 1, "audit": 1}
    finally:
        store.engine.dispose()
