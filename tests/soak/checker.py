"""The invariant checker: the database (read in one consistent snapshot) against the model,
and every compaction result against the audit table.

Per stream, in one REPEATABLE READ transaction:

* the live events are exactly ``compacted_through+1 .. head`` (nothing lost, no gap);
* the head is at least what the writer had acknowledged before the snapshot (at the
  end: exactly that);
* the audit rows (eskit_compaction_log) tile ``1 .. compacted_through`` without overlap
  or gap, each with ``events_deleted = through - from + 1`` and its snapshot version;
* if anything was deleted, a verified snapshot exists at or above ``compacted_through``,
  and every verified snapshot's state is a state the model had at that version, by the
  strict comparison (:func:`eskit_tasks.domain.compare.first_difference`: decoded as the
  stream kind's state type, and as stored JSON; see model.py);
* bad-input streams were never compacted and keep every event;
* every deletion was archived first (its audit row names an entry and its checksum);
  rows marked restored no longer count towards ``compacted_through``.

And every result (task results from the Celery result backend, attempts from the
workers' JSON log lines): ``compacted`` only with an audit row of that compaction_id
for that stream and range; any other outcome with no audit row, unless that row was
written by another attempt of the same task (the fleet derives the compaction_id from
the task id, so a retried task's attempts share it; a compaction_id deletes once).

The consumer and the trash bin (tests/soak/consumers.py):

* the projection saw every event exactly once: no position twice, and per stream the
  versions 1..head, each once and in order, although compactions ran all along (the
  gate keeps every event above its checkpoint) and restores put events back below it;
* every archived event (everything any compaction deleted) is one the projection had
  seen, at the same position and with the same payload, which is what the writer
  appended; a result held back by the projection names a checkpoint it saved, and its
  deletion stayed at or below it;
* a restored stream holds versions 1..head again, the restored ones at the positions
  the projection saw them at (so it does not receive them again), and replays to the
  model's state.

The pyeventsourcing application (tests/soak/esapp.py), in its own SQLite file:

* each purse, loaded by a fresh instance of the application, is the object its writer
  last saved, by the strict comparison; its live events are exactly ``point+1 .. head``,
  its audit rows tile ``1..point``, its one snapshot is at the point;
* the follower processed every event exactly once, in order; each deletion's newest
  event was processed before the deletion committed, and a result held back by the
  follower names a position it reached and deleted nothing beyond it;
* (the writer, during the run) every stale save below a compaction point is refused.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from itertools import pairwise
from typing import Any
from uuid import UUID

import psycopg

from eskit_tasks.domain.compare import first_difference
from eskit_tasks.eventsourcing.guard import TRIGGER
from eskit_tasks.ports import ArchivedEvent
from tests.soak.esapp import (
    APP_NAME,
    FOLLOWER_NAME,
    Processed,
    compaction_log_rows,
    compaction_points,
    read_sqlite,
    state_of,
)
from tests.soak.model import (
    BAD_KINDS,
    BAD_OUTCOMES,
    BAD_RESULTS,
    PROJECTION,
    TRANSIENT_ERRORS,
    Model,
    Observation,
    ProjectionModel,
    StreamModel,
    Violations,
    appended_data,
    fingerprint,
)

#: At most this many versions are named in one message.
NAMED = 5


@dataclass(frozen=True)
class StreamRow:
    pk: int
    stream_type: str
    stream_id: str
    head: int
    compacted_through: int


@dataclass(frozen=True)
class AuditRow:
    compaction_id: str
    stream_pk: int
    stream_type: str
    stream_id: str
    from_version: int
    through_version: int
    snapshot_version: int
    head_version: int
    events_deleted: int
    #: A restore put these events back (they no longer count as deleted).
    restored: bool = False
    archive_uri: str | None = None
    archive_sha256: str | None = None


@dataclass(frozen=True)
class LiveEvents:
    first: int
    last: int
    count: int


@dataclass
class DbState:
    """The soak database at one instant."""

    streams: dict[int, StreamRow] = field(default_factory=dict)
    live: dict[int, LiveEvents] = field(default_factory=dict)
    #: Verified snapshots per stream: (version, stored JSON text).
    verified: dict[int, list[tuple[int, str]]] = field(default_factory=dict)
    audit: dict[int, list[AuditRow]] = field(default_factory=dict)

    def audit_by_id(self) -> dict[str, AuditRow]:
        return {row.compaction_id: row for rows in self.audit.values() for row in rows}

    @property
    def audit_rows(self) -> int:
        return sum(len(rows) for rows in self.audit.values())

    @property
    def restored_rows(self) -> int:
        return sum(row.restored for rows in self.audit.values() for row in rows)

    def heads(self) -> dict[tuple[str, str], int]:
        return {(r.stream_type, r.stream_id): r.head for r in self.streams.values()}

    def deletions_by_type(self) -> dict[str, dict[str, int]]:
        """Per stream type: its audit rows (deletions), the events they deleted and the
        streams that were compacted at least once."""
        found: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for rows in self.audit.values():
            for row in rows:
                found[row.stream_type]["deletions"] += 1
                found[row.stream_type]["events"] += row.events_deleted
            if rows:
                found[rows[0].stream_type]["streams"] += 1
        return {k: dict(v) for k, v in sorted(found.items())}


def read_db_state(conn: psycopg.Connection[Any]) -> DbState:
    """Read every table the checker needs in one REPEATABLE READ, read-only snapshot."""
    db = DbState()
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        for pk, stype, sid, head, through in conn.execute(
            "SELECT pk, stream_type, stream_id, head_version, compacted_through FROM eskit_streams"
        ):
            db.streams[pk] = StreamRow(pk, stype, sid, head, through)
        for pk, first, last, count in conn.execute(
            "SELECT stream_pk, min(version), max(version), count(*) FROM eskit_events "
            "GROUP BY stream_pk"
        ):
            db.live[pk] = LiveEvents(first, last, count)
        for pk, version, state in conn.execute(
            "SELECT stream_pk, version, state FROM eskit_snapshots WHERE verified "
            "ORDER BY stream_pk, version"
        ):
            db.verified.setdefault(pk, []).append((version, state))
        for row in conn.execute(
            "SELECT compaction_id, stream_pk, stream_type, stream_id, from_version, "
            "through_version, snapshot_version, head_version, events_deleted, "
            "restored_at IS NOT NULL, archive_uri, archive_sha256 "
            "FROM eskit_compaction_log ORDER BY stream_pk, from_version, id"
        ):
            db.audit.setdefault(row[1], []).append(AuditRow(*row))
    return db


def check_db(
    db: DbState,
    model: Model,
    acked_before: dict[tuple[str, str], int],
    violations: Violations,
    *,
    final: bool,
) -> list[Observation]:
    """Check ``db`` against the model; return the verified snapshots as observations.

    ``acked_before`` is each stream's acknowledged head taken *before* ``db`` was read.
    ``final``: no writer is running and every append is resolved, so heads must match.
    """
    observations: list[Observation] = []
    seen: set[tuple[str, str]] = set()
    for row in db.streams.values():
        key = (row.stream_type, row.stream_id)
        seen.add(key)
        stream = model.get(*key)
        if stream is None:
            violations.add("events", f"{key[0]}/{key[1]}: a stream nobody appended to")
            continue
        problems = _stream_problems(
            row,
            db.live.get(row.pk),
            db.audit.get(row.pk, []),
            [v for v, _ in db.verified.get(row.pk, [])],
            stream,
            acked_before.get(key, 0),
            final,
        )
        for kind, message in problems:
            violations.add(kind, f"{stream.label}: {message}")
        if stream.folds:
            observations.extend(
                Observation(stream, version, state, 0, "snapshot")
                for version, state in db.verified.get(row.pk, [])
            )
    for key, acked in acked_before.items():
        if key not in seen and acked > 0:
            violations.add("events", f"{key[0]}/{key[1]}: {acked} events acknowledged, no stream")
    return observations


def _stream_problems(
    row: StreamRow,
    live: LiveEvents | None,
    audit: list[AuditRow],
    verified: list[int],
    stream: StreamModel,
    acked_before: int,
    final: bool,
) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    head, through = row.head, row.compacted_through
    if not stream.broken:
        if head < acked_before:
            problems.append(("head", f"head {head} < {acked_before} acknowledged events"))
        elif final and head != stream.acked():
            problems.append(("head", f"head {head} != {stream.acked()} acknowledged events"))
    problems.extend(("events", p) for p in live_events_problems(head, through, live))
    problems.extend(("audit", p) for p in audit_problems(audit, through))
    problems.extend(
        (
            "archive",
            f"audit row {row.compaction_id} ({row.from_version}..{row.through_version}) "
            "has no archive entry: the deleted events cannot be put back",
        )
        for row in audit
        if row.archive_uri is None or row.archive_sha256 is None
    )
    if through > 0 and (not verified or max(verified) < through):
        problems.append(
            (
                "snapshot",
                f"events 1..{through} deleted, newest verified snapshot "
                f"{max(verified) if verified else 'none'}",
            )
        )
    if verified and max(verified) > head:
        problems.append(("snapshot", f"verified snapshot at {max(verified)} > head {head}"))
    if stream.kind in BAD_KINDS and (through or audit or verified):
        problems.append(
            (
                "bad_input",
                f"bad input ({stream.kind}) was compacted: compacted_through {through}, "
                f"{len(audit)} audit rows, verified snapshots {verified}",
            )
        )
    return problems


def live_events_problems(head: int, through: int, live: LiveEvents | None) -> list[str]:
    """The live events must be exactly ``through+1 .. head``."""
    if through > head:
        return [f"compacted through {through}, beyond the head {head}"]
    if live is None:
        return [] if through == head else [f"events {through + 1}..{head} are missing"]
    if (live.first, live.last, live.count) != (through + 1, head, head - through):
        return [
            f"live events are {live.count} in {live.first}..{live.last}, expected "
            f"{head - through} in {through + 1}..{head} (compacted through {through})"
        ]
    return []


def audit_problems(rows: Iterable[AuditRow], through: int) -> list[str]:
    """Audit rows must tile ``1..through`` in order: no overlap, no gap, counts right.
    Rows a restore undid are checked on their own but tile nothing any more (the stream
    starts again at version 1; compactions after the restore tile it again)."""
    problems = []
    expected_from = 1
    for row in rows:
        span = f"audit row {row.compaction_id} ({row.from_version}..{row.through_version})"
        if row.restored:
            if row.events_deleted != row.through_version - row.from_version + 1:
                problems.append(f"restored {span} says {row.events_deleted} events deleted")
            continue
        if row.from_version != expected_from:
            what = "overlaps" if row.from_version < expected_from else "leaves a gap before"
            problems.append(f"{span} {what} the previous deletion (next free {expected_from})")
        if row.through_version < row.from_version:
            problems.append(f"{span} is empty")
        if row.events_deleted != row.through_version - row.from_version + 1:
            problems.append(f"{span} says {row.events_deleted} events deleted")
        if row.snapshot_version != row.through_version:
            problems.append(f"{span} has its snapshot at {row.snapshot_version}")
        if row.head_version < row.through_version:
            problems.append(f"{span} recorded head {row.head_version}")
        expected_from = max(expected_from, row.through_version + 1)
    if expected_from - 1 != through:
        problems.append(
            f"compacted through {through}, but the audit rows cover 1..{expected_from - 1}"
        )
    return problems


# -- results against the audit table -----------------------------------------------------


#: Outcomes after which the fleet retries a task (with the same compaction_id).
RETRIED_OUTCOMES = frozenset({"failed", "fenced", "locked"})


@dataclass
class ResultCheck:
    """What the results said, by outcome, and which deletions no result reported."""

    by_outcome: dict[str, int] = field(default_factory=dict)
    bad_input: dict[str, dict[str, int]] = field(default_factory=dict)
    #: Per stream type, the results by outcome.
    by_type: dict[str, dict[str, int]] = field(default_factory=dict)
    unreported_deletions: int = 0
    #: Results that say failed (database unreachable) for a deletion that committed.
    unacknowledged_commits: int = 0
    #: Attempts that did not delete, of a task whose other attempt (same compaction_id)
    #: did: allowed, counted (fenced, failed or locked; or nothing to compact at an
    #: earlier head, when the attempt that deleted reported it).
    superseded_attempts: int = 0


def check_results(
    results: Iterable[dict[str, Any]],
    audit: dict[str, AuditRow],
    model: Model,
    violations: Violations,
    source: str,
) -> ResultCheck:
    """Match compaction results (CompactionResult dicts) against the audit rows."""
    check = ResultCheck()
    counts: dict[str, int] = defaultdict(int)
    bad: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    by_type: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    reported: set[str] = set()
    results = list(results)
    # Compaction ids whose deletion an attempt saw committing (not recovered from the
    # audit log): that attempt made the row, any other attempt of the id did not.
    committed = {
        str(r.get("compaction_id"))
        for r in results
        if r.get("outcome") == "compacted" and not r.get("recovered")
    }
    for result in results:
        outcome = str(result.get("outcome"))
        counts[outcome] += 1
        by_type[str(result.get("stream_type"))][outcome] += 1
        cid = str(result.get("compaction_id"))
        label = f"{result.get('stream_type')}/{result.get('stream_id')}"
        row = audit.get(cid)
        if outcome == "compacted":
            reported.add(cid)
            for problem in _compacted_problems(result, row):
                violations.add("result", f"{source}: {label} compaction {cid}: {problem}")
        elif row is not None:
            if outcome in RETRIED_OUTCOMES and (
                cid in committed or not _could_have_written(result, row)
            ):
                check.superseded_attempts += 1
            elif (
                outcome == "nothing_to_compact"
                and cid in committed
                and result.get("head_version") != row.head_version
            ):
                # A copy found nothing to do at an earlier head and claimed that; Redis
                # lost the claim (a restart without persistence) before the result
                # reached the backend (the worker was killed), and a later copy of the
                # task, the stream grown, deleted and reported it. Each attempt's line
                # is true of what it did; the run counts the one that deleted.
                check.superseded_attempts += 1
            elif result.get("error_type") == "DatabaseUnavailableError":
                # The commit went through but the connection died before its answer
                # (pg_terminate_backend): the result cannot know. Allowed, counted.
                check.unacknowledged_commits += 1
            else:
                violations.add(
                    "result",
                    f"{source}: {label} compaction {cid} says {outcome} but deleted events",
                )
        stream = model.get(str(result.get("stream_type")), str(result.get("stream_id")))
        if stream is None:
            violations.add("result", f"{source}: a result for unknown stream {label}")
            continue
        if stream.kind in BAD_KINDS:
            error_type = result.get("error_type")
            bad[stream.label][f"{outcome}/{error_type}"] += 1
            expected = BAD_RESULTS[stream.kind]
            if outcome not in BAD_OUTCOMES or (
                (outcome, error_type) != expected and error_type not in TRANSIENT_ERRORS
            ):
                violations.add(
                    "bad_input",
                    f"{source}: {label} ({stream.kind}) ended {outcome} ({error_type}), "
                    f"expected {expected}: {result.get('error')}",
                )
        elif outcome == "verification_failed":
            violations.add(
                "result",
                f"{source}: good stream {label} failed verification: {result.get('error')}",
            )
    check.by_outcome = dict(sorted(counts.items()))
    check.bad_input = {k: dict(v) for k, v in sorted(bad.items())}
    check.by_type = {k: dict(sorted(v.items())) for k, v in sorted(by_type.items())}
    check.unreported_deletions = len(set(audit) - reported)
    return check


def _could_have_written(result: dict[str, Any], row: AuditRow) -> bool:
    """Whether the attempt that gave ``result`` planned the deletion ``row`` records (its
    cut and head): an attempt that planned another one did not write it. Unknown (no
    plan in the result): it could have."""
    planned = (result.get("snapshot_version"), result.get("head_version"))
    return None in planned or planned == (row.through_version, row.head_version)


def _compacted_problems(result: dict[str, Any], row: AuditRow | None) -> list[str]:
    if row is None:
        return ["says compacted, but the audit table has no row for it"]
    problems = []
    if (row.stream_type, row.stream_id) != (result.get("stream_type"), result.get("stream_id")):
        problems.append(f"its audit row is for {row.stream_type}/{row.stream_id}")
    if row.through_version != result.get("snapshot_version"):
        problems.append(
            f"result says through {result.get('snapshot_version')}, audit row {row.through_version}"
        )
    if row.events_deleted != result.get("events_deleted"):
        problems.append(
            f"result says {result.get('events_deleted')} deleted, audit row {row.events_deleted}"
        )
    before = result.get("compacted_through_before")  # not in the workers' log lines
    if before is not None and row.from_version != int(before) + 1:
        problems.append(
            f"result started from {result.get('compacted_through_before')}, audit row from "
            f"{row.from_version}"
        )
    return problems


# -- the consumer and the trash bin -------------------------------------------------------


def _spans(versions: Iterable[int]) -> str:
    """The first few of ``versions`` as text ("3, 4, 9 and 12 more")."""
    found = sorted(versions)
    shown = ", ".join(map(str, found[:NAMED]))
    return shown if len(found) <= NAMED else f"{shown} and {len(found) - NAMED} more"


def exactly_once_problem(versions: list[int], head: int) -> str | None:
    """None if ``versions`` (as delivered) is exactly 1..head in order, else what is
    wrong: versions missing, delivered twice, beyond the head or out of order."""
    if versions == list(range(1, head + 1)):
        return None
    counts: dict[int, int] = defaultdict(int)
    for version in versions:
        counts[version] += 1
    parts = []
    missing = [v for v in range(1, head + 1) if v not in counts]
    if missing:
        parts.append(f"{len(missing)} never seen ({_spans(missing)})")
    twice = [v for v, n in counts.items() if n > 1]
    if twice:
        parts.append(f"{len(twice)} seen more than once ({_spans(twice)})")
    beyond = [v for v in counts if not 1 <= v <= head]
    if beyond:
        parts.append(f"{len(beyond)} beyond the head ({_spans(beyond)})")
    if not parts:
        parts.append(f"out of order ({_spans(versions)}...)")
    return f"of versions 1..{head}, " + "; ".join(parts)


def projection_problems(
    seen: ProjectionModel, heads: dict[tuple[str, str], int], model: Model
) -> list[str]:
    """At the end, caught up: the projection saw each stream's versions 1..head (the
    database's head), each exactly once, with the payload its writer appended."""
    problems = []
    for key, head in sorted(heads.items()):
        label = f"{key[0]}/{key[1]}"
        versions = seen.versions(key)
        problem = exactly_once_problem(versions, head)
        if problem is not None:
            problems.append(f"{label}: the projection saw {len(versions)} events, {problem}")
        stream = model.get(*key)
        if stream is None:
            continue
        for version in range(1, min(head, stream.acked()) + 1):
            data = appended_data(stream, version)
            found = seen.at(key, version)
            if data is not None and found is not None and found[1] != fingerprint(data):
                problems.append(
                    f"{label}: the projection saw version {version} with another payload "
                    f"than its writer appended ({data})"
                )
                break
    for key in seen.streams.keys() - heads.keys():
        problems.append(f"{key[0]}/{key[1]}: the projection saw a stream the database lacks")
    return problems


