"""What the commands print: tables, summaries, progress bars and JSON. No work here.

Human output goes to standard output as rich tables; ``--json`` prints one JSON
document instead. Progress bars go to standard error, only on a terminal.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from rich.box import HEAVY_HEAD, SIMPLE_HEAD, Box
from rich.console import Console
from rich.measure import Measurement
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from eskit_tasks.core.verify import MAX_PROBLEMS, SnapshotReport
from eskit_tasks.domain.result import CompactionResult, Outcome
from eskit_tasks.domain.space import ReclaimReport
from eskit_tasks.ports import Candidate, CompactionRecord
from eskit_tasks.stores.sql_runs import RunRecord

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

#: The columns of verify-snapshots' table, one per kind of problem.
PROBLEM_KINDS = ("integrity", "schema", "unregistered", "missing")
#: Failing snapshots printed in full by verify-snapshots (the rest are counted).
SHOWN_PROBLEMS = 20


def emit_json(value: Any) -> None:
    out.print_json(json.dumps(value, default=str))


def emit_json_line(value: Any) -> None:
    """One JSON document on one line, flushed: a line of a JSON-lines stream (compact-all
    --json), readable while the run goes on."""
    out.file.write(json.dumps(value, default=str, separators=(",", ":")) + "\n")
    out.file.flush()


def emit_result_line(r: CompactionResult) -> None:
    """One stream's result, as a line of compact-all --json."""
    emit_json_line(r.model_dump(mode="json"))


def emit_summary_line(totals: dict[str, Any]) -> None:
    """The last line of compact-all --json: the run's totals, marked ``"summary": true``."""
    emit_json_line({"summary": True, **totals})


#: What a progress bar says a run is doing.
COMPACTING = "compacting"
DRY_RUN = "planning (dry run)"


def work_label(dry_run: bool) -> str:
    """A progress bar's description: a dry run plans and deletes nothing."""
    return DRY_RUN if dry_run else COMPACTING


class RateColumn(ProgressColumn):
    """Streams a second since the bar started, and the time left when the total is
    known: ``12.5 streams/s, ETA 0:01:20``."""

    def render(self, task: Task) -> Text:
        elapsed = task.elapsed or 0.0
        if elapsed <= 0 or not task.completed:
            return Text("")
        rate = task.completed / elapsed
        shown = f"{rate:,.1f} streams/s"
        if task.total is not None and task.total >= task.completed:
            left = timedelta(seconds=round((task.total - task.completed) / rate))
            shown += f", ETA {left}"
        return Text(shown)


def progress_bar(
    quiet: bool, *, console: Console | None = None, clock: Callable[[], float] | None = None
) -> Progress:
    """A progress bar on standard error; silent with ``--json`` or off a terminal.

    Args:
        quiet: Show nothing.
        console: Where to draw (default: standard error).
        clock: Seconds, for the rate (default: rich's monotonic clock).
    """
    console = console or err
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        RateColumn(),
        console=console,
        disable=quiet or not console.is_terminal,
        transient=True,
        get_time=clock,
    )


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover -- the loop returns at GiB


@dataclass
class CandidateTally:
    """How many candidates a listing found, and their live events, beyond those shown."""

    streams: int = 0
    live_events: int = 0

    def add(self, c: Candidate) -> None:
        self.streams += 1
        self.live_events += c.live_events


def print_candidates(found: Sequence[Candidate], json_: bool, tally: CandidateTally) -> None:
    """The candidates shown (``--limit``), and a total line of all found. ``--json``
    prints the shown ones as a list, as it always has (scripts index it)."""
    if json_:
        emit_json(
            [
                {
                    "stream_type": c.stream_type,
                    "stream_id": c.stream_id,
                    "live_events": c.live_events,
                }
                for c in found
            ]
        )
        return
    table = Table("stream type", "stream id", "live events", title=f"{tally.streams:,} candidates")
    for c in found:
        table.add_row(c.stream_type, c.stream_id, f"{c.live_events:,}")
    out.print(table)
    shown = f" (showing {len(found):,}: --limit)" if len(found) < tally.streams else ""
    out.print(
        f"total: {tally.streams:,} streams, {tally.live_events:,} live events{shown}",
        markup=False,
    )


#: The audit log's columns, in order, as the full table and the piped lines show them.
LOG_COLUMNS = (
    "when",
    "stream",
    "versions",
    "deleted",
    "bytes",
    "head",
    "state hash",
    "compaction id",
    "trash bin",
)
#: The columns a terminal too narrow for all of them shows (--json, a wider terminal or
#: a pipe give the rest).
NARROW_LOG_COLUMNS = ("when", "stream", "versions", "deleted", "trash bin")


