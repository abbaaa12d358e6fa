"""The soak's checker has teeth: each invariant it checks catches a database or a result
that breaks it (a soak whose checker never fires proves nothing)."""

from __future__ import annotations

import copy
import json
import random
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timezone
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest

from eskit_tasks import (
    CompactionPolicy,
    Compactor,
    LocalArchive,
    Outcome,
    RecordedEvent,
    SqlEventStore,
    SqlSnapshotStore,
    restore,
)
from eskit_tasks.domain.codec import StateCodec
from eskit_tasks.domain.compare import Difference
from eskit_tasks.eventsourcing import ApplicationCompactor
from eskit_tasks.ports import ArchivedEvent
from eskit_tasks.testing.deciders import Ledger
from eskit_tasks.testing.services import libpq_url, scratch_database
from tests.soak.checker import (
    AppStore,
    AuditRow,
    LiveEvents,
    app_follower_problems,
    app_gate_problems,
    app_held_back_problems,
    app_state_problems,
    app_store_problems,
    archived_problems,
    audit_problems,
    check_db,
    check_results,
    exactly_once_problem,
    held_back_problems,
    held_back_summary,
    live_events_problems,
    projection_problems,
    read_app_store,
    read_db_state,
    restore_problems,
)
from tests.soak.esapp import (
    APP_NAME,
    FOLLOWER_NAME,
    AppModel,
    AppWriter,
    Processed,
    SoakAudit,
    SoakBank,
    app_env,
    fresh_states,
    state_of,
)
from tests.soak.kinds import FOLDERS, STRICT_KINDS, Priority, Status
from tests.soak.model import (
    PROJECTION,
    Model,
    Observation,
    ProjectionModel,
    Stats,
    StreamModel,
    Violations,
    ledger_state,
    snapshot_problem,
    state_adapter,
)
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


# -- the strict comparison: equal is not enough -------------------------------------------


#: Amounts whose ``recent`` keys arrive out of sorted order (q, w, e, r, t, y).
OUT_OF_ORDER = [0, 1, 2, 3, 4, 5]


def strict_stream(kind: str, amounts: list[int], stream_id: str = "x") -> StreamModel:
    stream = StreamModel(kind, stream_id, kind, owner=0)
    stream.record(amounts)
    return stream


def observed(model: Model, stream: StreamModel, state: Any, source: str = "reader") -> list[str]:
    """Observe ``state`` at the stream's head; return the violations it added."""
    before = len(model.violations.messages)
    model.observe(Observation(stream, stream.acked(), state, 0, source))
    return model.violations.messages[before:]


def distinguishable_copies(kind: str, state: Any) -> dict[str, Any]:
    """States ``==`` to ``state`` that a decider can tell apart from it."""
    if kind == "recent":
        return {"keys sorted": dict(sorted(state.items()))}
    if kind == "agenda":
        fixed = timezone(state.due.utcoffset())
        return {
            "zone as a fixed offset": state.model_copy(update={"due": state.due.astimezone(fixed)})
        }
    return {
        "status as its str value": state.model_copy(update={"status": state.status.value}),
        "priority as an int": state.model_copy(update={"priority": int(state.priority)}),
        "history as str values": state.model_copy(
            update={"history": [s.value for s in state.history]}
        ),
        "reached as ints": state.model_copy(
            update={"reached": {k: int(v) for k, v in state.reached.items()}}
        ),
    }


@pytest.mark.parametrize("kind", STRICT_KINDS)
def test_model_flags_a_state_that_is_equal_but_distinguishable(kind: str):
    violations = Violations()
    model = Model(violations)
    amounts = [*OUT_OF_ORDER, 7, 11, 13, 17, 40, 22, 9]  # 40 schedules an agenda
    expected = strict_stream(kind, amounts).state_at(len(amounts))
    assert expected is not None and expected != FOLDERS[kind][0].initial_state()

    # The very state, and a deep copy of it, are the model's.
    for same in (expected, copy.deepcopy(expected)):
        assert observed(model, strict_stream(kind, amounts), same) == []

    reasons = {"recent": "key order", "agenda": "time zone", "ticket": "type"}
    copies = distinguishable_copies(kind, expected)
    for i, (what, other) in enumerate(copies.items()):
        assert other == expected, what  # == forgives it...
        found = observed(model, strict_stream(kind, amounts, f"x{i}"), other)
        assert len(found) == 1, (what, found)  # ...the checker does not
        assert found[0].startswith("[state] reader of "), found
        assert f"({reasons[kind]})" in found[0], found  # the Difference's text
    assert dict(violations.by_kind) == {"state": len(copies)}


