"""Quarantine (issue 14): a stream whose compaction ends failed or verification_failed
three times in a row is skipped by candidates and fan-outs until its backoff ends, then
retried; a compaction that succeeds releases it. Fast tier: the rules, the SQL table on
SQLite (and PostgreSQL in the services tier), the local CLI and the in-process fleet;
tests/fleet/test_quarantine_fleet.py runs it with real workers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from eskit_tasks import SqlEventStore
from eskit_tasks.cli import Exit, main
from eskit_tasks.domain.quarantine import QuarantineRules
from eskit_tasks.domain.result import CompactionResult, Outcome
from eskit_tasks.errors import DatabaseUnavailableError
from eskit_tasks.fleet.quarantine import note_outcome
from eskit_tasks.fleet.runs import compact_all
from eskit_tasks.ports import Candidate
from eskit_tasks.stores.sql_quarantine import SqlQuarantine
from eskit_tasks.testing.deciders import deposits
from tests.test_fleet_in_process import InProcessFleet, _running, fleet  # noqa: F401

T0 = datetime(2026, 12, 1, tzinfo=UTC)
HOUR = timedelta(hours=1)


def _result(outcome: Outcome, stream_id: str = "s", error_type: str | None = None):
    return CompactionResult(
        stream_type="ledger",
        stream_id=stream_id,
        outcome=outcome,
        compaction_id="c",
        error=None if outcome in (Outcome.COMPACTED,) else f"{outcome.value}: boom",
        error_type=error_type,
    )


def test_the_backoff_starts_at_the_threshold_doubles_and_is_capped():
    rules = QuarantineRules(after=3, backoff=HOUR, max_backoff=timedelta(hours=5))
    assert [rules.retry_after(n, T0) for n in (0, 1, 2)] == [None, None, None]
    assert [rules.retry_after(n, T0) - T0 for n in (3, 4, 5, 6, 100)] == [
        HOUR,
        2 * HOUR,
        4 * HOUR,
        5 * HOUR,
        5 * HOUR,
    ]
    assert QuarantineRules(after=0).retry_after(99, T0) is None  # 0: never


@pytest.fixture(params=["sqlite", "postgres"])
def quarantine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqlQuarantine]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'q.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    store = SqlEventStore.from_url(url)
    q = SqlQuarantine(store.engine, QuarantineRules(after=3, backoff=HOUR))
    q.release_all()
    for e in q.entries(quarantined_only=False):
        q.release(e.stream_type, e.stream_id)
    yield q
    store.engine.dispose()


def test_three_failures_in_a_row_quarantine_a_stream_until_its_backoff_ends(quarantine):
    candidates = [Candidate(1, "ledger", "s", 10), Candidate(2, "ledger", "other", 10)]
    for n, outcome in enumerate([Outcome.FAILED, Outcome.VERIFICATION_FAILED], start=1):
        entry = quarantine.record(_result(outcome), now=T0)
        assert entry is not None and (entry.failures, entry.quarantined) == (n, False)
        assert quarantine.held(candidates, now=T0) == set()
    entry = quarantine.record(_result(Outcome.FAILED), now=T0)
    assert entry is not None and entry.quarantined and entry.failures == 3
    assert entry.retry_after == T0 + HOUR and entry.last_error == "failed: boom"
    assert quarantine.held(candidates, now=T0 + HOUR / 2) == {("ledger", "s")}
    assert quarantine.held(candidates, now=T0 + HOUR) == set()  # tried again
    assert [e.stream_id for e in quarantine.entries()] == ["s"]
    assert quarantine.counts_by_type() == {"ledger": 1}
    # The retry fails too: the backoff doubles, counted from then.
    later = T0 + 2 * HOUR
    entry = quarantine.record(_result(Outcome.FAILED), now=later)
    assert entry is not None and entry.retry_after == later + 2 * HOUR
    assert entry.quarantined_at == T0  # still the first quarantine


def test_a_success_releases_and_fenced_or_locked_change_nothing(quarantine):
    for _ in range(3):
        quarantine.record(_result(Outcome.FAILED), now=T0)
    for outcome in (Outcome.FENCED, Outcome.LOCKED, Outcome.NOTHING_TO_COMPACT):
        entry = quarantine.record(_result(outcome), now=T0)
        assert entry is not None and entry.failures == 3, outcome
    assert quarantine.record(_result(Outcome.COMPACTED), now=T0) is None
    assert quarantine.entries(quarantined_only=False) == []
    quarantine.record(_result(Outcome.FAILED), now=T0)  # counting starts again
    assert quarantine.entry("ledger", "s").failures == 1


def test_release_and_release_all(quarantine):
    for stream_id in ("a", "b"):
        for _ in range(3):
            quarantine.record(_result(Outcome.FAILED, stream_id), now=T0)
    assert quarantine.release("ledger", "a") is True
    assert quarantine.release("ledger", "a") is False
    assert quarantine.release_all() == 1
    assert quarantine.entries() == []


def test_failures_of_the_database_or_redis_do_not_count(tmp_path: Path):
    store = SqlEventStore.from_url(f"sqlite:///{tmp_path / 'q.db'}")
    q = SqlQuarantine(store.engine, QuarantineRules(after=1))
    note_outcome(q, _result(Outcome.FAILED, error_type=DatabaseUnavailableError.__name__))
    note_outcome(q, _result(Outcome.FAILED, error_type="LockLostError"))
    assert q.entries(quarantined_only=False) == []
    note_outcome(q, _result(Outcome.FAILED, error_type="EvolveError"))
    assert [e.stream_id for e in q.entries()] == ["s"]
    store.engine.dispose()


def _summary(out: str) -> dict:
    """The summary line that ends compact-all --json (after one line a stream)."""
    return json.loads(out.strip().splitlines()[-1])


def _cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_local_runs_quarantine_a_failing_stream_skip_it_and_heal_it(
    capsys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    url = f"sqlite:///{tmp_path / 'events.db'}"
    store = SqlEventStore.from_url(url)
    store.append("brittle", "b-1", deposits(*range(1, 11)), expected_version=0)
    store.append("ledger", "ok", deposits(*range(1, 11)), expected_version=0)
    run = ["compact-all", "--local", "--database", url, "--decider-module", "tests.fleet_deciders"]
    monkeypatch.setenv("ESKIT_TEST_BROKEN", "1")
    for n in range(3):
        code, said = _cli(capsys, *run, "--json")
        assert code == Exit.FAILED_STREAMS, said
        assert _summary(said)["outcomes"].get("failed") == 1
        store.append("ledger", "ok", deposits(1), expected_version=10 + n)
    code, said = _cli(capsys, "quarantine", "list", "--database", url, "--json")
    [entry] = json.loads(said)
    assert (entry["stream_type"], entry["stream_id"], entry["failures"]) == ("brittle", "b-1", 3)
    assert "a bug in this deployment's decider" in entry["last_error"]
    # Candidates and the next run skip it: the run is clean.
    code, said = _cli(capsys, "candidates", "--database", url, "--json")
    assert "b-1" not in said
    code, said = _cli(capsys, *run, "--json")
    assert code == Exit.OK and _summary(said)["outcomes"] == {"compacted": 1}, said
    # The decider is fixed; released by hand (or at the end of its backoff), it heals.
    monkeypatch.setenv("ESKIT_TEST_BROKEN", "0")
    code, said = _cli(capsys, "quarantine", "release", "brittle", "b-1", "--database", url)
    assert code == Exit.OK and "released brittle/b-1" in said
    code, said = _cli(capsys, "quarantine", "release", "brittle", "b-1", "--database", url)
    assert code == Exit.ERROR and "not in quarantine" in said
    code, said = _cli(capsys, *run, "--json")
    assert code == Exit.OK and _summary(said)["outcomes"] == {"compacted": 1}, said
    code, said = _cli(capsys, "quarantine", "list", "--database", url, "--failing", "--json")
    assert json.loads(said) == []
    store.engine.dispose()


def test_the_fleet_skips_a_quarantined_stream_and_retries_it_after_its_backoff(
    fleet: InProcessFleet,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
):
    from eskit_tasks.fleet.resources import resources_of

    res = resources_of(fleet.app)
    res._quarantine = SqlQuarantine(
        fleet.store.engine, QuarantineRules(after=3, backoff=timedelta(seconds=1.5))
    )
    monkeypatch.setenv("ESKIT_TEST_BROKEN", "1")
    fleet.seed("b-1", 10, stream_type="brittle")
    for _ in range(3):
        final = compact_all(min_events=5, app=fleet.app).wait(timeout=60, poll=0.05)
        assert final.outcomes == {"failed": 1}, final
    skipped = compact_all(min_events=5, app=fleet.app).wait(timeout=60, poll=0.05)
    assert (skipped.candidates, skipped.outcomes) == (0, {}), skipped
    monkeypatch.setenv("ESKIT_TEST_BROKEN", "0")  # the fix is deployed
    import time

    time.sleep(1.6)  # the backoff ends
    healed = compact_all(min_events=5, app=fleet.app).wait(timeout=60, poll=0.05)
    assert healed.outcomes == {"compacted": 1}, healed
    assert res.quarantine is not None and res.quarantine.entries(quarantined_only=False) == []


def test_the_quarantine_gauge_counts_per_registered_type_and_other(tmp_path: Path):
    import tests.fleet_deciders  # noqa: F401 -- registers ledger and brittle
    from eskit_tasks.fleet.metrics import QuarantineCollector

    url = f"sqlite:///{tmp_path / 'q.db'}"
    store = SqlEventStore.from_url(url)
    q = SqlQuarantine(store.engine, QuarantineRules(after=1))
    for stream_type, stream_id in [("brittle", "a"), ("brittle", "b"), ("ghost", "g")]:
        q.record(
            CompactionResult(
                stream_type=stream_type,
                stream_id=stream_id,
                outcome=Outcome.FAILED,
                compaction_id="c",
                error="boom",
            ),
            now=T0,
        )
    family, runs = QuarantineCollector(url).collect()
    got = {s.labels["stream_type"]: s.value for s in family.samples}
    assert {s.labels["state"]: s.value for s in runs.samples} == {
        "running": 0,
        "finished": 0,
        "failed": 0,
    }
    assert got["brittle"] == 2 and got["other"] == 1 and got["ledger"] == 0
    assert "ghost" not in got  # not registered: counted as other
    # A database that cannot answer leaves the gauge out of that scrape, never fails it.
    assert list(QuarantineCollector(f"sqlite:///{tmp_path / 'missing' / 'x.db'}").collect()) == []
    store.engine.dispose()
