"""The eskit-tasks command line on SQLite: parsing, output, exit codes, error lines."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from rich.console import Console

from eskit_tasks import NewEvent, SqlEventStore
from eskit_tasks.cli import Exit, main
from eskit_tasks.fleet.settings import get_settings
from eskit_tasks.testing.deciders import deposits

SECRET = "Sup3rSecret"  # noqa: S105 -- a fake password the tests look for in output
CLI = str(Path(sys.executable).with_name("eskit-tasks"))


@pytest.fixture
def db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'cli.db'}"


@pytest.fixture
def ledgers(db: str) -> SqlEventStore:
    """Streams of type `ledger` (decider in tests.fleet_deciders) of 3, 8 and 20 events."""
    store = SqlEventStore.from_url(db)
    for stream_id, n in [("small", 3), ("mid", 8), ("big", 20)]:
        store.append("ledger", stream_id, deposits(*range(1, n + 1)), expected_version=0)
    return store


def summary_of(out: str) -> dict:
    """The totals of compact-all --json: its last line (those before are streams)."""
    summary = json.loads(out.splitlines()[-1])
    assert summary.pop("summary") is True
    return summary


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_help_lists_every_command(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for command in ("init-db", "demo", "candidates", "compact", "compact-all", "status", "log"):
        assert command in out


def test_init_db_creates_tables_and_is_idempotent(capsys, db):
    assert run(capsys, "init-db", "--database", db)[0] == 0
    code, out, _ = run(capsys, "init-db", "--database", db, "--json")
    assert code == 0
    assert json.loads(out)["tables"] == "ready"


def test_candidates_respect_the_policy_flags(capsys, db, ledgers):
    code, out, _ = run(capsys, "candidates", "--database", db, "--min-events", "5", "--json")
    assert code == 0
    assert {(c["stream_id"], c["live_events"]) for c in json.loads(out)} == {
        ("mid", 8),
        ("big", 20),
    }
    code, out, _ = run(capsys, "candidates", "--database", db, "--retain-last", "10", "--json")
    assert [c["stream_id"] for c in json.loads(out)] == ["big"]
    code, out, _ = run(capsys, "candidates", "--database", db, "--min-events", "50")
    assert code == 0 and "0 candidates" in out


def test_candidates_print_their_total_beyond_the_limit(capsys, db, ledgers):
    """Issue 14, case 5: the total of what compact-all would compact, not just a page."""
    code, out, _ = run(capsys, "candidates", "--database", db, "--limit", "1")
    assert code == 0
    assert "3 candidates" in out
    assert "total: 3 streams, 31 live events (showing 1: --limit)" in out
    code, out, _ = run(capsys, "candidates", "--database", db)
    assert "total: 3 streams, 31 live events\n" in out


def test_candidates_take_max_streams_and_retain_younger_than(capsys, db, ledgers):
    """Issue 14, case 5: the flags compact-all takes, with the same meaning."""
    code, out, _ = run(capsys, "candidates", "--database", db, "--max-streams", "2", "--json")
    assert code == 0
    assert len(json.loads(out)) == 2
    code, out, _ = run(
        capsys, "candidates", "--database", db, "--retain-younger-than", "1h", "--json"
    )
    assert code == 0
    assert json.loads(out) == []  # every event was appended just now: none is old enough
    code, out, _ = run(capsys, "candidates", "--database", db, "--retain-younger-than", "0")
    assert code == 0 and "total: 3 streams" in out
    code, _, err = run(capsys, "candidates", "--database", db, "--retain-younger-than", "soon")
    assert code == Exit.USAGE and '"1d12h"' in err


@pytest.mark.parametrize(
    "args",
    [
        ["candidates"],
        ["compact-all", "--local", "--decider-module", "tests.fleet_deciders"],
        ["compact-all"],  # a fleet run: refused before anything is sent
        ["compact-all", "--wait"],
    ],
)
def test_an_unknown_stream_type_is_a_usage_error(capsys, db, ledgers, args):
    """Issue 14, case 3: a mistyped --stream-type selects nothing: say so, exit 2."""
    code, out, err = run(capsys, *args, "--database", db, "--stream-type", "nosuchtype")
    assert code == Exit.USAGE
    assert out == ""
    assert err.count("\n") == 1, err
    assert "unknown stream type 'nosuchtype'" in err and "check the spelling" in err


def test_a_stored_type_without_a_decider_is_listed_but_not_compacted_here(capsys, db, ledgers):
    ledgers.append("ghost", "g-1", deposits(1, 2), expected_version=0)
    code, out, _ = run(capsys, "candidates", "--database", db, "--stream-type", "ghost", "--json")
    assert code == 0
    assert [c["stream_id"] for c in json.loads(out)] == ["g-1"]
    code, out, err = run(
        capsys, "compact-all", "--local", "--database", db, "--stream-type", "ghost"
    )
    assert code == Exit.USAGE
    assert "no decider registered for stream type 'ghost', which has streams" in err
    assert ledgers.head_version("ghost", "g-1") == 2


def test_a_fleet_run_of_a_stored_type_starts_without_its_decider_here(
    capsys, db, ledgers, monkeypatch
):
    """The shell that starts a fleet run need not import the workers' deciders."""
    import eskit_tasks.fleet.runs as runs

    ledgers.append("ghost", "g-1", deposits(1, 2), expected_version=0)
    started = {}

    def fake_compact_all(**kwargs):
        started.update(kwargs)
        return runs.CompactionRun("a" * 32)

    monkeypatch.setattr(runs, "compact_all", fake_compact_all)
    code, out, err = run(capsys, "compact-all", "--database", db, "--stream-type", "ghost")
    assert code == 0, err
    assert started["stream_types"] == ["ghost"]
    assert "a" * 32 in out


