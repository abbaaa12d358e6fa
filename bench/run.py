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
        "throughput": (3_000,),
        "memory": (2_000, 20_000),
        "snapshot_keys": 2_000,
        "eventsourcing": 1_000,
        "writer_wait": 3_000,
    },
    "full": {
        "throughput": (50_000, 200_000),
        "memory": (100_000, 1_000_000),
        "snapshot_keys": 100_000,
        "eventsourcing": 50_000,
        "writer_wait": 1_000_000,
    },
}


@contextmanager
def postgres_database() -> Iterator[str]:
    """A scratch PostgreSQL database for one benchmark (ESKIT_TEST_POSTGRES_URL's
    server, as the tests), dropped afterwards."""
    with scratch_database(postgres_admin_url(), "eskit_bench") as url:
        yield url


#: Ours over the lean loop (and the pipelined one, PostgreSQL only) at every size.
THROUGHPUT_GOALS = {"postgresql": (1.0, 0.85), "sqlite": (0.9, None)}


def _throughput(url: str, scale: str) -> dict[str, Any]:
    from bench.throughput import measure

    result = measure(url, SIZES[scale]["throughput"])
    lean, pipelined = THROUGHPUT_GOALS[result["backend"]]
    goal = f"vs lean >= {lean}" + (f", vs pipelined >= {pipelined}" if pipelined else "")
    met = result["ratio"] >= lean and (pipelined is None or result["ratio_pipelined"] >= pipelined)
    return {**result, "goal": goal, "met": met}


def throughput_postgres(scale: str) -> dict[str, Any]:
    with postgres_database() as url:
        return _throughput(url, scale)


def throughput_sqlite(scale: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        return _throughput(f"sqlite:///{tmp}/bench.db", scale)


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


def writer_wait(scale: str) -> dict[str, Any]:
    from bench import writer_wait as module

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
    "writer-wait": writer_wait,
}


#: The benchmarks that run without a PostgreSQL server.
WITHOUT_POSTGRES = {"throughput-sqlite", "eventsourcing-sqlite"}


def headline(name: str, r: dict[str, Any]) -> tuple[str, str, str]:
    """(what was measured, ours vs baseline, ratio) for the table."""
    if name.startswith("throughput"):
        sizes = r["sizes"]
        return (
            ", ".join(f"{s['events']:,}" for s in sizes) + f" events, {r['backend']}",
            "; ".join(
                f"{s['events_per_s']['ours']:,} vs {s['events_per_s']['lean']:,} lean, "
                f"{s['events_per_s']['pipelined']:,} pipelined events/s"
                for s in sizes
            ),
            f"{r['ratio']:.2f} lean, {r['ratio_pipelined']:.2f} pipelined",
        )
    if name == "memory":
        return (
            f"{r['large']['events']:,} vs {r['small']['events']:,} events",
            f"peak {r['large']['peak_mb']} MB vs {r['small']['peak_mb']} MB",
            f"{r['ratio']:.2f}",
        )
    if name == "writer-wait":
        during, alone = r["during_compaction"], r["without_compaction"]
        return (
            f"append every {r['interval_ms']:g} ms while {r['events']:,} events are compacted",
            f"append max {during['max_ms']} ms (p50 {during['p50_ms']}, p99 {during['p99_ms']})"
            f" vs max {alone['max_ms']} ms (p50 {alone['p50_ms']}, p99 {alone['p99_ms']})"
            " without",
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
