"""How long an append waits while its own stream is compacted (issue 15, goal P5).

One stream of ``events`` events is seeded. A writer thread, on an engine of its own,
appends one event to that stream every 5 ms through ``SqlEventStore.append`` and
records each append's latency. First it writes alone for a while (the baseline); then a
compaction of the stream (``Compactor``, ``retain_last=0``) runs in a child process, and
the writer keeps writing until it ends. The compaction runs in a process of its own so
that its Python work (folding a million events) does not hold the writer's GIL: what is
measured is the database, not the interpreter.

The compaction cuts at the head it planned; the events appended meanwhile stay. The
child reports when its compaction and its delete transaction (``commit_compaction``)
started and ended, on the machine's monotonic clock, so the appends that ran while the
delete transaction was open are reported on their own too.

Reported: p50/p99/max of the append latency without and with the compaction, and the
goal: the longest append during the compaction at most 50 ms.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from bench.deciders import Sum
from bench.fleet import copy_seed, vacuum_analyze
from bench.throughput import PAYLOAD_PAD
from eskit_tasks import CompactionPolicy, Compactor, NewEvent, SqlEventStore, SqlSnapshotStore

STREAM_TYPE, STREAM_ID = "bench_writer", "bench_writer-00000001"
#: The writer appends one event per interval.
INTERVAL_S = 0.005
#: The goal: no append waits longer than this while its stream is compacted.
GOAL_MAX_MS = 50.0


@dataclass(frozen=True)
class Append:
    started: float  # time.monotonic()
    seconds: float
    #: Of which the UPDATE of the stream's head: the statement that waits when the
    #: stream's row is locked (the rest is the append lock, the insert, the COMMIT).
    head_update_s: float


def _payload(version: int) -> str:
    return json.dumps(
        {"amount": version, "currency": "EUR", "memo": PAYLOAD_PAD}, separators=(",", ":")
    )


class Writer(threading.Thread):
    """Appends one event every ``INTERVAL_S`` (on a fixed schedule: a late append is
    followed at once by the next) until stopped; keeps every append's latency."""

    def __init__(self, url: str, head: int) -> None:
        super().__init__(name="writer", daemon=True)
        self.store = SqlEventStore.from_url(url, pool_size=1)
        self.head = head
        self.appends: list[Append] = []
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self._update_started, self._update_s = 0.0, 0.0
        sa.event.listen(self.store.engine, "before_cursor_execute", self._before)
        sa.event.listen(self.store.engine, "after_cursor_execute", self._after)

    def _before(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.startswith("UPDATE eskit_streams"):
            self._update_started = time.monotonic()

    def _after(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.startswith("UPDATE eskit_streams"):
            self._update_s = time.monotonic() - self._update_started

    def run(self) -> None:
        try:
            due = time.monotonic()
            while not self.stop.is_set():
                due += INTERVAL_S
                event = NewEvent("Deposited", {"amount": 1, "currency": "EUR", "memo": "w"})
                started = time.monotonic()
                self.head = self.store.append(
                    STREAM_TYPE, STREAM_ID, [event], expected_version=self.head
                )
                self.appends.append(Append(started, time.monotonic() - started, self._update_s))
                time.sleep(max(0.0, due - time.monotonic()))
        except BaseException as exc:  # reported by measure()
            self.error = exc
        finally:
            self.store.engine.dispose()


def _compact_child(url: str, out: Any) -> None:
    """In the child process: compact the stream and report when it ran (monotonic)."""
    store = SqlEventStore.from_url(url)
    window: dict[str, float] = {}
    commit = store.commit_compaction

    def timed_commit(plan: Any) -> int:
        window["delete_started"] = time.monotonic()
        try:
            return commit(plan)
        finally:
            window["delete_ended"] = time.monotonic()

    store.commit_compaction = timed_commit  # type: ignore[method-assign]
    compactor = Compactor(
        store=store,
        snapshot_store=SqlSnapshotStore(store.engine, create_tables=False),
        decider=Sum(),
        state_type=dict,
        policy=CompactionPolicy(retain_last=0),
    )
    started = time.monotonic()
    result = compactor.compact(STREAM_TYPE, STREAM_ID)
    ended = time.monotonic()
    store.engine.dispose()
    out.put(
        {
            "outcome": str(result.outcome),
            "error": result.error,
            "events_deleted": result.events_deleted,
            "through": result.snapshot_version,
            "started": started,
            "ended": ended,
            **window,
        }
    )


def _stats(appends: list[Append]) -> dict[str, Any]:
    ms = sorted(a.seconds * 1000 for a in appends)
    if not ms:
        return {"appends": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}

    def pick(q: float) -> float:
        return round(ms[min(len(ms) - 1, int(q * len(ms)))], 2)

    update_max = max(a.head_update_s for a in appends) * 1000
    return {
        "appends": len(ms),
        "p50_ms": pick(0.50),
        "p99_ms": pick(0.99),
        "max_ms": pick(1.0),
        "head_update_max_ms": round(update_max, 2),
    }


def _overlapping(appends: list[Append], start: float, end: float) -> list[Append]:
    return [a for a in appends if a.started < end and a.started + a.seconds > start]


def _wait_for(child: Any, out: Any) -> dict[str, Any]:
    """The child's report; an error if it died without one."""
    while True:
        try:
            report: dict[str, Any] = out.get(timeout=0.5)
            return report
        except queue.Empty:
            if not child.is_alive() and out.empty():
                raise RuntimeError(
                    f"the compaction process ended ({child.exitcode}) without a report"
                ) from None


def measure(url: str, events: int, *, baseline_s: float | None = None) -> dict[str, Any]:
    """Append latencies on ``url`` (PostgreSQL) without and during the compaction of a
    stream of ``events`` events that the writer appends to."""
    SqlEventStore.from_url(url).engine.dispose()  # the tables
    copy_seed(url, STREAM_TYPE, 1, 1, events, _payload)
    vacuum_analyze(url)
    if baseline_s is None:
        baseline_s = min(10.0, max(1.0, events / 100_000))
    writer = Writer(url, events)
    writer.start()
    time.sleep(baseline_s)
    baseline_end = time.monotonic()
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    child = context.Process(target=_compact_child, args=(url, out), name="compaction")
    child.start()
    try:
        compaction = _wait_for(child, out)
    finally:
        writer.stop.set()
        writer.join(60)
        child.join(60)
    if writer.error is not None:
        raise RuntimeError(f"the writer failed: {writer.error!r}") from writer.error
    if compaction["outcome"] != "compacted":
        raise RuntimeError(f"the compaction did not succeed: {compaction}")
    baseline = [a for a in writer.appends if a.started < baseline_end]
    during = _overlapping(writer.appends, compaction["started"], compaction["ended"])
    in_delete = _overlapping(
        writer.appends, compaction["delete_started"], compaction["delete_ended"]
    )
    check = SqlEventStore.from_url(url)
    info = check.stream_info(STREAM_TYPE, STREAM_ID)
    live = [e.version for e in check.read(STREAM_TYPE, STREAM_ID)]
    check.engine.dispose()
    through = compaction["through"]
    # Nothing appended was lost: the live events are exactly through+1 .. head.
    expected = (writer.head, through, list(range(through + 1, writer.head + 1)))
    if info is None or (info.head_version, info.compacted_through, live) != expected:
        raise RuntimeError(f"events were lost: {info}, live {live[:5]}..., expected {expected[:2]}")
    without, with_ = _stats(baseline), _stats(during)
    worst = with_["max_ms"]
    return {
        "backend": "postgresql",
        "events": events,
        "interval_ms": INTERVAL_S * 1000,
        "baseline_s": round(baseline_s, 1),
        "compaction_s": round(compaction["ended"] - compaction["started"], 2),
        "delete_transaction_s": round(compaction["delete_ended"] - compaction["delete_started"], 3),
        "events_deleted": compaction["events_deleted"],
        "appended_meanwhile": writer.head - through,
        "without_compaction": without,
        "during_compaction": with_,
        "during_delete_transaction": _stats(in_delete),
        # p99 without / p99 during: 1.0 means the compaction costs the writer nothing.
        "ratio": round(without["p99_ms"] / max(with_["p99_ms"], 1e-3), 3),
        "goal": f"max <= {GOAL_MAX_MS:g} ms",
        "met": worst is not None and worst <= GOAL_MAX_MS,
    }


def run(scale: str = "full") -> dict[str, Any]:
    from bench.run import SIZES, postgres_database

    with postgres_database() as url:
        return measure(url, SIZES[scale]["writer_wait"])


def _main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.writer_wait", description=__doc__)
    parser.add_argument("--scale", choices=("tiny", "full"), default="full")
    print(json.dumps(run(parser.parse_args().scale), indent=2))


if __name__ == "__main__":
    _main()