def print_log(rows: Sequence[CompactionRecord], json_: bool) -> None:
    """The audit log: a table on a terminal (fewer columns, none cut, when it is
    narrow); piped, one tab-separated line per compaction with full values."""
    if json_:
        emit_json([{name: getattr(r, name) for name in r.__slots__} for r in rows])
        return
    if not out.is_terminal:  # written as they are: rich would expand the tabs
        lines = ["\t".join(LOG_COLUMNS)]
        lines += ["\t".join(_escaped(v) for v in _log_values(r, full=True)) for r in rows]
        out.file.write("".join(f"{line}\n" for line in lines))
        return
    table = _log_table(rows, LOG_COLUMNS)
    unbounded = out.options.update_width(1_000_000)
    if Measurement.get(out, unbounded, table).maximum > out.width:
        table = _log_table(rows, NARROW_LOG_COLUMNS, box=SIMPLE_HEAD)
        table.caption = "more columns: a wider terminal, --json, or piped"
    out.print(table)


def _escaped(value: str) -> str:
    """A value on one tab-separated line: its backslashes, tabs and newlines escaped."""
    return value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")


def _log_table(
    rows: Sequence[CompactionRecord], columns: Sequence[str], box: Box = HEAVY_HEAD
) -> Table:
    table = Table(title=f"{len(rows)} compactions", box=box)
    for name in columns:  # only the stream (type and id are data: any length) wraps
        wraps = name == "stream"
        table.add_column(name, overflow="fold", no_wrap=not wraps, min_width=16 if wraps else None)
    for r in rows:
        values = dict(zip(LOG_COLUMNS, _log_values(r, full=False), strict=True))
        table.add_row(*(Text(values[name]) for name in columns))  # ids are data, not markup
    return table


def _log_values(r: CompactionRecord, *, full: bool) -> list[str]:
    """A compaction's cells; ``full``: exact time, whole hash, plain numbers (for a pipe)."""
    return [
        r.compacted_at.isoformat() if full else r.compacted_at.strftime("%Y-%m-%d %H:%M:%S"),
        f"{r.stream_type}/{r.stream_id}",
        f"{r.from_version}..{r.through_version}",
        str(r.events_deleted) if full else f"{r.events_deleted:,}",
        str(r.bytes_reclaimed) if full else f"{r.bytes_reclaimed:,}",
        str(r.head_version),
        r.state_hash if full else r.state_hash[:12],
        r.compaction_id,
        _trash_bin(r),
    ]


def _trash_bin(r: CompactionRecord) -> str:
    """Whether a deletion can be undone: archived, restored already, or neither."""
    if r.restored_at is not None:
        return f"restored {r.restored_at:%Y-%m-%d %H:%M}"
    return "archived" if r.archive_uri is not None else "-"


def print_result(r: CompactionResult, json_: bool) -> None:
    if json_:
        emit_json(r.model_dump(mode="json"))
        return
    colour = "green" if r.ok else "red"
    out.print(f"[{colour}]{r.outcome.value}[/{colour}] {r.stream_type}/{r.stream_id}")
    table = Table(show_header=False)
    table.add_row("head version", str(r.head_version))
    table.add_row("snapshot version", str(r.snapshot_version or "-"))
    table.add_row("events deleted", f"{r.events_deleted:,}")
    table.add_row("events retained", f"{r.events_retained:,}")
    table.add_row("bytes reclaimed", human_bytes(r.bytes_reclaimed))
    table.add_row("duration", f"{r.duration_ms:.1f} ms")
    table.add_row("compaction id", r.compaction_id)
    if r.held_back_by is not None:
        held = r.held_back_by
        table.add_row("held back by", f"consumer {held.consumer} at position {held.position:,}")
    if r.archive_uri is not None:
        table.add_row("archived to", r.archive_uri)
    out.print(table)
    if r.error:
        out.print(f"error: {r.error}")