@pytest.mark.parametrize("kind", STRICT_KINDS)
def test_snapshots_must_decode_to_the_models_state_and_be_its_json(kind: str):
    stream = strict_stream(kind, [*OUT_OF_ORDER, 40, 41])
    version = stream.acked()
    expected = stream.state_at(version)
    adapter = state_adapter(kind)
    stored = adapter.dump_json(expected).decode()
    assert snapshot_problem(kind, version, stored, expected) is None

    # Keys sorted at every level: decodes to an == state in another order (recent), or
    # to the same state from JSON in another order (the models' fields are named).
    resorted = orjson.dumps(json.loads(stored), option=orjson.OPT_SORT_KEYS).decode()
    assert resorted != stored
    problem = snapshot_problem(kind, version, resorted, expected)
    assert problem is not None and "key order" in problem, problem

    # A value of another JSON type that pydantic would coerce back.
    plain = json.loads(stored)
    if kind == "recent":
        plain[next(iter(plain))] = str(plain[next(iter(plain))])
    elif kind == "agenda":
        plain["moves"] = str(plain["moves"])
    else:
        plain["priority"] = str(plain["priority"])
    problem = snapshot_problem(kind, version, json.dumps(plain), expected)
    assert problem is not None and "stored JSON" in problem and "(type)" in problem, problem

    problem = snapshot_problem(kind, version, '{"nonsense": true}', expected)
    assert problem is not None


def test_agenda_snapshot_in_another_zone_of_the_same_offset_is_flagged():
    stream = strict_stream("agenda", [40, 1, 2])  # Europe/Berlin, early March: +01:00
    expected = stream.state_at(3)
    plain = state_adapter("agenda").dump_python(expected, mode="json")
    assert plain["due"]["zone"] == "Europe/Berlin"
    plain["due"]["zone"] = "Etc/GMT-1"  # +01:00 all year
    elsewhere = state_adapter("agenda").validate_json(json.dumps(plain))
    assert elsewhere == expected  # the same instant
    problem = snapshot_problem("agenda", 3, json.dumps(plain), expected)
    assert problem is not None and "(time zone)" in problem, problem


def test_ticket_enums_survive_their_codec_and_compare_by_member():
    stream = strict_stream("ticket", [1, 6, 11, 16])
    state = stream.state_at(4)
    assert state is not None
    assert isinstance(state.status, Status) and isinstance(state.priority, Priority)
    again = StateCodec(FOLDERS["ticket"][1]).decode(StateCodec(FOLDERS["ticket"][1]).encode(state))
    assert observed(Model(Violations()), stream, again) == []


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
            result(  # its commit went through, the answer was lost
                "failed",
                "c2",
                error_type="DatabaseUnavailableError",
                snapshot_version=12,
                head_version=17,
            ),
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