def test_compact_one_stream_then_log_shows_it(capsys, db, ledgers):
    code, out, _ = run(
        capsys,
        "compact",
        "ledger",
        "big",
        "--database",
        db,
        "--retain-last",
        "5",
        "--decider-module",
        "tests.fleet_deciders",
        "--json",
    )
    assert code == 0
    result = json.loads(out)
    assert (result["outcome"], result["events_deleted"], result["events_retained"]) == (
        "compacted",
        15,
        5,
    )
    code, out, _ = run(capsys, "log", "--database", db, "--stream-id", "big", "--json")
    [row] = json.loads(out)
    assert (row["compaction_id"], row["through_version"]) == (result["compaction_id"], 15)
    code, out, _ = run(capsys, "log", "--database", db)
    assert code == 0 and len(out.splitlines()) == 2  # piped: a header and the compaction


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_compact_of_a_stream_that_does_not_exist_exits_4(capsys, db, ledgers, json_flag):
    """Issue 14, case 4: a mistyped stream id is reported, not compacted silently."""
    code, out, err = run(
        capsys,
        "compact",
        "ledger",
        "bgi",
        "--database",
        db,
        "--decider-module",
        "tests.fleet_deciders",
        *json_flag,
    )
    assert code == Exit.FAILED_STREAMS == 4
    assert out == ""
    assert err.count("\n") == 1, err
    assert "no stream ledger/bgi" in err and "candidates" in err


LONG_ID = "a-rather-long-stream-identifier-of-a-customer-0001"


@pytest.fixture
def compacted(capsys, db, ledgers) -> list[dict]:
    """Two compactions in the audit log, one of a stream with a long id (as --json has them)."""
    ledgers.append("ledger", LONG_ID, deposits(*range(1, 21)), expected_version=0)
    for stream_id in ("big", LONG_ID):
        args = ["compact", "ledger", stream_id, "--database", db, "--retain-last", "5"]
        assert run(capsys, *args, "--decider-module", "tests.fleet_deciders")[0] == 0
    return json.loads(run(capsys, "log", "--database", db, "--json")[1])


def test_log_piped_is_one_tab_separated_line_a_compaction_with_full_values(capsys, db, compacted):
    """Issue 14, case 10: off a terminal nothing is cut: every value whole."""
    code, out, _ = run(capsys, "log", "--database", db)
    assert code == 0
    header, *lines = out.splitlines()
    assert header.split("\t") == ["when", "stream", "versions", "deleted", "bytes", "head",
                                   "state hash", "compaction id", "trash bin"]  # fmt: skip
    rows = [line.split("\t") for line in lines]
    assert [(r[1], r[6], r[7]) for r in rows] == [
        (f"ledger/{c['stream_id']}", c["state_hash"], c["compaction_id"]) for c in compacted
    ]
    assert all(len(r) == 9 for r in rows)


