"""The command line's consumers and trash bin commands on SQLite."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eskit_tasks import SqlEventStore
from eskit_tasks.cli import Exit, main, render
from eskit_tasks.testing.deciders import deposits

DECIDERS = ("--decider-module", "tests.fleet_deciders")


@pytest.fixture
def db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'cli.db'}"


@pytest.fixture
def store(db: str) -> SqlEventStore:
    store = SqlEventStore.from_url(db)
    for stream_id in ("a", "b"):
        store.append("ledger", stream_id, deposits(*range(1, 11)), expected_version=0)
    return store


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_consumers_lists_checkpoints_and_lag(capsys, db, store):
    store.save_checkpoint("projection", 12)
    store.save_checkpoint("audit", 3, stream_types=["ledger"])
    code, out, _ = run(capsys, "consumers", "--database", db, "--json")
    assert code == Exit.OK
    listed = json.loads(out)
    assert listed["last_position"] == 20
    assert [
        (c["consumer"], c["position"], c["stream_types"], c["events_behind"])
        for c in listed["consumers"]
    ] == [("audit", 3, ["ledger"], 17), ("projection", 12, None, 8)]
    code, out, _ = run(capsys, "consumers", "--database", db)
    assert code == Exit.OK
    assert "projection" in out and "last position 20" in out


def test_consumers_is_read_only(capsys, tmp_path):
    missing = tmp_path / "typo.db"
    code, _, err = run(capsys, "consumers", "--database", f"sqlite:///{missing}")
    assert code == Exit.USAGE and "init-db" in err
    assert not missing.exists()


def test_compact_shows_the_consumer_that_held_it_back(capsys, db, store):
    store.save_checkpoint("projection", 4)
    code, out, _ = run(capsys, "candidates", "--database", db, "--json")
    assert [c["stream_id"] for c in json.loads(out)] == ["a"]  # b is held back entirely
    code, out, _ = run(capsys, "compact", "ledger", "a", "--database", db, *DECIDERS, "--json")
    assert code == Exit.OK
    result = json.loads(out)
    assert (result["outcome"], result["snapshot_version"]) == ("compacted", 4)
    assert result["held_back_by"] == {"consumer": "projection", "position": 4}
    code, out, _ = run(capsys, "candidates", "--database", db, "--json")
    assert json.loads(out) == []  # a's next event is above the checkpoint too
    code, out, _ = run(capsys, "compact", "ledger", "b", "--database", db, *DECIDERS)
    assert code == Exit.OK
    assert "nothing_to_compact" in out and "consumer projection at position 4" in out


def test_archive_restore_and_purge_from_the_command_line(capsys, db, store, tmp_path):
    trash = str(tmp_path / "trash")
    args = ("--database", db, *DECIDERS, "--archive", trash)
    code, out, _ = run(capsys, "compact", "ledger", "a", "--retain-last", "2", *args, "--json")
    assert code == Exit.OK
    assert json.loads(out)["archive_uri"].startswith("file://")
    code, out, _ = run(capsys, "compact-all", "--local", "--retain-last", "3", *args, "--json")
    assert code == Exit.OK
    assert [r.stream_id for r in store.compaction_log()] == ["b", "a"]

    code, out, _ = run(capsys, "restore", "ledger", "a", "--database", db, "--archive", trash)
    assert code == Exit.OK
    assert "restored 8 events of ledger/a" in out
    assert [e.version for e in store.read("ledger", "a")] == list(range(1, 11))
    code, _, err = run(capsys, "restore", "ledger", "a", "--database", db, "--archive", trash)
    assert code == Exit.ERROR and "nothing to restore" in err
    code, out, _ = run(capsys, "log", "--database", db, "--json")
    rows = {
        (r["stream_id"], r["archive_uri"] is not None, r["restored_at"] is not None)
        for r in json.loads(out)
    }
    assert rows == {("a", True, True), ("b", True, False)}
    with pytest.MonkeyPatch.context() as wide:
        wide.setattr(render.out, "width", 240)
        code, out, _ = run(capsys, "log", "--database", db)
    assert "trash bin" in out and "archived" in out and "restored 2" in out
    code, _, err = run(capsys, "restore", "ledger", "b", "--database", db)
    assert code == Exit.USAGE and "--archive" in err

    code, out, _ = run(capsys, "purge-archive", "--archive", trash, "--keep", "30d", "--json")
    assert code == Exit.OK and json.loads(out)["removed"] == []
    code, out, _ = run(capsys, "purge-archive", "--archive", trash, "--keep", "0s", "--dry-run")
    assert code == Exit.OK and "would remove 2 archive entries" in out
    code, out, _ = run(capsys, "purge-archive", "--archive", trash, "--keep", "0s")
    assert "removed 2 archive entries" in out
    code, _, err = run(capsys, "restore", "ledger", "b", "--database", db, "--archive", trash)
    assert code != Exit.OK and "b" in err
    code, _, err = run(capsys, "purge-archive", "--archive", trash, "--keep", "soon")
    assert code == Exit.USAGE and "30d" in err


def test_the_fleet_run_refuses_an_archive_flag(capsys, db, tmp_path):
    code, _, err = run(capsys, "compact-all", "--database", db, "--archive", str(tmp_path))
    assert code == Exit.USAGE and "ESKIT_ARCHIVE_URL" in err


def test_remove_consumer_forgets_it_and_compaction_goes_on(capsys, db, store):
    store.save_checkpoint("gone-for-good", 0)
    code, out, _ = run(capsys, "candidates", "--database", db, "--json")
    assert json.loads(out) == []  # it holds every stream back
    code, out, _ = run(capsys, "remove-consumer", "gone-for-good", "--database", db)
    assert code == Exit.OK
    assert "removed consumer gone-for-good (it had read up to position 0)" in out
    assert store.checkpoints() == {}
    code, out, _ = run(capsys, "candidates", "--database", db, "--json")
    assert sorted(c["stream_id"] for c in json.loads(out)) == ["a", "b"]
    code, out, _ = run(capsys, "remove-consumer", "gone-for-good", "--database", db, "--json")
    assert code == Exit.ERROR
    assert json.loads(out) == {"consumer": "gone-for-good", "removed": False, "position": None}
    code, _, err = run(capsys, "remove-consumer", "nobody", "--database", db)
    assert code == Exit.ERROR and "no consumer named 'nobody'" in err
