"""A registered application that cannot be paged (text aggregate ids) on the command
line: what was done is still reported, and the run says it stopped (from review: the
store's streams were compacted, then the command died with a usage error and no report)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from eskit_tasks import SqlEventStore
from eskit_tasks.cli import Exit, main
from eskit_tasks.core.registry import get_source, unregister_source
from eskit_tasks.eventsourcing import register_application
from eskit_tasks.testing.deciders import deposits
from tests.eventsourcing.apps import Account, Bank


@pytest.fixture
def own(tmp_path: Path) -> Iterator[str]:
    url = f"sqlite:///{tmp_path / 'events.db'}"
    store = SqlEventStore.from_url(url)
    for n in range(3):
        store.append("ledger", f"s{n}", deposits(*range(1, 7)), expected_version=0)
    store.engine.dispose()
    env = {
        "PERSISTENCE_MODULE": "eventsourcing.sqlite",
        "SQLITE_DBNAME": str(tmp_path / "bank.sqlite"),
        "ORIGINATOR_ID_TYPE": "text",
    }
    bank = Bank(env=env)
    bank.save(Account("ada"))
    bank.close()
    register_application(Bank, env=env)
    try:
        yield url
    finally:
        source = get_source("Bank")
        if source is not None:
            source.close()  # type: ignore[attr-defined]
        unregister_source("Bank")


def test_compact_all_local_reports_what_it_did_before_a_source_fails(
    own: str, capsys: pytest.CaptureFixture[str]
):
    args = ["--database", own, "--decider-module", "tests.fleet_deciders", "--json"]
    code = main(["compact-all", "--local", "--retain-last", "1", *args])
    captured = capsys.readouterr()
    assert code == Exit.FAILED_STREAMS, captured
    *streams, summary = [json.loads(line) for line in captured.out.splitlines()]
    assert summary["summary"] is True and summary["outcomes"] == {"compacted": 3}
    assert len(streams) == 3
    assert "the run stopped after 3 streams" in captured.err
    assert "text aggregate ids" in captured.err


def test_candidates_lists_what_it_found_before_a_source_fails(
    own: str, capsys: pytest.CaptureFixture[str]
):
    code = main(["candidates", "--database", own, "--json"])
    captured = capsys.readouterr()
    assert code == Exit.ERROR, captured
    assert sorted(c["stream_id"] for c in json.loads(captured.out)) == ["s0", "s1", "s2"]
    assert "listing stopped after 3 streams" in captured.err