@dataclass
class RunTotals:
    """The totals of compactions run in this process, added a result at a time: a long
    ``compact-all --local`` keeps no list of its results."""

    streams: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    events_deleted: int = 0
    bytes_reclaimed: int = 0
    dry_run_events: int = 0
    dry_run_bytes: int = 0
    failed_streams: list[dict[str, Any]] = field(default_factory=list)
    #: Events deleted per stream type by the compactions that committed (not recovered).
    deleted_by_type: dict[str, int] = field(default_factory=dict)

    def add(self, r: CompactionResult) -> None:
        self.streams += 1
        self.outcomes[r.outcome.value] = self.outcomes.get(r.outcome.value, 0) + 1
        if r.outcome == Outcome.COMPACTED:
            self.events_deleted += r.events_deleted
            self.bytes_reclaimed += r.bytes_reclaimed
            if r.events_deleted and not r.recovered:
                by_type = self.deleted_by_type
                by_type[r.stream_type] = by_type.get(r.stream_type, 0) + r.events_deleted
        elif r.outcome == Outcome.DRY_RUN:
            self.dry_run_events += r.events_deleted
            self.dry_run_bytes += r.bytes_reclaimed
        if not r.ok:
            self.failed_streams.append(
                {
                    "stream_type": r.stream_type,
                    "stream_id": r.stream_id,
                    "outcome": r.outcome.value,
                    "error": r.error,
                }
            )

    @property
    def ok(self) -> bool:
        """No stream needs attention."""
        return not self.failed_streams


def report_results(
    totals: RunTotals,
    elapsed: float,
    json_: bool,
    extra: dict[str, Any] | None = None,
    *,
    json_lines: bool = False,
) -> None:
    """The totals of compactions run in this process, as a table or JSON (``json_lines``:
    as the summary line that ends compact-all --json)."""
    shown = {
        "streams": totals.streams,
        "outcomes": totals.outcomes,
        "events_deleted": totals.events_deleted,
        "bytes_reclaimed": totals.bytes_reclaimed,
        "dry_run_events": totals.dry_run_events,
        "dry_run_bytes": totals.dry_run_bytes,
        "elapsed_s": round(elapsed, 3),
        "failed_streams": totals.failed_streams,
        **(extra or {}),
    }
    if json_ and json_lines:
        emit_summary_line(shown)
    elif json_:
        emit_json(shown)
    else:
        summary_table(shown)


def summary_table(t: dict[str, Any]) -> None:
    outcomes = t["outcomes"]
    table = Table(title="summary", show_header=False)
    table.add_row("streams compacted", f"{outcomes.get('compacted', 0):,}")
    if outcomes.get("dry_run"):
        table.add_row("streams verified (dry run)", f"{outcomes['dry_run']:,}")
    table.add_row("nothing to do", f"{outcomes.get('nothing_to_compact', 0):,}")
    failed = sum(outcomes.get(o.value, 0) for o in Outcome if o.needs_attention)
    table.add_row("failed", f"{failed:,}")
    table.add_row("events deleted", f"{t['events_deleted']:,}")
    # An estimate of the deleted rows' size, not disk given back: see the reclaim rows.
    table.add_row("deleted event data (est.)", human_bytes(t["bytes_reclaimed"]))
    if t.get("dry_run_events"):
        table.add_row(
            "would delete (dry run)",
            f"{t['dry_run_events']:,} events, {human_bytes(t['dry_run_bytes'])}",
        )
    table.add_row("time", f"{t['elapsed_s']:.2f}s")
    for name, line in reclaim_lines(t.get("reclaim")):
        table.add_row(name, line)
    out.print(table)
    for f in t["failed_streams"]:
        out.print(f"[red]{f['outcome']}[/red] {f['stream_type']}/{f['stream_id']}: {f['error']}")


def reclaim_lines(reclaim: dict[str, Any] | None) -> list[tuple[str, str]]:
    """Rows for what a run's finishing step reclaimed (measured sizes)."""
    if not reclaim:
        return []
    if "error" in reclaim:
        return [("reclaim", f"failed: {reclaim['error']}")]
    parts = [("store", reclaim.get("store"))]
    parts += [(f"app {name}", r) for name, r in sorted(reclaim.get("applications", {}).items())]
    return [(f"disk: {name}", describe_reclaim(r)) for name, r in parts if r is not None]


def describe_reclaim(r: dict[str, Any]) -> str:
    """One reclaim report (its JSON) in a line: sizes before and after, free space."""
    if "error" in r:
        return f"failed: {r['error']}"
    line = (
        f"{r['mode']}: {human_bytes(r['total_bytes_before'])} -> "
        f"{human_bytes(r['total_bytes_after'])}"
    )
    if r.get("reusable_bytes") is not None:
        line += f", free in tables {human_bytes(r['free_bytes_after'])}"
    if r.get("note"):
        line += f" ({r['note']})"
    return line