def archived_problems(
    row: AuditRow,
    events: list[ArchivedEvent],
    seen: ProjectionModel,
    stream: StreamModel | None,
) -> list[tuple[str, str]]:
    """An archive entry holds exactly the deletion its audit row records, and each of
    its events is one the projection had seen, at the same position, with the same
    payload (which is the writer's): the compaction did not outrun the projection."""
    key = (row.stream_type, row.stream_id)
    span = f"{row.stream_type}/{row.stream_id} compaction {row.compaction_id}"
    versions = [e.version for e in events]
    expected = list(range(row.from_version, row.through_version + 1))
    if versions != expected:
        return [
            (
                "archive",
                f"{span} deleted versions {row.from_version}..{row.through_version}, its "
                f"archive entry holds {len(versions)} events ({_spans(versions)})",
            )
        ]
    problems: list[tuple[str, str]] = []
    unseen = []
    for event in events:
        found = seen.at(key, event.version)
        if found is None:
            unseen.append(event.version)
            continue
        print_ = fingerprint(json.loads(event.data))
        if found != (event.position, print_):
            problems.append(
                (
                    "archive",
                    f"{span}: version {event.version} is archived at position "
                    f"{event.position} (payload {event.data}); the projection saw it at "
                    f"position {found[0]}"
                    + ("" if found[1] == print_ else " with another payload"),
                )
            )
            break
        data = None if stream is None else appended_data(stream, event.version)
        if data is not None and json.loads(event.data) != data:
            problems.append(
                (
                    "archive",
                    f"{span}: version {event.version} is archived as {event.data}; its "
                    f"writer appended {data}",
                )
            )
            break
    if unseen:
        problems.append(
            (
                "gate",
                f"{span} deleted {len(unseen)} events the projection never saw "
                f"(versions {_spans(unseen)}): it outran the projection's checkpoint",
            )
        )
    return problems


