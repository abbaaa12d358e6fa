"""The soak's report: what was done, what was injected, what the checker found."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


@dataclass
class Report:
    seed: int
    config: dict[str, Any] = field(default_factory=dict)
    workload_s: float = 0.0
    total_s: float = 0.0
    #: appends, appended_events, reads, stale_appends_rejected, ambiguous appends,
    #: fan-outs by kind, runs by status, database checks, observations checked...
    operations: dict[str, int] = field(default_factory=dict)
    #: Errors the workload met and tolerated (terminated connections...), by type.
    errors: dict[str, int] = field(default_factory=dict)
    faults: dict[str, int] = field(default_factory=dict)
    fault_schedule: list[dict[str, Any]] = field(default_factory=list)
    fault_log: list[str] = field(default_factory=list)
    #: Every compaction attempt, by outcome (the workers' JSON log lines).
    compactions: dict[str, int] = field(default_factory=dict)
    #: The stored result of every compact_stream task and of each stream of every
    #: compact_batch, by outcome (result backend).
    task_results: dict[str, int] = field(default_factory=dict)
    #: Outcomes summed over the runs that finished (run progress).
    run_outcomes: dict[str, int] = field(default_factory=dict)
    #: Per bad-input stream, its attempts by outcome.
    bad_input: dict[str, dict[str, int]] = field(default_factory=dict)
    #: Per stream type, its attempts by outcome (the workers' JSON log lines).
    compactions_by_type: dict[str, dict[str, int]] = field(default_factory=dict)
    #: Per stream type, its deletions (audit rows), the events they deleted and how many
    #: of its streams were compacted at least once.
    deletions_by_type: dict[str, dict[str, int]] = field(default_factory=dict)
    audit_rows: int = 0
    events_deleted: int = 0
    #: Deletions no compacted result or log line reported (a worker died or lost its
    #: connection between the commit and the report): allowed, counted.
    unreported_deletions: int = 0
    #: Attempts that reported failed (database unreachable) although their deletion had
    #: committed (the connection died before the commit's answer): allowed, counted.
    unacknowledged_commits: int = 0
    #: Attempts (fenced, failed) of a task whose retry, with the same compaction_id,
    #: deleted: allowed, counted.
    superseded_attempts: int = 0
    #: The projection (a consumer that lags and catches up): events seen (each exactly
    #: once), streams, pages, checkpoints saved, pauses, seconds paused, the largest
    #: catch-up, events read after the final check (none expected).
    projection: dict[str, Any] = field(default_factory=dict)
    #: Compaction results (task results) the projection's checkpoint held back: cut
    #: short (``limited``), entirely (``held``), and the events they kept that their
    #: policy would have deleted (``events``).
    held_back: dict[str, int] = field(default_factory=dict)
    #: Restores: attempted, restored (events, compactions undone), refused (the stream was
    #: compacted again meanwhile), and what was checked after them.
    restores: dict[str, int] = field(default_factory=dict)
    #: The trash bin at the end: archive entries read back and checked, their events.
    archive: dict[str, int] = field(default_factory=dict)
    #: The pyeventsourcing application (tests/soak/esapp.py): purses, saves and events
    #: appended, loads, compactions of its purses (audit rows) and events deleted,
    #: attempts by outcome, stale saves refused (during the run, and after the final
    #: run), the follower's events and pauses, errors tolerated.
    application: dict[str, Any] = field(default_factory=dict)
    final_run: dict[str, Any] = field(default_factory=dict)
    #: Every run started: policy, status, timings, outcomes (JSON only).
    runs: list[dict[str, Any]] = field(default_factory=list)
    violation_count: int = 0
    violations_by_kind: dict[str, int] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    logs: str | None = None

    @property
    def ok(self) -> bool:
        return self.violation_count == 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False)

    @classmethod
    def from_json(cls, text: str) -> Report:
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def _application_lines(self) -> list[str]:
        app = self.application
        if not app:
            return []
        held = app.get("held_back", {})
        return [
            "pyeventsourcing application (SQLite) and its follower",
            f"  appends              {app.get('appends', 0)} saves "
            f"({app.get('appended_events', 0)} deposits; {app.get('events', 0)} events in "
            f"{app.get('purses', 0)} purses), {app.get('reads', 0)} loads checked "
            f"({app.get('load_raced', 0)} raced by a compaction, retried)",
            f"  compactions          {app.get('compactions', 0)} deleted events "
            f"({app.get('compactions_in_workload', 0)} during the workload; "
            f"{app.get('events_deleted', 0)} events, {app.get('purses_compacted', 0)} purses)",
            f"  attempts             {_pairs(app.get('attempts', {})) or 'none'}",
            f"  stale saves refused  {app.get('stale_refused', 0)} "
            f"({app.get('stale_refused_at_end', 0)} of them after the final run; "
            f"{app.get('stale_not_passed', 0)} copies never passed)",
            f"  follower             {app.get('follower_events', 0)} events, each once "
            f"({app.get('follower_pauses', 0)} pauses; held compactions back: "
            f"{held.get('limited', 0)} cut short, {held.get('held', 0)} entirely)",
            f"  tolerated errors     {_pairs(app.get('errors', {})) or 'none'}",
        ]

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n")

    def text(self) -> str:
        ops = self.operations
        lines = [
            f"eskit-tasks soak: seed {self.seed}, {self.workload_s:.0f} s of workload, "
            f"{self.total_s:.0f} s in all",
            "",
            "operations",
            f"  appends              {ops.get('appends', 0)} "
            f"({ops.get('appended_events', 0)} events; unknown outcome resolved: "
            f"{ops.get('ambiguous_appends_committed', 0)} committed, "
            f"{ops.get('ambiguous_appends_lost', 0)} not)",
            f"  stale appends        {ops.get('stale_appends_rejected', 0)} rejected "
            "(ConcurrencyError)",
            f"  reads (load_state)   {ops.get('reads', 0)}",
            f"  fan-outs             {_pairs(_prefixed(ops, 'fanouts:'))} "
            f"(not started while busy: {ops.get('fanouts_skipped_busy', 0)})",
            f"  runs                 {_pairs(_prefixed(ops, 'runs:'))}",
            f"  compactions          {sum(self.compactions.values())} attempts, "
            f"{self.audit_rows} deletions ({self.events_deleted} events)",
            f"  checks               {ops.get('db_checks', 0)} database checks, "
            f"{ops.get('observations', 0)} observed states",
            f"  tolerated errors     {_pairs(self.errors) or 'none'}",
            "",
            f"faults injected        {_pairs(self.faults) or 'none'}",
            *(f"  {line}" for line in self.fault_log),
            "",
            "compactions by outcome",
            f"  attempts (logs)      {_pairs(self.compactions)}",
            f"  task results         {_pairs(self.task_results)}",
            f"  finished runs        {_pairs(self.run_outcomes)}",
            f"  deletions unreported {self.unreported_deletions} (no compacted log line), "
            f"{self.unacknowledged_commits} reported failed (commit answer lost)",
            f"  superseded attempts  {self.superseded_attempts} (fenced or failed, then "
            "retried under the same compaction id, which deleted)",
            "",
            "by stream type (attempts by outcome; deletions)",
            *(
                f"  {stype:20} {_pairs(by)}; {_pairs(self.deletions_by_type.get(stype, {}))}"
                for stype, by in self.compactions_by_type.items()
            ),
            "",
            "consumer and trash bin",
            f"  projection           {self.projection.get('events', 0)} events in "
            f"{self.projection.get('streams', 0)} streams "
            f"({self.projection.get('pages', 0)} pages, "
            f"{self.projection.get('checkpoints', 0)} checkpoints saved; "
            f"{self.projection.get('pauses', 0)} pauses, "
            f"{self.projection.get('paused_s', 0)} s in all, largest catch-up "
            f"{self.projection.get('max_catch_up', 0)} events)",
            f"  held back by it      {self.held_back.get('limited', 0)} compactions cut short, "
            f"{self.held_back.get('held', 0)} held back entirely "
            f"({self.held_back.get('events', 0)} events kept that the policy would delete)",
            f"  restores             {self.restores.get('attempted', 0)} attempted: "
            f"{self.restores.get('restored', 0)} restored "
            f"({self.restores.get('events', 0)} events, "
            f"{self.restores.get('compactions_undone', 0)} compactions undone), "
            f"{self.restores.get('refused', 0)} refused (compacted again meanwhile); "
            f"{self.restores.get('loads', 0)} replays checked, "
            f"{self.restores.get('compacted_before_check', 0)} compacted again before "
            "their check",
            f"  raced by compactions {_pairs(_prefixed(self.restores, 'race_')) or 'none'}",
            f"  archive              {self.archive.get('entries', 0)} entries read back "
            f"({self.archive.get('events', 0)} events), "
            f"{self.archive.get('restored_rows', 0)} audit rows restored",
            "",
            *self._application_lines(),
            "",
            "bad input (attempts by outcome; each finished run reported them: "
            f"{ops.get('bad_input_checks', 0)} checks)",
            *(f"  {stream:20} {_pairs(by)}" for stream, by in self.bad_input.items()),
            "",
            f"final run              {_pairs(self.final_run)}",
        ]
        if self.notes:
            lines += ["", "notes", *(f"  {n}" for n in self.notes)]
        lines += ["", f"invariant violations   {self.violation_count}"]
        lines += [f"  {kind}: {n}" for kind, n in self.violations_by_kind.items()]
        lines += [f"  {v}" for v in self.violations]
        if self.logs:
            lines.append(f"logs kept in {self.logs}")
        return "\n".join(lines)


def _prefixed(values: dict[str, int], prefix: str) -> dict[str, int]:
    return {k[len(prefix) :]: v for k, v in values.items() if k.startswith(prefix)}


def _pairs(values: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in values.items())