def print_runs(found: Sequence[RunRecord], json_: bool) -> None:
    """Recent runs, newest first."""
    if json_:
        emit_json([{**r.model_dump(mode="json"), "state": r.state} for r in found])
        return
    table = Table(title=f"{len(found)} runs", show_lines=False)
    for name in ("run", "trigger", "started (UTC)", "state", "streams", "deleted", "disk"):
        table.add_column(name, overflow="fold")
    for r in found:
        outcomes = ", ".join(f"{k} {v:,}" for k, v in sorted(r.outcomes.items()))
        table.add_row(
            r.run_id,
            r.trigger,
            r.started_at.strftime("%Y-%m-%d %H:%M:%S"),
            r.state if r.finished_at is None else f"{r.state} in {_took(r)}",
            f"{r.done:,}/{r.candidates:,}" + (f" ({outcomes})" if outcomes else ""),
            f"{r.events_deleted:,}",
            _disk(r.reclaim),
        )
    out.print(table)
    if any(r.finished_at is None for r in found):
        out.print("running runs: live progress with `eskit-tasks status RUN_ID`", highlight=False)


def _took(r: RunRecord) -> str:
    assert r.finished_at is not None
    return f"{(r.finished_at - r.started_at).total_seconds():.1f}s"


def _disk(reclaim: dict[str, Any] | None) -> str:
    """What a run's end gave back, measured: the store's files shrink, free space."""
    if not reclaim:
        return "-"
    if "error" in reclaim:
        return "reclaim failed"
    parts = []
    for name, r in [
        ("store", reclaim.get("store")),
        *sorted(reclaim.get("applications", {}).items()),
    ]:
        if r is None:
            continue
        if "error" in r:
            parts.append(f"{name}: failed")
            continue
        line = f"{name}: -{human_bytes(max(r['shrunk_bytes'], 0))}"
        if r.get("reusable_bytes"):
            line += f", +{human_bytes(r['reusable_bytes'])} free"
        parts.append(line)
    return "; ".join(parts) or "-"


def print_reclaim(name: str, r: ReclaimReport) -> None:
    """One reclaim's measured sizes, before and after."""
    table = Table(title=f"{name}: {r.mode} ({r.duration_s:.1f}s)")
    table.add_column("table")
    table.add_column("size before", justify="right")
    table.add_column("size after", justify="right")
    table.add_column("free before", justify="right")
    table.add_column("free after", justify="right")

    def free(n: int | None) -> str:
        return "-" if n is None else human_bytes(n)

    for before, after in zip(r.before.tables, r.after.tables, strict=True):
        table.add_row(
            before.table,
            human_bytes(before.total_bytes),
            human_bytes(after.total_bytes),
            free(before.free_bytes),
            free(after.free_bytes),
        )
    out.print(table)
    out.print(f"{human_bytes(r.shrunk_bytes)} smaller on disk", highlight=False)
    if r.note:
        out.print(f"note: {r.note}", highlight=False)


def print_summary(summary: Any, json_: bool) -> None:
    """A fleet run's :class:`~eskit_tasks.fleet.runs.RunSummary`."""
    totals = summary.model_dump(mode="json")
    if json_:
        emit_json(totals)
        return
    state = "finished" if summary.finished else summary.state
    if not summary.finished and summary.error is None and summary.done >= summary.candidates:
        state = "finishing"
    if summary.finished and summary.state == "cancelled":
        state = "finished (cancelled)"
    out.print(f"run {summary.run_id}: {state}, {summary.done} of {summary.candidates} streams done")
    if summary.error:
        out.print(f"[red]run error:[/red] {summary.error}")
    totals["failed_streams"] = [f.model_dump() for f in summary.failed_streams]
    summary_table(totals)


def print_snapshot_report(report: SnapshotReport, json_: bool) -> None:
    if json_:
        emit_json(report.to_json())
        return
    table = Table(
        "stream type",
        "snapshots",
        "failed",
        "integrity",
        "schema",
        "unregistered",
        "missing",
        title=f"{report.checked:,} snapshots checked, {report.failed:,} cannot be used",
    )
    for stream_type, tally in sorted(report.by_type.items()):
        table.add_row(
            stream_type,
            f"{tally.checked:,}",
            f"{tally.failures:,}",
            *(f"{tally.failed.get(kind, 0):,}" for kind in PROBLEM_KINDS),
        )
    out.print(table)
    for p in report.problems[:SHOWN_PROBLEMS]:
        out.print(f"{p.kind}: {p.error}", markup=False)
    if report.failed > SHOWN_PROBLEMS:
        out.print(
            f"... and {report.failed - SHOWN_PROBLEMS:,} more (--json lists up to {MAX_PROBLEMS:,})"
        )
    if report.failed:
        out.print(
            "Do not deploy until these load: register upcasters for the old schemas, or "
            "keep the old state type (see docs/snapshots.md, 'State schemas and upcasters')."
        )