def test_attempts_of_a_retried_task_share_its_compaction_id():
    """The fleet derives the compaction_id from the task id: an attempt fenced or failed
    before writing, then a retry that deletes, is one id with one audit row."""
    violations = Violations()
    model = Model(violations)
    model.add(stream_with(*range(20)))
    rows = {"c1": audit("c1", 1, 10), "c2": audit("c2", 11, 15), "c3": audit("c3", 16, 18)}
    planned = {"snapshot_version": 10, "head_version": 15}  # c1's row: through 10, head 15
    check = check_results(
        [
            # c1: fenced with the same plan, then the retry saw its commit.
            result("fenced", "c1", error_type="LockLostError", **planned),
            result("compacted", "c1"),
            # c2: fenced planning another cut; the retry that deleted left no log line.
            result(
                "fenced", "c2", error_type="LockLostError", snapshot_version=13, head_version=14
            ),
            # c3: failed before planning (Redis down), then the retry deleted.
            result("failed", "c3", error_type="ConnectionError", snapshot_version=None),
            result(
                "compacted",
                "c3",
                snapshot_version=18,
                events_deleted=3,
                compacted_through_before=15,
            ),
        ],
        rows,
        model,
        violations,
        "test",
    )
    assert violations.count == 0, violations.messages
    assert check.superseded_attempts == 3
    assert check.unreported_deletions == 1  # c2

    # Nothing to compact at an earlier head, then a copy of the task deleted and said so
    # (the soak of seed 706160551: the first copy's claim lost to a Redis restart).
    check = check_results(
        [
            result("nothing_to_compact", "c3", snapshot_version=None, head_version=16),
            result(
                "compacted",
                "c3",
                snapshot_version=18,
                events_deleted=3,
                compacted_through_before=15,
            ),
        ],
        {"c3": rows["c3"]},
        model,
        violations,
        "test",
    )
    assert violations.count == 0, violations.messages
    assert check.superseded_attempts == 1
    # No attempt reported the deletion, or one at the very head of the deletion (23):
    # "nothing to compact" is then not true of that compaction.
    for lying in (
        [result("nothing_to_compact", "c3", snapshot_version=None, head_version=16)],
        [
            result("nothing_to_compact", "c3", snapshot_version=None, head_version=23),
            result(
                "compacted",
                "c3",
                snapshot_version=18,
                events_deleted=3,
                compacted_through_before=15,
            ),
        ],
    ):
        found = Violations()
        check_results(lying, {"c3": rows["c3"]}, model, found, "test")
        assert found.count == 1, found.messages

    # Without such a retry, an attempt that planned exactly the deletion yet says fenced
    # (or a dry run of the id) is a violation.
    check_results(
        [
            result("fenced", "c1", error_type="LockLostError", **planned),
            result("dry_run", "c2", snapshot_version=13),
        ],
        rows,
        model,
        violations,
        "test",
    )
    assert dict(violations.by_kind) == {"result": 2}, violations.messages


# -- the consumer and the trash bin ------------------------------------------------------

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def deposit(version: int, position: int, amount: int, stream_id: str = "a") -> RecordedEvent:
    """An event of ledger/<stream_id> as read_all gives it."""
    data, metadata = {"amount": amount}, {"stream": stream_id}
    return RecordedEvent(version, "Deposited", data, metadata, T0, 0, position, "ledger", stream_id)


def projection_of(*events: RecordedEvent) -> tuple[ProjectionModel, list[str]]:
    seen = ProjectionModel()
    problems = [problem for event in events for problem in seen.apply(event)]
    return seen, problems


def test_projection_flags_a_position_twice_a_read_that_went_back_and_a_skipped_version():
    seen, problems = projection_of(deposit(1, 10, 5), deposit(2, 12, 7), deposit(1, 13, 1, "b"))
    assert problems == []
    assert (seen.last, seen.events, seen.versions(("ledger", "a"))) == (13, 3, [1, 2])

    twice = seen.apply(deposit(2, 12, 7))  # the same event again
    assert twice == ["ledger/a version 2 (position 12) was delivered a second time"]
    # A restored event put back above what the projection read: it comes again.
    [back, again] = seen.apply(deposit(1, 11, 5))
    assert "came after position 13: read_all went back" in back
    assert "came again: it had seen up to version 2" in again
    [skipped] = seen.apply(deposit(4, 20, 9))
    assert "while version 3 was due (versions 3..3 skipped)" in skipped
    assert seen.events == 5  # the duplicate position was not recorded


def ledger_model(amounts: list[int], stream_id: str = "a") -> tuple[Model, StreamModel]:
    model = Model(Violations())
    stream = StreamModel("ledger", stream_id, "ledger", owner=0)
    stream.record(amounts)
    model.add(stream)
    return model, stream