def held_back_problems(
    results: Iterable[dict[str, Any]],
    deleted_up_to: dict[str, int],
    saved: set[int],
) -> list[str]:
    """A result held back names the projection at a checkpoint it saved, and what it
    deleted (the highest position in its archive entry, ``deleted_up_to`` by compaction
    id) is at or below that checkpoint."""
    problems = []
    for result in results:
        held = result.get("held_back_by")
        if not held:
            continue
        label = f"{result.get('stream_type')}/{result.get('stream_id')}"
        cid = str(result.get("compaction_id"))
        consumer, position = held.get("consumer"), held.get("position")
        if consumer != PROJECTION:
            problems.append(f"{label} compaction {cid} was held back by unknown {consumer!r}")
            continue
        if position not in saved:
            problems.append(
                f"{label} compaction {cid} was held back at position {position}, a "
                "checkpoint the projection never saved"
            )
        top = deleted_up_to.get(cid)
        if result.get("outcome") == "compacted" and top is not None and top > position:
            problems.append(
                f"{label} compaction {cid}, held back at position {position}, deleted an "
                f"event at position {top}"
            )
    return problems


def held_back_summary(
    results: Iterable[dict[str, Any]], retain_by_cid: dict[str, int]
) -> dict[str, int]:
    """How much the projection held back: compactions cut short (``limited``), held back
    entirely (``held``), and the events they kept that their policy would have deleted
    (``events``; only for results whose policy's ``retain_last`` is known)."""
    found: dict[str, int] = defaultdict(int)
    for result in results:
        if not result.get("held_back_by"):
            continue
        outcome = str(result.get("outcome"))
        found["limited" if outcome in ("compacted", "dry_run") else "held"] += 1
        retain = retain_by_cid.get(str(result.get("compaction_id")))
        if retain is None:
            continue
        cut = result.get("snapshot_version")
        if cut is None:
            cut = result.get("compacted_through_before") or 0
        found["events"] += max(0, int(result.get("head_version") or 0) - retain - int(cut))
    return {k: found.get(k, 0) for k in ("limited", "held", "events")}