def test_log_on_an_80_column_terminal_shows_fewer_columns_and_cuts_nothing(
    capsys, db, compacted, monkeypatch
):
    """Issue 14, case 10: COLUMNS=80: the columns that fit, the stream wrapped, not cut."""
    from eskit_tasks.cli import render

    console, screen = terminal(width=80)
    monkeypatch.setattr(render, "out", console)
    assert run(capsys, "log", "--database", db)[0] == 0
    shown = screen.getvalue()
    assert all(len(line) <= 80 for line in shown.splitlines()), shown
    assert "…" not in shown
    for name in ("when", "stream", "versions", "deleted", "trash bin", "ledger/big", "1..15"):
        assert name in shown
    assert LONG_ID[-10:] in shown and "more columns: a wider terminal, --json, or piped" in shown
    console, screen = terminal(width=200)
    monkeypatch.setattr(render, "out", console)
    assert run(capsys, "log", "--database", db)[0] == 0
    assert compacted[0]["compaction_id"] in screen.getvalue() and LONG_ID in screen.getvalue()


@pytest.mark.slow  # a console-script process: not in make test-fast
def test_log_piped_from_the_console_script_at_80_columns(db, compacted):
    env = {**os.environ, "COLUMNS": "80"}
    done = subprocess.run(
        [CLI, "log", "--database", db], capture_output=True, text=True, env=env, check=False
    )
    assert done.returncode == 0, done.stderr
    assert compacted[0]["compaction_id"] in done.stdout and LONG_ID in done.stdout
    assert "…" not in done.stdout


def test_compact_all_local_dry_run_then_real(capsys, db, ledgers):
    code, out, _ = run(
        capsys,
        "compact-all",
        "--local",
        "--database",
        db,
        "--min-events",
        "5",
        "--dry-run",
        "--decider-module",
        "tests.fleet_deciders",
        "--json",
    )
    assert code == 0
    totals = summary_of(out)
    assert totals["outcomes"] == {"dry_run": 2}
    assert (totals["dry_run_events"], totals["events_deleted"]) == (28, 0)
    assert ledgers.head_version("ledger", "big") == 20
    assert len(list(ledgers.read("ledger", "big"))) == 20

    code, out, _ = run(
        capsys,
        "compact-all",
        "--local",
        "--database",
        db,
        "--decider-module",
        "tests.fleet_deciders",
    )
    assert code == 0
    assert "streams compacted" in out and "31" in out  # 3 + 8 + 20 events deleted
    assert list(ledgers.read("ledger", "big")) == []


def terminal(width: int = 120) -> tuple[Console, io.StringIO]:
    """A terminal of ``width`` columns whose screen is a string."""
    screen = io.StringIO()
    return Console(file=screen, force_terminal=True, width=width, color_system=None), screen


def test_the_progress_bar_shows_rate_and_eta_when_the_total_is_known():
    """Issue 14, case 6."""
    from eskit_tasks.cli.render import COMPACTING, DRY_RUN, progress_bar

    console, screen = terminal()
    now = [0.0]
    with progress_bar(False, console=console, clock=lambda: now[0]) as bar:
        known = bar.add_task(DRY_RUN, total=100)
        unknown = bar.add_task(COMPACTING, total=None)
        now[0] = 10.0
        bar.update(known, completed=25)
        bar.update(unknown, completed=50)
        bar.refresh()
    shown = screen.getvalue()
    assert "planning (dry run)" in shown and "2.5 streams/s, ETA 0:00:30" in shown
    assert "5.0 streams/s" in shown and "5.0 streams/s, ETA" not in shown


def test_a_local_dry_run_says_so_on_its_progress_bar(capsys, db, ledgers, monkeypatch):
    """Issue 14, case 6: not "compacting" while nothing is deleted."""
    from eskit_tasks.cli import render

    console, screen = terminal()
    monkeypatch.setattr(render, "err", console)
    args = ["compact-all", "--local", "--database", db, "--decider-module", "tests.fleet_deciders"]
    assert run(capsys, *args, "--dry-run")[0] == 0
    assert "planning (dry run)" in screen.getvalue()
    assert "compacting" not in screen.getvalue()
    screen.truncate(0)
    assert run(capsys, *args)[0] == 0
    assert "compacting" in screen.getvalue()


def test_a_fleet_run_names_its_phase():
    from eskit_tasks.cli.fleet import run_phase
    from eskit_tasks.fleet.progress import RunProgress

    def progress(**fields):
        return RunProgress(run_id="a" * 32, started_at=0, updated_at=1, **fields)

    assert run_phase(progress(policy={"dry_run": True})) == "planning (dry run), listing candidates"
    assert run_phase(progress(policy={"dry_run": True}, fanout_done=True, candidates=2)) == (
        "planning (dry run)"
    )
    assert run_phase(progress(policy={}, fanout_done=True, candidates=2)) == "compacting"
    reclaiming = progress(policy={}, fanout_done=True, candidates=1, done=1)
    assert run_phase(reclaiming) == "reclaiming space"


