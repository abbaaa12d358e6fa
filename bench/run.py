"""Run the benchmarks and print a table: ``python -m bench.run`` (or ``make bench``).

Every figure is a ratio against a baseline measured in the same run on the same
database, because these machines are noisy. ``--scale tiny`` runs everything in seconds
(the test suite does, so the benchmarks cannot rot); ``--scale full`` runs the sizes in
docs/performance.md. Results are also written as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench import REPO
from eskit_tasks.testing.services import postgres_admin_url, postgres_problem, scratch_database

SIZES = {
    "tiny": {
        "throughput": 3_000,
        "memory": (2_000, 20_000),
        "snapshot_keys": 2_000,
        "eventsourcing": 1_000,
    },
    "full": {
        "throughput": 200_000,
        "memory": (100_000, 1_000_000),
        "snapshot_keys": 100_000,
        "eventsourcing": 50_000,
    },
}


@contextmanager
def postgres_database() -> Iterator[str]:
    """A scratch PostgreSQL database for one benchmark (ESKIT_TEST_POSTGRES_URL's
    server, as the tests), dropped afterwards."""
    with scratch_database(postgres_admin_url(), "eskit_bench") as url:
        yield url


def throughput_postgres(scale: str) -> dict[str, Any]:
    from bench.throughput import measure

    with postgres_database() as url:
        result = measure(url, SIZES[scale]["throughput"])
    return {**result, "goal": "ratio >= 0.8", "met": result["ratio"] >= 0.8}


def throughput_sqlite(scale: str) -> dict[str, Any]:
    from bench.throughput import measure

    with tempfile.TemporaryDirectory() as tmp:
        result = measure(f"sqlite:///{tmp}/bench.db", SIZES[scale]["throughput"])
    return {**result, "goal": "ratio >= 0.8", "met": result["ratio"] >= 0.8}


def memory(scale: str) -> dict[str, Any]:
    from bench.memory import measure

    small, large = SIZES[scale]["memory"]
    with postgres_database() as url:
        return measure(url, small, large)


def snapshot_load(scale: str) -> dict[str, Any]:
    from bench.snapshot_load import measure

    with postgres_database() as url:
        result = measure(url, SIZES[scale]["snapshot_keys"])
    # The guards (hash, marker, strict decode) may cost a load at most a third more.
    return {**result, "goal": "ratio >= 0.75", "met": result["ratio"] >= 0.75}


#: ApplicationCompactor must be at least as fast as take_snapshot + DELETE, although it
#: does what that path does not: it checks the versions are contiguous, decodes the
#: snapshot back and compares it strictly with the replay, replays the tail on it, reads
#: it back byte for byte, deletes exactly C - P rows under a fencing token, checks the
#: followers and the guard, and writes an audit row. It pays for that by reading the
#: events once (a server-side cursor on PostgreSQL), decoding each once, and folding
#: with a plain check that each event has `mutate` where the library asserts
#: `isinstance(event, CanMutateProtocol)` (a runtime Protocol check) per event.
ES_GOAL = 1.0


def eventsourcing_postgres(scale: str) -> dict[str, Any]:
    from bench.eventsourcing import measure

    with postgres_database() as url:
        result = measure(url, SIZES[scale]["eventsourcing"])
    return {**result, "goal": f"ratio >= {ES_GOAL}", "met": result["ratio"] >= ES_GOAL}


def eventsourcing_sqlite(scale: str) -> dict[str, Any]:
    from bench.eventsourcing import measure

    result = measure(None, SIZES[scale]["eventsourcing"])
    return {**result, "goal": f"ratio >= {ES_GOAL}", "met": result["ratio"] >= ES_GOAL}


def fleet(scale: str) -> dict[str, Any]:
    from bench import fleet as module

    return module.run(scale)


def fanout(scale: str) -> dict[str, Any]:
    from bench import fanout as module

    return module.run(scale)


BENCHMARKS: dict[str, Callable[[str], dict[str, Any]]] = {
    "throughput-postgres": throughput_postgres,
    "throughput-sqlite": throughput_sqlite,
    "memory": memory,
    "snapshot-load": snapshot_load,
    "fleet": fleet,
    "fanout": fanout,
    "eventsourcing-postgres": eventsourcing_postgres,
    "eventsourcing-sqlite": eventsourcing_sqlite,
}


#: The benchmarks that run without a PostgreSQL server.
WITHOUT_POSTGRES = {"throughput-sqlite", "eventsourcing-sqlite"}


def headline(name: str, r: dict[str, Any]) -> tuple[str, str, str]:
    """(what was measured, ours vs baseline, ratio) for the table."""
    if name.startswith("throughput"):
        return (
            f"{r['events']:,} events, {r['backend']}",
            f"{r['ours_events_per_s']:,} vs {r['raw_events_per_s']:,} events/s (raw driver)",
            f"{r['ratio']:.2f}",
        )
    if name == "memory":
        return (
            f"{r['large']['events']:,} vs {r['small']['events']:,} events",
            f"peak {r['large']['peak_mb']} MB vs {r['small']['peak_mb']} MB",
            f"{r['ratio']:.2f}",
        )
    return (r.get("what", name), r.get("summary", ""), f"{r.get('ratio', float('nan')):.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--scale", choices=sorted(SIZES), default="full")
    parser.add_argument(
        "--only",
        action="append",
        choices=sorted(BENCHMARKS),
        help="run only this benchmark (repeatable)",
    )
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "latest.json")
    args = parser.parse_args(argv)
    console = Console()
    names = args.only or list(BENCHMARKS)
    if set(names) - WITHOUT_POSTGRES:
        problem = postgres_problem(postgres_admin_url(), purpose="the benchmarks")
        if problem is not None:
            print(f"bench: cannot start: {problem}", file=sys.stderr)
            return 3
    results: dict[str, Any] = {}
    for name in names:
        started = time.perf_counter()
        console.print(f"running {name} ({args.scale}) ...")
        results[name] = BENCHMARKS[name](args.scale)
        results[name]["wall_s"] = round(time.perf_counter() - started, 1)
    table = Table(title=f"eskit-tasks benchmarks ({args.scale})")
    for column in ("benchmark", "measured", "ours vs baseline", "ratio", "goal", "met"):
        table.add_column(column)
    for name, r in results.items():
        what, versus, ratio = headline(name, r)
        met = "yes" if r.get("met") else "NO"
        if args.scale != "full":
            met = "n/a"  # goals are for the full sizes; tiny runs only prove the code works
        table.add_row(name, what, versus, ratio, r.get("goal", ""), met)
    console.print(table)
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "scale": args.scale,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "results": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, default=str))
    console.print(f"written {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