def restore_problems(
    stream: StreamModel,
    restored: int,
    live: list[tuple[int, int, Any]],
    compacted_through: int,
    seen: ProjectionModel,
) -> list[str] | None:
    """Right after a restore of ``restored`` events: the stream's live events
    (version, position, payload), read then, start at version 1 with no gap, and each
    restored one is back at the position the projection saw it at (so the projection,
    past it, does not receive it again) with the payload it saw, which is the writer's.

    None: a compaction already cut the stream again (``compacted_through`` read after
    ``live``), so the restored events cannot be seen any more; nothing to say.
    """
    versions = [v for v, _, _ in live]
    if (not versions or versions[0] != 1) and compacted_through > 0:
        return None
    problems = []
    missing = sorted(set(range(1, max(versions, default=0) + 1)) - set(versions))
    missing += list(range(max(versions, default=0) + 1, restored + 1))
    if missing:
        problems.append(
            f"after restoring {restored} events, versions {_spans(missing)} are missing "
            f"(live: {len(versions)} events from version {versions[0] if versions else '-'})"
        )
    key = (stream.stream_type, stream.stream_id)
    for version, position, data in live:
        if version > restored:
            break
        found = seen.at(key, version)
        if found is None:
            problems.append(
                f"version {version} was put back at position {position}, but the "
                "projection never saw it (it was deleted before the projection read it)"
            )
        elif found != (position, fingerprint(data)):
            problems.append(
                f"version {version} was put back at position {position}; the projection "
                f"saw it at position {found[0]}"
                + ("" if found[1] == fingerprint(data) else " with another payload")
            )
        expected = appended_data(stream, version)
        if expected is not None and data != expected:
            problems.append(
                f"version {version} was put back as {data}; its writer appended {expected}"
            )
        if len(problems) >= NAMED:
            break
    return problems