def test_compact_all_json_is_a_line_per_stream_then_a_summary_line(capsys, db, ledgers):
    """Issue 14, case 11: a script reads each stream's result as it finishes (JSON lines),
    then the run's totals, the last line, marked "summary": true."""
    ledgers.append("ghost", "g-1", deposits(1, 2, 3), expected_version=0)
    args = ["compact-all", "--local", "--database", db, "--retain-last", "2", "--json"]
    code, out, _ = run(capsys, *args, "--decider-module", "tests.fleet_deciders")
    assert code == Exit.FAILED_STREAMS
    *streams, last = [json.loads(line) for line in out.splitlines()]
    assert {(s["stream_id"], s["outcome"], s["events_deleted"]) for s in streams} == {
        ("small", "compacted", 1),
        ("mid", "compacted", 6),
        ("big", "compacted", 18),
        ("g-1", "failed", 0),
    }
    assert all("summary" not in s and s["compaction_id"] for s in streams)
    assert last["summary"] is True and last["streams"] == 4
    assert (last["outcomes"], last["events_deleted"]) == ({"compacted": 3, "failed": 1}, 25)
    assert [f["stream_id"] for f in last["failed_streams"]] == ["g-1"]
    for key in ("bytes_reclaimed", "dry_run_events", "elapsed_s", "deleted_by_type", "reclaim"):
        assert key in last


def test_failed_streams_exit_4_with_their_errors(capsys, db, ledgers):
    ledgers.append("ghost", "g-1", deposits(1, 2), expected_version=0)
    code, out, _ = run(
        capsys,
        "compact-all",
        "--local",
        "--database",
        db,
        "--decider-module",
        "tests.fleet_deciders",
        "--json",
    )
    assert code == Exit.FAILED_STREAMS == 4
    totals = summary_of(out)
    assert totals["outcomes"] == {"compacted": 3, "failed": 1}
    [failed] = totals["failed_streams"]
    assert failed["stream_id"] == "g-1"
    assert "no decider registered for stream type 'ghost'" in failed["error"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["compact-all", "--local", "--retain-last", "-1"], "retain-last"),
        (["compact-all", "--local", "--retain-younger-than", "soon"], "retain_younger_than"),
        (["compact-all", "--local", "--min-events", "0"], "min-events"),
        (["compact", "ledger"], "Missing argument"),
        (["no-such-command"], "No such command"),
        (["compact", "nobody-registered", "x"], "no decider registered"),
    ],
)
def test_usage_errors_exit_2_with_one_line(capsys, db, ledgers, args, message):
    code, out, err = run(capsys, *args, "--database", db)
    assert code == Exit.USAGE == 2
    assert message in err
    assert err.count("\n") == 1, err
    assert "Traceback" not in err + out


@pytest.mark.parametrize("age", ["90", "1d12h", "2 weeks", "1w 2d"])
def test_retain_younger_than_takes_seconds_and_compound_forms(capsys, db, ledgers, age):
    """Issue 14, case 2: the forms the README promises are accepted by the flag."""
    code, out, err = run(
        capsys,
        "compact-all",
        "--local",
        "--database",
        db,
        "--retain-younger-than",
        age,
        "--dry-run",
        "--decider-module",
        "tests.fleet_deciders",
        "--json",
    )
    assert code == 0, err
    assert summary_of(out)["outcomes"] == {"nothing_to_compact": 3}


def test_an_unreadable_duration_says_which_forms_work(capsys, db, ledgers):
    code, _, err = run(
        capsys, "compact-all", "--local", "--database", db, "--retain-younger-than", "abc"
    )
    assert code == Exit.USAGE
    assert err.count("\n") == 1, err
    assert "'abc'" in err and '"1d12h"' in err and '"2 weeks"' in err and '"90"' in err


@pytest.mark.parametrize(
    ("args", "hint"),
    [
        (["no-such-command"], "(see: eskit-tasks --help)"),
        (["compact", "ledger"], "(see: eskit-tasks compact --help)"),
        (["log", "--no-such-flag"], "(see: eskit-tasks log --help)"),
    ],
)
def test_a_usage_error_points_at_the_help_of_its_command(capsys, args, hint):
    """Issue 14, case 9: the program's name appears once in the hint."""
    code, _, err = run(capsys, *args)
    assert code == Exit.USAGE
    assert err.rstrip().endswith(hint), err
    assert "eskit-tasks eskit-tasks" not in err