def test_projection_must_have_seen_every_version_exactly_once_with_its_payload():
    model, _ = ledger_model([5, 7, 9])
    heads = {("ledger", "a"): 3}
    complete = [deposit(1, 10, 5), deposit(2, 11, 7), deposit(3, 14, 9)]
    seen, _ = projection_of(*complete)
    assert projection_problems(seen, heads, model) == []

    seen, _ = projection_of(*complete[:2])  # the head event never came
    [missing] = projection_problems(seen, heads, model)
    assert "saw 2 events, of versions 1..3, 1 never seen (3)" in missing

    seen, _ = projection_of(complete[0], complete[1], deposit(2, 12, 7), complete[2])
    [twice] = projection_problems(seen, heads, model)
    assert "1 seen more than once (2)" in twice

    seen, _ = projection_of(complete[0], deposit(2, 11, 8), complete[2])
    [payload] = projection_problems(seen, heads, model)
    assert "version 2 with another payload" in payload

    seen, _ = projection_of(*complete, deposit(1, 15, 1, "ghost"))
    [unknown] = projection_problems(seen, heads, model)
    assert unknown == "ledger/ghost: the projection saw a stream the database lacks"

    assert exactly_once_problem([1, 2, 3], 3) is None
    assert exactly_once_problem([], 0) is None
    assert "beyond the head (4)" in str(exactly_once_problem([1, 2, 3, 4], 3))
    assert "out of order" in str(exactly_once_problem([2, 1, 3], 3))


def test_a_restore_that_lost_an_event_or_moved_it_is_flagged():
    _, stream = ledger_model([5, 7, 9, 11])
    seen, _ = projection_of(
        deposit(1, 10, 5), deposit(2, 11, 7), deposit(3, 12, 9), deposit(4, 13, 11)
    )
    back = [(v, 9 + v, {"amount": a}) for v, a in zip(range(1, 5), [5, 7, 9, 11], strict=True)]
    assert restore_problems(stream, 3, back, 0, seen) == []

    [lost] = restore_problems(stream, 3, [back[0], *back[2:]], 0, seen) or [""]
    assert "after restoring 3 events, versions 2 are missing" in lost
    [lost] = restore_problems(stream, 3, back[1:], 0, seen) or [""]  # no version 1
    assert "versions 1 are missing" in lost
    [short] = restore_problems(stream, 3, back[:2], 0, seen) or [""]  # 3 never came back
    assert "versions 3 are missing" in short
    # Compacted again before the check: nothing left to look at, nothing to say.
    assert restore_problems(stream, 3, back[3:], 3, seen) is None

    moved = [back[0], (2, 99, {"amount": 7}), *back[2:]]
    [problem] = restore_problems(stream, 3, moved, 0, seen) or [""]
    assert "version 2 was put back at position 99; the projection saw it at position 11" in (
        problem
    )
    other = [back[0], (2, 11, {"amount": 8}), *back[2:]]
    problems = restore_problems(stream, 3, other, 0, seen) or []
    assert any("with another payload" in p for p in problems), problems
    assert any("its writer appended {'amount': 7}" in p for p in problems), problems

    late, _ = projection_of(deposit(2, 11, 7), deposit(3, 12, 9))  # never read version 1
    [outran] = restore_problems(stream, 3, back, 0, late) or [""]
    assert "version 1 was put back at position 10, but the projection never saw it" in outran


def archived(version: int, position: int, amount: int) -> ArchivedEvent:
    return ArchivedEvent(version, "Deposited", json.dumps({"amount": amount}), "{}", T0, position)