# -- the pyeventsourcing application (tests/soak/esapp.py) --------------------------------


@dataclass
class AppStore:
    """The application's SQLite file at the end: per purse (by UUID) its compaction point,
    live events, snapshot versions and audit rows; the audit rows' commit moments; and
    whether the stale-writer guard is on its events table."""

    points: dict[UUID, int] = field(default_factory=dict)
    live: dict[UUID, LiveEvents] = field(default_factory=dict)
    snapshots: dict[UUID, list[int]] = field(default_factory=dict)
    audit: dict[UUID, list[AuditRow]] = field(default_factory=dict)
    compacted_at: dict[str, datetime] = field(default_factory=dict)
    guarded: bool = False

    def audit_by_id(self) -> dict[str, AuditRow]:
        return {row.compaction_id: row for rows in self.audit.values() for row in rows}

    @property
    def audit_rows(self) -> int:
        return sum(len(rows) for rows in self.audit.values())

    @property
    def events_deleted(self) -> int:
        return sum(row.events_deleted for rows in self.audit.values() for row in rows)


def read_app_store(path: str) -> AppStore:
    """Read the application's SQLite file (nothing writes to it any more)."""
    store = AppStore(points=compaction_points(path))
    for stored, first, last, count in read_sqlite(
        path,
        "SELECT originator_id, min(originator_version), max(originator_version), count(*) "
        "FROM stored_events GROUP BY originator_id",
    ):
        store.live[UUID(stored)] = LiveEvents(first, last, count)
    for stored, version in read_sqlite(
        path,
        "SELECT originator_id, originator_version FROM stored_snapshots "
        "ORDER BY originator_id, originator_version",
    ):
        store.snapshots.setdefault(UUID(stored), []).append(version)
    for row in compaction_log_rows(path):
        purse_id = UUID(row["stream_id"])
        store.audit.setdefault(purse_id, []).append(
            AuditRow(
                row["compaction_id"],
                row["stream_pk"],
                row["stream_type"],
                row["stream_id"],
                row["from_version"],
                row["through_version"],
                row["snapshot_version"],
                row["head_version"],
                row["events_deleted"],
                row["restored_at"] is not None,
                row["archive_uri"],
                row["archive_sha256"],
            )
        )
        store.compacted_at[row["compaction_id"]] = row["compacted_at"]
    for rows in store.audit.values():
        rows.sort(key=lambda r: r.from_version)  # stable: ties stay in id order
    store.guarded = bool(
        read_sqlite(
            path, "SELECT 1 FROM sqlite_master WHERE type = 'trigger' AND name = ?", TRIGGER
        )
    )
    return store