@pytest.fixture
def setenv(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str, str], None]]:
    """Set an environment variable for this test, read again by get_settings()."""

    def setter(name: str, value: str) -> None:
        monkeypatch.setenv(name, value)
        get_settings.cache_clear()

    yield setter
    monkeypatch.undo()
    get_settings.cache_clear()


def test_a_missing_decider_module_names_the_flag_it_came_from(capsys, db, setenv):
    """Issue 14, case 7: --decider-module, not ESKIT_DECIDER_MODULES, named the module."""
    setenv("ESKIT_DECIDER_MODULES", "")
    code, _, err = run(
        capsys, "compact-all", "--local", "--database", db, "--decider-module", "no.such.mod"
    )
    assert code == Exit.USAGE
    assert "'no.such.mod' (given by --decider-module)" in err
    assert "ESKIT_DECIDER_MODULES" not in err


def test_a_missing_module_of_the_setting_names_the_setting(capsys, db, ledgers, setenv):
    setenv("ESKIT_DECIDER_MODULES", "tests.fleet_deciders,no.such.mod")
    code, _, err = run(capsys, "candidates", "--database", db)
    assert code == Exit.USAGE
    assert "'no.such.mod' (given by ESKIT_DECIDER_MODULES)" in err


def test_unreachable_database_exits_3_with_masked_password(capsys):
    url = f"postgresql://bob:{SECRET}@127.0.0.1:1/x"
    code, out, err = run(capsys, "candidates", "--database", url)
    assert code == Exit.UNAVAILABLE == 3
    assert (
        "cannot reach the database (--database postgresql+psycopg://bob:***@127.0.0.1:1/x)" in err
    )
    assert SECRET not in err + out
    assert "Traceback" not in err
    assert err.count("\n") == 1, err


@pytest.mark.parametrize("command", [["candidates"], ["compact-all", "--local"], ["log"]])
def test_unreachable_database_of_the_setting_is_named_with_it(capsys, setenv, command):
    """Issue 14, case 1: the line names the service and the setting its URL came from."""
    setenv("ESKIT_DATABASE_URL", f"postgresql://bob:{SECRET}@127.0.0.1:1/x")
    code, out, err = run(capsys, *command)
    assert code == Exit.UNAVAILABLE
    assert (
        "cannot reach the database (ESKIT_DATABASE_URL postgresql+psycopg://bob:***@127.0.0.1:1/x)"
        in err
    )
    assert SECRET not in err + out
    assert err.count("\n") == 1, err


def test_unreachable_redis_exits_3(capsys, monkeypatch):
    from redis.exceptions import ConnectionError as RedisConnectionError

    from eskit_tasks.fleet.services import unreachable

    assert unreachable(RedisConnectionError("Error 111 connecting"))
    code, _, err = run(capsys, "status", "0" * 32)
    assert code in (Exit.UNAVAILABLE, Exit.ERROR)  # Redis of the test run may be down here
    assert "Traceback" not in err
    if code == Exit.UNAVAILABLE:
        assert "the Redis for locks and run progress (ESKIT_REDIS_URL redis://" in err


@pytest.mark.slow  # a console-script process: not in make test-fast
def test_demo_command_runs_end_to_end_as_a_console_script(tmp_path):
    env = {**os.environ, "COLUMNS": "120"}
    done = subprocess.run(
        [
            CLI,
            "demo",
            "--database",
            f"sqlite:///{tmp_path / 'demo.db'}",
            "--streams",
            "2",
            "--events",
            "500",
            "--retain-last",
            "10",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "streams compacted" in done.stdout
    assert "state after compaction equals state before: yes" in done.stdout


@pytest.mark.slow  # a console-script process: not in make test-fast
def test_python_dash_m_is_the_same_cli(tmp_path):
    SqlEventStore.from_url(f"sqlite:///{tmp_path / 'm.db'}").engine.dispose()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "eskit_tasks",
            "log",
            "--database",
            f"sqlite:///{tmp_path / 'm.db'}",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


@pytest.mark.slow  # a console-script process: not in make test-fast
def test_compact_all_local_end_to_end_as_a_console_script(tmp_path, db, ledgers):
    ledgers.append("ledger", "extra", [NewEvent("Deposited", {"amount": 1})], expected_version=0)
    env = {
        **os.environ,
        "ESKIT_DECIDER_MODULES": "tests.fleet_deciders",
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
    }
    done = subprocess.run(
        [CLI, "compact-all", "--local", "--database", db, "--retain-last", "1", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert summary_of(done.stdout)["outcomes"] == {"compacted": 3}