def test_archived_events_must_be_ones_the_projection_had_seen():
    _, stream = ledger_model([5, 7, 9, 11])
    seen, _ = projection_of(deposit(1, 10, 5), deposit(2, 11, 7), deposit(3, 12, 9))
    row = audit("c1", 1, 3)
    entry = [archived(1, 10, 5), archived(2, 11, 7), archived(3, 12, 9)]
    assert archived_problems(row, entry, seen, stream) == []

    early, _ = projection_of(deposit(1, 10, 5))  # the compaction outran the projection
    [(kind, problem)] = archived_problems(row, entry, early, stream)
    assert kind == "gate" and "deleted 2 events the projection never saw (versions 2, 3)" in (
        problem
    )
    [(kind, problem)] = archived_problems(row, entry[:2], seen, stream)
    assert kind == "archive" and "its archive entry holds 2 events (1, 2)" in problem
    [(kind, problem)] = archived_problems(row, [*entry[:2], archived(3, 13, 9)], seen, stream)
    assert kind == "archive" and "the projection saw it at position 12" in problem
    # A payload that is not the writer's, seen like that by the projection as well.
    wrong, _ = projection_of(deposit(1, 10, 5), deposit(2, 11, 8), deposit(3, 12, 9))
    [(kind, problem)] = archived_problems(
        row, [entry[0], archived(2, 11, 8), entry[2]], wrong, stream
    )
    assert kind == "archive" and "its writer appended {'amount': 7}" in problem


def test_results_held_back_name_a_saved_checkpoint_and_delete_below_it():
    held = {"consumer": PROJECTION, "position": 12}
    fine = [
        result("compacted", "c1", held_back_by=held, head_version=20),
        result("compacted", "c2", held_back_by=None),
        result(
            "nothing_to_compact",
            "c3",
            held_back_by=held,
            snapshot_version=None,
            head_version=20,
            compacted_through_before=10,
        ),
    ]
    assert held_back_problems(fine, {"c1": 12, "c2": 40}, {0, 12}) == []
    assert held_back_summary(fine, {"c1": 5, "c3": 0}) == {"limited": 1, "held": 1, "events": 15}

    [unsaved] = held_back_problems(fine[:1], {"c1": 12}, {0, 11})
    assert "held back at position 12, a checkpoint the projection never saved" in unsaved
    [above] = held_back_problems(fine[:1], {"c1": 13}, {12})
    assert "held back at position 12, deleted an event at position 13" in above
    stranger = result("compacted", "c4", held_back_by={"consumer": "x", "position": 1})
    [unknown] = held_back_problems([stranger], {}, {1})
    assert "held back by unknown 'x'" in unknown


def test_audit_rows_a_restore_undid_tile_nothing_any_more():
    undone = [
        AuditRow("c1", 1, "ledger", "a", 1, 10, 10, 12, 10, restored=True),
        AuditRow("c2", 1, "ledger", "a", 11, 12, 12, 14, 2, restored=True),
    ]
    assert audit_problems(undone, 0) == []
    assert audit_problems([*undone, audit("c3", 1, 13)], 13) == []  # compacted again
    assert any("cover 1..0" in p for p in audit_problems(undone, 12))
    bad = AuditRow("c4", 1, "ledger", "a", 1, 10, 10, 12, 9, restored=True)
    assert any("restored audit row c4 (1..10) says 9" in p for p in audit_problems([bad], 0))


# -- against a real database -------------------------------------------------------------


@pytest.fixture
def soak_db(postgres_url: str) -> Iterator[str]:
    """A database of its own: the checker reads every stream in it."""
    with scratch_database(postgres_url, "eskit_soakcheck") as url:
        yield url


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
def test_checker_catches_each_kind_of_corruption_in_the_database(soak_db: str, tmp_path: Path):
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
            archive=LocalArchive(tmp_path / "trash"),
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
            "state_hash, events_deleted, bytes_reclaimed, fence_token, compacted_at, "
            "archive_uri, archive_sha256) "
            "SELECT 'overlap', stream_pk, stream_type, stream_id, 10, 15, 15, 20, state_hash, "
            "6, 0, fence_token, now(), archive_uri, archive_sha256 FROM eskit_compaction_log",
        )
        assert kinds_found(soak_db, model) == {"events": 1, "audit": 1}

        sql(soak_db, "UPDATE eskit_compaction_log SET archive_uri = NULL WHERE id > 1")
        assert kinds_found(soak_db, model) == {"events": 1, "audit": 1, "archive": 1}
    finally:
        store.engine.dispose()


def equal_is_enough(expected: Any, actual: Any, path: str = "$") -> Difference | None:
    """The comparison verification used before first_difference: ``==``."""
    return None if expected == actual else Difference(path, "value", expected, actual)