def app_store_problems(store: AppStore, heads: dict[UUID, int]) -> list[str]:
    """Per purse (``heads``: the model's head versions): the live events are exactly
    ``point+1 .. head``, the audit rows tile ``1..point``, and a compacted purse has
    exactly one snapshot, at its point (the library takes none of its own here); the
    guard is on once anything was deleted; nothing else is in the file."""
    problems = []
    for purse_id, head in heads.items():
        label = f"{APP_NAME}/{purse_id}"
        point = store.points.get(purse_id, 0)
        found = [
            *live_events_problems(head, point, store.live.get(purse_id)),
            *audit_problems(store.audit.get(purse_id, []), point),
        ]
        snapshots = store.snapshots.get(purse_id, [])
        if snapshots != ([point] if point else []):
            found.append(f"compacted through {point}, snapshots at {snapshots}")
        problems += [f"{label}: {p}" for p in found]
    strangers = (store.live.keys() | store.points.keys() | store.audit.keys()) - heads.keys()
    problems += [f"{APP_NAME}/{s}: an aggregate nobody wrote" for s in sorted(map(str, strangers))]
    if store.audit_rows and not store.guarded:
        problems.append(f"{APP_NAME}: events were deleted, and the guard is not installed")
    return problems


def app_state_problems(expected: dict[UUID, Any], loaded: dict[UUID, Any]) -> list[str]:
    """Each purse as a fresh application loads it is the writer's (``expected``: the
    states, ``esapp.state_of`` of the object it last saved), by the strict comparison."""
    problems = []
    for purse_id, state in expected.items():
        found = loaded.get(purse_id)
        label = f"{APP_NAME}/{purse_id}"
        if isinstance(found, BaseException) or found is None:
            problems.append(f"{label}: a fresh application cannot load it: {found!r}")
            continue
        difference = first_difference(state, state_of(found))
        if difference is not None:
            problems.append(f"{label}: loaded at version {found.version}: {difference}")
    return problems