@pytest.mark.slow
def test_checker_catches_snapshots_that_sort_their_keys_again(
    soak_db: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    """A regression of the package: snapshots sorting their keys. Verification refuses
    it (a good stream failing verification is a violation); were verification back to
    ``==`` as well, the snapshot's state is a violation of its own."""
    store = SqlEventStore.from_url(soak_db)
    model = Model(Violations())
    stream = StreamModel("recent", "r", "recent", owner=0)
    amounts = [*OUT_OF_ORDER, 7, 11, 13]
    store.append("recent", "r", deposit_events(stream, amounts), expected_version=0)
    stream.record(amounts)
    model.add(stream)
    decider, state_type = FOLDERS["recent"]
    unsorted = StateCodec.encode

    def sorting(self: StateCodec[Any], state: Any) -> bytes:
        return orjson.dumps(orjson.loads(unsorted(self, state)), option=orjson.OPT_SORT_KEYS)

    def compact() -> Any:
        return Compactor(
            store=store,
            snapshot_store=SqlSnapshotStore(store.engine),
            decider=decider,
            state_type=state_type,
            # No tail: replaying events after a sorted snapshot would evict another key
            # than the full replay, which even == notices.
            policy=CompactionPolicy(retain_last=0),
            archive=LocalArchive(tmp_path / "trash"),
        ).compact("recent", "r")

    try:
        monkeypatch.setattr(StateCodec, "encode", sorting)
        refused = compact()
        assert refused.outcome == Outcome.VERIFICATION_FAILED, refused
        assert "key order" in str(refused.error)
        violations = Violations()
        check_results([refused.model_dump(mode="json")], {}, model, violations, "test")
        assert dict(violations.by_kind) == {"result": 1}, violations.messages
        assert kinds_found(soak_db, model) == {}  # nothing was deleted

        monkeypatch.setattr("eskit_tasks.core.compactor.first_difference", equal_is_enough)
        assert compact().outcome == Outcome.COMPACTED  # == lets the sorted snapshot through
        assert kinds_found(soak_db, model) == {"state": 1}
        message = model.violations.messages[0]
        assert message.startswith("[state] snapshot of recent/r:") and "(key order)" in message
    finally:
        store.engine.dispose()


@pytest.mark.slow
def test_a_restore_in_a_real_database_satisfies_the_checker_until_it_loses_an_event(
    soak_db: str, tmp_path: Path
):
    """The projection holds a compaction back; the deletion is archived; a restore puts
    it back below the projection, which does not see it again; then an event goes."""
    store = SqlEventStore.from_url(soak_db)
    model, stream = ledger_model(list(range(1, 21)))
    store.append("ledger", "a", deposit_events(stream, stream.amounts), expected_version=0)
    archive = LocalArchive(tmp_path / "trash")
    seen = ProjectionModel()
    try:
        for event in store.read_all(limit=12):  # the projection has read 12 of 20
            assert seen.apply(event) == []
        seen.note_saved(seen.last)
        store.save_checkpoint(PROJECTION, seen.last)
        done = Compactor(
            store=store,
            snapshot_store=SqlSnapshotStore(store.engine),
            decider=Ledger(),
            state_type=dict,
            policy=CompactionPolicy(retain_last=0),
            archive=archive,
        ).compact("ledger", "a")
        assert (done.outcome, done.snapshot_version) == (Outcome.COMPACTED, 12)
        assert done.held_back_by is not None and done.held_back_by.consumer == PROJECTION

        [row] = [r for rows in read_state(soak_db).audit.values() for r in rows]
        assert row.archive_uri is not None and row.archive_sha256 is not None
        entry = list(archive.read(store.compaction_log()[0].archive))  # type: ignore[arg-type]
        assert archived_problems(row, entry, seen, stream) == []
        top = {done.compaction_id: max(e.position for e in entry)}
        assert held_back_problems([done.model_dump(mode="json")], top, seen.saved) == []

        assert restore(store, "ledger", "a", archive=archive).events_restored == 12
        live = [(e.version, e.position, e.data) for e in store.read("ledger", "a")]
        assert restore_problems(stream, 12, live, 0, seen) == []
        assert kinds_found(soak_db, model) == {}
        for event in store.read_all(after_position=seen.last):  # 13..20, not 1..12 again
            assert seen.apply(event) == []
        assert projection_problems(seen, {("ledger", "a"): 20}, model) == []

        sql(soak_db, "DELETE FROM eskit_events WHERE version = 5")
        live = [(e.version, e.position, e.data) for e in store.read("ledger", "a")]
        [lost] = restore_problems(stream, 12, live, 0, seen) or [""]
        assert "versions 5 are missing" in lost
        assert kinds_found(soak_db, model) == {"events": 1}
    finally:
        store.engine.dispose()


def read_state(url: str) -> Any:
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        return read_db_state(conn)


# -- the pyeventsourcing application (tests/soak/esapp.py) --------------------------------


@pytest.fixture
def bank_model(tmp_path: Path) -> Iterator[tuple[AppModel, SoakAudit]]:
    """Three purses of a real application in SQLite, and its follower (followed)."""
    model = AppModel(app_env(tmp_path))
    model.open_purses(3, random.Random(7))
    audit = SoakAudit(env=model.env)
    leader = SoakBank(env=model.env)
    audit.follow(leader.name, leader.notification_log)
    yield model, audit
    audit.close()
    leader.close()


def _compact_all(model: AppModel, audit: SoakAudit, retain_last: int) -> list[dict[str, Any]]:
    bank = SoakBank(env=model.env)
    compactor = ApplicationCompactor(
        bank, policy=CompactionPolicy(retain_last=retain_last), followers=[audit]
    )
    try:
        return [compactor.compact(i).model_dump(mode="json") for i in model.purses]
    finally:
        compactor.close()
        bank.close()


def _app_problems(model: AppModel, audit: SoakAudit) -> list[str]:
    heads = {i: p.head for i, p in model.purses.items()}
    store = read_app_store(model.bank_path)
    expected = {i: state_of(p.held) for i, p in model.purses.items()}
    return [
        *app_store_problems(store, heads),
        *app_state_problems(expected, fresh_states(model.env, list(model.purses))),
        *app_follower_problems(audit.processed, heads),
        *app_gate_problems(store, audit.processed),
    ]


def test_the_application_checks_pass_a_compaction_held_back_by_the_follower(bank_model: Any):
    model, audit = bank_model
    audit.pull_and_process(APP_NAME, stop=5)  # the first purse's first events only
    results = _compact_all(model, audit, retain_last=1)
    assert [r["held_back_by"]["position"] for r in results] == [5, 5, 5]
    assert app_held_back_problems(results, audit.processed) == []
    audit.pull_and_process(APP_NAME)
    _compact_all(model, audit, retain_last=1)
    assert _app_problems(model, audit) == []
    store = read_app_store(model.bank_path)
    assert store.guarded and store.audit_rows >= 4
    assert {store.points[i] for i in model.purses} == {p.head - 1 for p in model.purses.values()}


def test_the_application_checks_catch_an_event_deleted_before_the_follower_saw_it(
    bank_model: Any,
):
    model, audit = bank_model
    purse = next(iter(model.purses.values()))
    conn = sqlite3.connect(model.bank_path)
    conn.execute(
        "DELETE FROM stored_events WHERE originator_id = ? AND originator_version = 2",
        (purse.id.hex,),
    )
    conn.commit()
    conn.close()
    audit.pull_and_process(APP_NAME)
    problems = _app_problems(model, audit)
    assert any(
        "the follower processed of versions" in p and "1 never seen (2)" in p for p in problems
    ), problems
    assert any("live events are" in p for p in problems), problems
    assert any("cannot load it" in p for p in problems), problems  # version 1, then 3


def test_the_application_checks_compare_states_strictly():
    class Thing:
        def __init__(self, recent: dict[str, int]) -> None:
            self.recent = recent
            self._pending_events: list[Any] = []
            self.version = 2

    purse_id = uuid.uuid4()
    expected = {purse_id: state_of(Thing({"a": 1, "b": 2}))}
    assert app_state_problems(expected, {purse_id: Thing({"a": 1, "b": 2})}) == []
    [order] = app_state_problems(expected, {purse_id: Thing({"b": 2, "a": 1})})
    assert "key order" in order, order
    [typed] = app_state_problems(expected, {purse_id: Thing({"a": 1.0, "b": 2})})  # type: ignore[dict-item]
    assert "type" in typed, typed
    [failed] = app_state_problems(expected, {purse_id: AssertionError()})
    assert "cannot load it" in failed


def test_a_deletion_the_follower_had_not_processed_and_held_back_results_are_flagged():
    purse_id = uuid.uuid4()
    row = AuditRow("c1", 1, APP_NAME, str(purse_id), 1, 4, 4, 6, 4)
    at = datetime(2030, 1, 1, tzinfo=UTC)
    store = AppStore(audit={purse_id: [row]}, compacted_at={"c1": at})
    processed = [Processed(purse_id, v, 10 + v, at.timestamp() - 1) for v in range(1, 7)]
    assert app_gate_problems(store, processed) == []
    late = [*processed[:3], Processed(purse_id, 4, 14, at.timestamp() + 0.5), *processed[4:]]
    [problem] = app_gate_problems(store, late)
    assert "began processing 0.500 s later" in problem
    [never] = app_gate_problems(store, processed[:3])
    assert "never processed" in never

    def held(position: int, cut: int | None, consumer: str = FOLLOWER_NAME) -> dict[str, Any]:
        return {
            "stream_type": APP_NAME,
            "stream_id": str(purse_id),
            "compaction_id": "c",
            "outcome": "compacted" if cut else "nothing_to_compact",
            "snapshot_version": cut,
            "held_back_by": {"consumer": consumer, "position": position},
        }

    assert app_held_back_problems([held(14, 4), held(0, None)], processed) == []
    [beyond] = app_held_back_problems([held(13, 4)], processed)
    assert "deleted through version 4, notification 14" in beyond
    [unknown] = app_held_back_problems([held(14, 4, "Other")], processed)
    assert "unknown 'Other'" in unknown
    [unreached] = app_held_back_problems([held(99, None)], processed)
    assert "never reached" in unreached


def test_the_follower_must_see_each_event_once_in_order():
    a, b = uuid.uuid4(), uuid.uuid4()
    heads = {a: 2, b: 1}
    seen = [Processed(a, 1, 1, 0.0), Processed(b, 1, 2, 0.0), Processed(a, 2, 3, 0.0)]
    assert app_follower_problems(seen, heads) == []
    twice = app_follower_problems([*seen, Processed(a, 2, 3, 0.0)], heads)
    assert any("seen more than once" in p for p in twice), twice
    assert any("not strictly increasing" in p for p in twice), twice
    assert any("1 never seen (2)" in p for p in app_follower_problems(seen[:2], heads))


def test_a_stale_save_that_gets_through_is_a_violation(bank_model: Any):
    model, audit = bank_model
    audit.pull_and_process(APP_NAME)
    stats, violations = Stats(), Violations()
    writer = AppWriter(
        model, 1, stats, violations, threading.Event(), pace=0, stale_every=0, stale_pending=3
    )
    writer.bank = SoakBank(env=model.env)
    purses = list(model.purses.values())
    for purse in purses:
        writer.take_stale(purses)
        writer.append(purse)
        writer.append(purse)
    assert len(writer.pending) == 3 and stats.get("app:reads") == 3
    audit.pull_and_process(APP_NAME)
    _compact_all(model, audit, retain_last=1)
    first = purses[0].id
    stale_first = writer.pending.pop(first)
    writer.try_stale()
    assert (stats.get("app:stale_refused"), violations.count) == (2, 0)

    compactor = ApplicationCompactor(writer.bank)
    compactor.remove_guard()  # what the guard is for: without it, the save goes through
    compactor.close()
    writer.pending[first] = stale_first
    writer.try_stale()
    [message] = violations.messages
    assert "a stale save of version" in message and "went through" in message
    writer.bank.close()