def app_follower_problems(processed: list[Processed], heads: dict[UUID, int]) -> list[str]:
    """The follower processed each purse's versions 1..head (the opening and every
    deposit) exactly once and in order, in notification id order overall."""
    problems = []
    by_purse: dict[UUID, list[int]] = defaultdict(list)
    for event in processed:
        by_purse[event.aggregate_id].append(event.version)
    for purse_id, head in heads.items():
        problem = exactly_once_problem(by_purse.get(purse_id, []), head)
        if problem is not None:
            problems.append(f"{APP_NAME}/{purse_id}: the follower processed {problem}")
    for stranger in sorted(map(str, by_purse.keys() - heads.keys())):
        problems.append(f"{APP_NAME}/{stranger}: the follower processed an unknown aggregate")
    ids = [event.notification_id for event in processed]
    if any(b <= a for a, b in pairwise(ids)):
        problems.append("the follower's notification ids are not strictly increasing")
    return problems


def app_gate_problems(store: AppStore, processed: list[Processed]) -> list[str]:
    """Every deletion's newest event (``through_version``: the others came before it, in
    notification order) was processed by the follower before the deletion committed:
    its processing began before ``compacted_at``, which the compactor takes after reading
    the follower's position."""
    began = {(e.aggregate_id, e.version): e.started for e in processed}
    problems = []
    for purse_id, rows in store.audit.items():
        for row in rows:
            moment = store.compacted_at.get(row.compaction_id)
            started = began.get((purse_id, row.through_version))
            span = f"{APP_NAME}/{purse_id} compaction {row.compaction_id}"
            if started is None:
                problems.append(
                    f"{span} deleted through {row.through_version}, which the follower never "
                    "processed"
                )
            elif moment is not None and started >= moment.timestamp():
                problems.append(
                    f"{span} committed at {moment.isoformat()} deleting through "
                    f"{row.through_version}, which the follower began processing "
                    f"{started - moment.timestamp():.3f} s later"
                )
    return problems


def app_held_back_problems(
    results: Iterable[dict[str, Any]], processed: list[Processed]
) -> list[str]:
    """A result held back names the follower at a position it reached (0, or an event's
    notification id), and what it deleted goes no further than that position."""
    reached = {0} | {e.notification_id for e in processed}
    notification = {(str(e.aggregate_id), e.version): e.notification_id for e in processed}
    problems = []
    for result in results:
        held = result.get("held_back_by")
        if not held:
            continue
        label = f"{result.get('stream_type')}/{result.get('stream_id')}"
        cid = result.get("compaction_id")
        consumer, position = held.get("consumer"), held.get("position")
        if consumer != FOLLOWER_NAME:
            problems.append(f"{label} compaction {cid} was held back by unknown {consumer!r}")
            continue
        if position not in reached:
            problems.append(
                f"{label} compaction {cid} was held back at position {position}, which the "
                "follower never reached"
            )
        cut = result.get("snapshot_version")
        top = None if cut is None else notification.get((str(result.get("stream_id")), int(cut)))
        if result.get("outcome") == "compacted" and top is not None and top > int(position):
            problems.append(
                f"{label} compaction {cid}, held back at position {position}, deleted through "
                f"version {cut}, notification {top}"
            )
    return problems
