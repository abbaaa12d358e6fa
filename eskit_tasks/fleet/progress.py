"""Progress of a fleet run, kept in Redis so that any shell or host can read it.

One hash per run (``eskit:run:{<run id>}``) holds counters; a second hash knows each
candidate stream of the run and whether it has reported, so a redelivered task or a
fan-out page enqueued twice is counted once; a list holds the fan-out page being
published; a capped list keeps the failed streams with their errors, and a trimmed Redis
stream the results of the newest streams, for a follower to print as they come. All keys of a run
share a Redis Cluster hash tag and expire ``run_ttl`` seconds after the last update.
Updates are Lua scripts, so counters never tear.

A fan-out page is fixed before any of its messages is sent (:meth:`RunProgressStore.
store_page`): the first copy of a page stores its streams and counts them as candidates;
a retry or a duplicate fan-out at the same cursor gets the stored page back instead of
its own reading of the database, which may differ while writers append. So every
stream a run sends a task for is a candidate of the run before its task can report,
``done`` never passes ``candidates``, and a run is never finished early.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import redis
from pydantic import BaseModel, Field

from eskit_tasks.domain.result import CompactionResult, Outcome
from eskit_tasks.errors import ConfigurationError
from eskit_tasks.fleet.constants import RUN_FAILED_KEEP, RUN_PREFIX, RUN_RESULTS_KEEP

_RUN_ID = re.compile(r"[0-9a-f]{32}")
#: What a run id looks like (new_run_id); anything else is refused as a key.
RUN_ID_PATTERN = _RUN_ID

#: What an operator can make of a run that has not finished.
RunState = Literal["running", "paused", "cancelled"]

# The end of a run. Once the fan-out is done and every candidate has reported, a run
# that asked for a finishing step (the run's 'finish' field: the fleet's runs, whose
# end finish_run records in the database and which may reclaim space) answers COMPLETE
# to whoever saw it complete, which sends the finish_run task; that task sets
# 'finished_at'. Any other run is finished on the spot.
# A report or page seen again still answers COMPLETE while 'finished_at' is unset, so a
# worker killed before it sent finish_run is made good by its redelivered copy.
# complete() answers 0 (not complete, or finished already), 2 (needs its finishing step)
# or 4 (finished on the spot by this call: once per run, for eskit_runs_finished_total).
# Only a report or a page can complete a run, so _CHECK_COMPLETE never answers 4.
_COMPLETE = """
local function complete(hash, now)
  if redis.call('HGET', hash, 'fanout_done') ~= '1' then return 0 end
  local done = tonumber(redis.call('HGET', hash, 'done') or '0')
  if done < tonumber(redis.call('HGET', hash, 'candidates') or '0') then return 0 end
  if redis.call('HEXISTS', hash, 'finished_at') == 1 then return 0 end
  if redis.call('HGET', hash, 'finish') == '1' then return 2 end
  redis.call('HSET', hash, 'finished_at', now)
  return 4
end
"""

# KEYS: hash, streams hash (digest -> '0' candidate, '1' reported), failed list, results
#       stream.
# ARGV: stream digest, outcome, events deleted, bytes, dry-run events, dry-run bytes,
#       ttl, failed entry ('' if none), failed cap, now, stream type, the result (JSON),
#       results cap.
# Returns -1 (no such run), else 1 if this report was counted (0: the stream had
# reported already) plus 2 if the run is complete and needs its finishing step, or 4 if
# this report finished it.
# A stream no page named (a task sent by hand with a run id) becomes a candidate as it
# reports, so done never exceeds candidates.
_REPORT = (
    _COMPLETE
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local seen = redis.call('HGET', KEYS[2], ARGV[1])
if seen == '1' then return complete(KEYS[1], ARGV[10]) end
redis.call('HSET', KEYS[2], ARGV[1], '1')
if not seen then redis.call('HINCRBY', KEYS[1], 'candidates', 1) end
redis.call('HINCRBY', KEYS[1], 'done', 1)
redis.call('HINCRBY', KEYS[1], 'outcome:' .. ARGV[2], 1)
redis.call('HINCRBY', KEYS[1], 'events_deleted', ARGV[3])
redis.call('HINCRBY', KEYS[1], 'bytes_reclaimed', ARGV[4])
redis.call('HINCRBY', KEYS[1], 'dry_run_events', ARGV[5])
redis.call('HINCRBY', KEYS[1], 'dry_run_bytes', ARGV[6])
if tonumber(ARGV[3]) > 0 then redis.call('HINCRBY', KEYS[1], 'deleted:' .. ARGV[11], ARGV[3]) end
redis.call('HSET', KEYS[1], 'updated_at', ARGV[10])
if ARGV[8] ~= '' and redis.call('LLEN', KEYS[3]) < tonumber(ARGV[9]) then
  redis.call('RPUSH', KEYS[3], ARGV[8])
end
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[13], '*', 'r', ARGV[12])
for i = 1, 4 do redis.call('EXPIRE', KEYS[i], ARGV[7]) end
return 1 + complete(KEYS[1], ARGV[10])
"""
)

# KEYS: hash, streams hash, page list.
# ARGV: cursor, next cursor, last page (0/1), ttl, now, then digest and entry of each
#       stream of the page.
# Returns -1 (no such run), 0 (the cursor moved on: a duplicate page), or
# {1, next cursor, last, entries} of the page stored for this cursor, first come first.
_STORE_PAGE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('HGET', KEYS[1], 'cursor') ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[1], 'page_cursor') ~= ARGV[1] then
  redis.call('DEL', KEYS[3])
  local new = 0
  for i = 6, #ARGV, 2 do
    if redis.call('HSETNX', KEYS[2], ARGV[i], '0') == 1 then new = new + 1 end
    redis.call('RPUSH', KEYS[3], ARGV[i + 1])
  end
  redis.call('HINCRBY', KEYS[1], 'candidates', new)
  redis.call('HSET', KEYS[1], 'page_cursor', ARGV[1], 'page_next', ARGV[2],
             'page_last', ARGV[3], 'updated_at', ARGV[5])
end
for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[4]) end
return {1, redis.call('HGET', KEYS[1], 'page_next'), redis.call('HGET', KEYS[1], 'page_last'),
        redis.call('LRANGE', KEYS[3], 0, -1)}
"""

# KEYS: hash, page list. ARGV: expected cursor, new cursor, fan-out done (0/1),
#       queue depth seen, ttl, now, id of the fan-out message that moves the cursor,
#       the run's sources (JSON).
# The message id is kept so that a copy of that very message (redelivered after its
# worker died between moving the cursor and sending the next page, or retrying after
# that send failed) knows to send the next page (see unsent_next_page).
# Returns 0 (another copy moved the cursor), else 1; plus 2 if the run is complete and
# needs its finishing step, or 4 if this call finished it (see _COMPLETE).
_ADVANCE = (
    _COMPLETE
    + """
if redis.call('HGET', KEYS[1], 'cursor') ~= ARGV[1] then return complete(KEYS[1], ARGV[6]) end
redis.call('HSET', KEYS[1], 'cursor', ARGV[2], 'updated_at', ARGV[6],
           'advanced_from', ARGV[1], 'advanced_by', ARGV[7], 'sources', ARGV[8])
redis.call('DEL', KEYS[2])
if ARGV[3] == '1' then redis.call('HSET', KEYS[1], 'fanout_done', '1') end
local seen = tonumber(ARGV[4])
if seen > tonumber(redis.call('HGET', KEYS[1], 'max_queue_depth') or '0') then
  redis.call('HSET', KEYS[1], 'max_queue_depth', seen)
end
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1 + complete(KEYS[1], ARGV[6])
"""
)

# KEYS: hash. ARGV: new state (running, paused, cancelled), now.
# Returns -1 (no such run), 0 (finished, or cancelled already: the state stays), 1.
_SET_STATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('HEXISTS', KEYS[1], 'finished_at') == 1 then return 0 end
if redis.call('HGET', KEYS[1], 'state') == 'cancelled' then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'updated_at', ARGV[2])
return 1
"""

# KEYS: hash, page list. ARGV: now. The fan-out of a cancelled run stops: nothing more
# is enqueued, the run completes when the tasks already sent have reported.
# Returns 2 if the run is now complete and needs its finishing step, else 1.
_STOP_FANOUT = (
    _COMPLETE
    + """
redis.call('HSET', KEYS[1], 'fanout_done', '1', 'updated_at', ARGV[1])
redis.call('DEL', KEYS[2])
return 1 + complete(KEYS[1], ARGV[1])
"""
)

# KEYS: hash. ARGV: now. 2 if the run is complete and needs its finishing step.
_CHECK_COMPLETE = (
    _COMPLETE
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
return complete(KEYS[1], ARGV[1])
"""
)

_MAX_DEPTH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local seen = tonumber(ARGV[1])
if seen > tonumber(redis.call('HGET', KEYS[1], 'max_queue_depth') or '0') then
  redis.call('HSET', KEYS[1], 'max_queue_depth', seen)
end
return 1
"""


class RunProgress(BaseModel):
    """A run's counters, as read from Redis.

    The times are epoch seconds (floats) for code; ``repr`` and ``str`` show them as ISO
    8601 UTC with the elapsed time, and :attr:`started`, :attr:`updated` and
    :attr:`elapsed_s` give them as datetimes and seconds.
    """

    run_id: str
    started_at: float
    updated_at: float
    policy: dict[str, Any]
    candidates: int = 0
    done: int = 0
    outcomes: dict[str, int] = Field(default_factory=dict)
    events_deleted: int = 0
    bytes_reclaimed: int = 0
    dry_run_events: int = 0
    dry_run_bytes: int = 0
    max_queue_depth: int = 0
    fanout_done: bool = False
    error: str | None = None
    #: Events deleted per stream type (types that deleted none are absent).
    deleted_by_type: dict[str, int] = Field(default_factory=dict)
    #: When the run ended: every candidate reported and, if the run reclaims the space
    #: of what it deleted (ESKIT_RECLAIM=auto), that step done.
    finished_at: float | None = None
    #: What the finishing step measured and did (see eskit_tasks.fleet.finish).
    reclaim: dict[str, Any] | None = None
    #: ``running``, ``paused`` (nothing is enqueued, queued tasks wait) or ``cancelled``
    #: (nothing more is enqueued, queued tasks end ``cancelled``).
    state: str = "running"

    @property
    def started(self) -> datetime:
        """When the run started (aware, UTC)."""
        return datetime.fromtimestamp(self.started_at, UTC)

    @property
    def updated(self) -> datetime:
        """When the run last reported anything (aware, UTC)."""
        return datetime.fromtimestamp(self.updated_at, UTC)

    @property
    def elapsed_s(self) -> float:
        """Seconds from the start to the end of the run, or to its last update."""
        return (self.finished_at or self.updated_at) - self.started_at

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            if name in _TIMES and isinstance(value, float):
                yield name, _Shown(_iso(value))
            else:
                yield name, value
        yield "elapsed", _Shown(_duration(self.elapsed_s))

    def __str__(self) -> str:
        state = "finished" if self.finished else self.state
        if self.reclaiming:
            state = "finishing (reclaiming space)"
        if self.error is not None:
            state = f"stopped: {self.error}"
        return (
            f"run {self.run_id}: {state}, {self.done:,} of {self.candidates:,} streams "
            f"done, started {_iso(self.started_at)}, elapsed {_duration(self.elapsed_s)}, "
            f"updated {_iso(self.updated_at)}"
        )

    @property
    def complete(self) -> bool:
        """The fan-out has enqueued every candidate and each one has reported."""
        return self.fanout_done and self.done >= self.candidates

    @property
    def finished(self) -> bool:
        """The run has ended: complete and its finishing step done, or stopped by an
        error."""
        return self.error is not None or (self.complete and self.finished_at is not None)

    @property
    def reclaiming(self) -> bool:
        """Every stream has reported; the space of what was deleted is being reclaimed."""
        return self.error is None and self.complete and self.finished_at is None

    @property
    def failed(self) -> int:
        """Streams whose outcome needs attention (see ``Outcome.needs_attention``)."""
        return sum(self.outcomes.get(o.value, 0) for o in Outcome if o.needs_attention)


@dataclass(frozen=True)
class RunStatus:
    """The few fields of a run that say whether it has ended (what ``run.wait()`` polls,
    instead of the whole progress): see the properties of the same names in
    :class:`RunProgress`."""

    candidates: int
    done: int
    fanout_done: bool
    finished_at: float | None
    error: str | None
    updated_at: float

    @property
    def complete(self) -> bool:
        return self.fanout_done and self.done >= self.candidates

    @property
    def finished(self) -> bool:
        return self.error is not None or (self.complete and self.finished_at is not None)

    @property
    def reclaiming(self) -> bool:
        return self.error is None and self.complete and self.finished_at is None


@dataclass(frozen=True)
class Reported:
    """What counting a stream's result did: ``counted`` (False: the stream had reported
    already), ``complete`` (the run now needs its finishing step) and ``finished`` (this
    report ended the run, which needs no finishing step: true for one call per run)."""

    counted: bool
    complete: bool
    finished: bool = False


@dataclass(frozen=True)
class Advanced:
    """What moving the fan-out cursor did: ``claimed`` (False: another copy of the page
    moved it), ``complete`` (the run now needs its finishing step) and ``finished``
    (this call ended the run, which needs no finishing step: one call per run)."""

    claimed: bool
    complete: bool
    finished: bool = False


@dataclass(frozen=True)
class Page:
    """One page of a fan-out: the streams it sends a task for, where it starts
    (``cursor``), where the next page starts, and whether it is the run's last."""

    cursor: int
    next_cursor: int
    last: bool
    streams: tuple[tuple[str, str], ...]


class FailedStream(BaseModel):
    """A stream a run did not compact because of a problem: failed, verification_failed,
    fenced or locked, with the error."""

    stream_type: str
    stream_id: str
    outcome: str
    error: str | None


def new_run_id() -> str:
    return uuid.uuid4().hex


def check_run_id(run_id: str) -> str:
    """Run ids become Redis keys: only the format new_run_id makes is accepted."""
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
        raise ConfigurationError(f"not a run id: {run_id!r} (expected 32 hex digits)")
    return run_id


class RunProgressStore:
    """Reads and updates the progress of runs in Redis.

    Args:
        client: The Redis client (``ESKIT_REDIS_URL``).
        ttl: Seconds the keys of a run live after its last update.
    """

    def __init__(self, client: redis.Redis, *, ttl: int) -> None:
        self.client = client
        self.ttl = ttl
        self._report = client.register_script(_REPORT)
        self._advance = client.register_script(_ADVANCE)
        self._store_page = client.register_script(_STORE_PAGE)
        self._max_depth = client.register_script(_MAX_DEPTH)
        self._check_complete = client.register_script(_CHECK_COMPLETE)
        self._set_state = client.register_script(_SET_STATE)
        self._stop_fanout = client.register_script(_STOP_FANOUT)

    @staticmethod
    def _keys(run_id: str) -> tuple[str, str, str]:
        """The run's hash, its streams hash and its failed list."""
        base = f"{RUN_PREFIX}{{{check_run_id(run_id)}}}"
        return base, f"{base}:streams", f"{base}:failed"

    @staticmethod
    def _results_key(run_id: str) -> str:
        return f"{RUN_PREFIX}{{{check_run_id(run_id)}}}:results"

    @staticmethod
    def _page_key(run_id: str) -> str:
        return f"{RUN_PREFIX}{{{check_run_id(run_id)}}}:page"

    def create(self, run_id: str, policy: dict[str, Any], *, finish: bool = False) -> None:
        """Start a run's record (idempotent: an existing record is left as it is).

        Args:
            finish: The run ends with a finishing step (``finish_run``: recording the
                run's end, reclaiming the space of what it deleted).
        """
        key = self._keys(run_id)[0]
        now = time.time()
        fields: dict[str, str | float | int] = {
            "started_at": now,
            "updated_at": now,
            "cursor": "0",
            "candidates": 0,
            "done": 0,
            "policy": json.dumps(policy, default=str),
            "finish": "1" if finish else "0",
        }
        pipe = self.client.pipeline()
        for name, value in fields.items():
            pipe.hsetnx(key, name, value)
        pipe.expire(key, self.ttl)
        pipe.execute()

    def exists(self, run_id: str) -> bool:
        return bool(self.client.exists(self._keys(run_id)[0]))

    def cursor(self, run_id: str) -> int | None:
        value = self.client.hget(self._keys(run_id)[0], "cursor")
        return None if value is None else int(value)

    def store_page(self, run_id: str, page: Page) -> Page | None:
        """Fix the fan-out page that starts at ``page.cursor``, before any of its
        messages is sent, and return the page to send.

        The first copy of a page stores its streams and counts the new ones as
        candidates; a later copy (a retry after a failed publish, a redelivery, the same
        fan-out sent twice) gets that stored page back, whatever it read itself. None if
        there is nothing to send: the cursor has moved past this page (a duplicate), or
        the run has no progress (see :meth:`exists`).
        """
        args: list[str | int | float] = [
            str(page.cursor),
            str(page.next_cursor),
            "1" if page.last else "0",
            self.ttl,
            time.time(),
        ]
        for stream_type, stream_id in page.streams:
            args += [_digest(stream_type, stream_id), json.dumps([stream_type, stream_id])]
        keys = self._keys(run_id)
        answer = self._store_page(keys=[keys[0], keys[1], self._page_key(run_id)], args=args)
        if not isinstance(answer, list):
            return None
        _, next_cursor, last, entries = answer
        streams = tuple((str(t), str(i)) for t, i in (json.loads(e) for e in entries))
        return Page(page.cursor, int(next_cursor), _text(last) == "1", streams)

    def advance(
        self,
        run_id: str,
        page: Page,
        *,
        depth: int,
        task_id: str = "",
        sources: list[str] | None = None,
    ) -> Advanced:
        """Move the fan-out cursor past ``page`` (setting ``fanout_done`` on the last
        page) once its messages are sent. ``claimed`` is False if another copy of the
        page already did (this one was a duplicate); ``complete`` is True when the run
        now needs its finishing step. ``task_id``: the fan-out message moving it;
        ``sources``: the run's sources, for a copy that sends the next page again."""
        status = int(
            self._advance(
                keys=[self._keys(run_id)[0], self._page_key(run_id)],
                args=[
                    str(page.cursor),
                    str(page.next_cursor),
                    "1" if page.last else "0",
                    depth,
                    self.ttl,
                    time.time(),
                    task_id,
                    json.dumps(sources),
                ],
            )
        )
        return Advanced(
            claimed=bool(status & 1), complete=bool(status & 2), finished=bool(status & 4)
        )

    def unsent_next_page(
        self, run_id: str, task_id: str | None, cursor: int
    ) -> tuple[int, list[str] | None] | None:
        """Where the next page starts, and the run's sources, if the fan-out message
        ``task_id`` itself moved the cursor past the page at ``cursor``: this copy is its
        redelivery or retry, and the copy that moved it may have died before sending the
        next page. None otherwise (another message's duplicate, or the last page)."""
        if not task_id:
            return None
        by, start, now_at, done, sources = self.client.hmget(
            self._keys(run_id)[0],
            ["advanced_by", "advanced_from", "cursor", "fanout_done", "sources"],
        )
        if by is None or _text(by) != task_id or start is None or _text(start) != str(cursor):
            return None
        if now_at is None or (done is not None and _text(done) == "1"):
            return None
        return int(now_at), None if sources is None else json.loads(sources)

    def set_state(self, run_id: str, state: RunState) -> bool | None:
        """Pause, resume or cancel a run; False if it has finished or was cancelled (a
        cancelled run stays cancelled), None if there is no such run."""
        status = int(self._set_state(keys=[self._keys(run_id)[0]], args=[state, time.time()]))
        return None if status == -1 else status == 1

    def state(self, run_id: str) -> RunState:
        """``running``, ``paused`` or ``cancelled`` (a run without progress: running)."""
        value = self.client.hget(self._keys(run_id)[0], "state")
        found = "running" if value is None else _text(value)
        return found if found in ("paused", "cancelled") else "running"  # type: ignore[return-value]

    def stop_fanout(self, run_id: str) -> bool:
        """End the fan-out of a cancelled run; True if the run is now complete and needs
        its finishing step."""
        status = self._stop_fanout(
            keys=[self._keys(run_id)[0], self._page_key(run_id)], args=[time.time()]
        )
        return bool(int(status) & 2)

    def claim_finish(self, run_id: str, owner: str, *, ttl: int) -> bool:
        """Claim a run's finishing step for ``owner`` (a task id) for ``ttl`` seconds;
        True if it is this owner's (claimed now, or before by the same task)."""
        key = f"{self._keys(run_id)[0]}:finishing"
        if self.client.set(key, owner, nx=True, ex=ttl):
            return True
        held = self.client.get(key)
        return held is not None and _text(held) == owner

    def needs_finish(self, run_id: str) -> bool:
        """True if the run is complete and its finishing step has not ended: send it
        (again; it is idempotent)."""
        return int(self._check_complete(keys=[self._keys(run_id)[0]], args=[time.time()])) == 2

    def note_depth(self, run_id: str, depth: int) -> None:
        """Record a queue depth seen while waiting (the high-water check)."""
        self._max_depth(keys=[self._keys(run_id)[0]], args=[depth])

    def fail(self, run_id: str, error: str) -> bool:
        """Mark the run as stopped by an error (e.g. an invalid policy); True if it was
        not stopped before (the first call for a run: it counts as ended once)."""
        key = self._keys(run_id)[0]
        now = time.time()
        pipe = self.client.pipeline()
        pipe.hsetnx(key, "stopped_at", now)
        pipe.hset(key, mapping={"error": error, "updated_at": now})
        pipe.expire(key, self.ttl)
        first, *_ = pipe.execute()
        return bool(first)

    def report(self, run_id: str, result: CompactionResult) -> Reported | None:
        """Count one stream's result (``counted`` is False if that stream already
        reported in this run); None if the run has no progress (expired, or Redis lost
        it). ``complete``: the run now needs its finishing step (send ``finish_run``)."""
        digest = _digest(result.stream_type, result.stream_id)
        compacted = result.outcome == Outcome.COMPACTED
        dry = result.outcome == Outcome.DRY_RUN
        failed = result.outcome.needs_attention
        entry = (
            FailedStream(
                stream_type=result.stream_type,
                stream_id=result.stream_id,
                outcome=result.outcome.value,
                error=result.error,
            ).model_dump_json()
            if failed
            else ""
        )
        status = self._report(
            keys=[*self._keys(run_id), self._results_key(run_id)],
            args=[
                digest,
                result.outcome.value,
                result.events_deleted if compacted else 0,
                result.bytes_reclaimed if compacted else 0,
                result.events_deleted if dry else 0,
                result.bytes_reclaimed if dry else 0,
                self.ttl,
                entry,
                RUN_FAILED_KEEP,
                time.time(),
                result.stream_type,
                result.model_dump_json(),
                RUN_RESULTS_KEEP,
            ],
        )
        if int(status) == -1:
            return None
        status = int(status)
        return Reported(
            counted=bool(status & 1), complete=bool(status & 2), finished=bool(status & 4)
        )

    def finish(self, run_id: str, reclaim: dict[str, Any] | None) -> bool:
        """Record the end of a run's finishing step (what it reclaimed); False if
        another copy of the step recorded it first, or the run is gone."""
        key = self._keys(run_id)[0]
        if not self.client.exists(key):
            return False
        pipe = self.client.pipeline()
        pipe.hsetnx(key, "finished_at", time.time())
        pipe.hsetnx(key, "reclaim", json.dumps(reclaim))
        pipe.expire(key, self.ttl)
        first, *_ = pipe.execute()
        return bool(first)

    def get(self, run_id: str) -> RunProgress | None:
        """Read a run's progress; None if unknown or expired."""
        raw = self.client.hgetall(self._keys(run_id)[0])
        if not raw:
            return None
        data = {_text(k): _text(v) for k, v in raw.items()}
        outcomes = {k.split(":", 1)[1]: int(v) for k, v in data.items() if k.startswith("outcome:")}
        return RunProgress(
            run_id=run_id,
            started_at=float(data.get("started_at", 0)),
            updated_at=float(data.get("updated_at", 0)),
            policy=json.loads(data.get("policy", "{}")),
            candidates=int(data.get("candidates", 0)),
            done=int(data.get("done", 0)),
            outcomes=outcomes,
            events_deleted=int(data.get("events_deleted", 0)),
            bytes_reclaimed=int(data.get("bytes_reclaimed", 0)),
            dry_run_events=int(data.get("dry_run_events", 0)),
            dry_run_bytes=int(data.get("dry_run_bytes", 0)),
            max_queue_depth=int(data.get("max_queue_depth", 0)),
            fanout_done=data.get("fanout_done") == "1",
            error=data.get("error"),
            deleted_by_type={
                k.split(":", 1)[1]: int(v) for k, v in data.items() if k.startswith("deleted:")
            },
            finished_at=float(data["finished_at"]) if "finished_at" in data else None,
            reclaim=json.loads(data["reclaim"]) if "reclaim" in data else None,
            state=data.get("state", "running"),
        )

    def status(self, run_id: str) -> RunStatus | None:
        """Whether a run has ended, in one read of six fields (see :meth:`get` for all
        of them); None if unknown or expired."""
        fields = ("candidates", "done", "fanout_done", "finished_at", "error", "updated_at")
        raw = self.client.hmget(self._keys(run_id)[0], list(fields))
        if all(v is None for v in raw):
            return None
        got = dict(zip(fields, (None if v is None else _text(v) for v in raw), strict=True))
        return RunStatus(
            candidates=int(got["candidates"] or 0),
            done=int(got["done"] or 0),
            fanout_done=got["fanout_done"] == "1",
            finished_at=None if got["finished_at"] is None else float(got["finished_at"]),
            error=got["error"],
            updated_at=float(got["updated_at"] or 0),
        )

    def results(
        self, run_id: str, after: str = "0-0", count: int = 1000
    ) -> tuple[list[CompactionResult], str]:
        """Up to ``count`` stream results the run counted after the position ``after``
        (``"0-0"``: from the oldest kept, see RUN_RESULTS_KEEP), oldest first, and the
        position to read on from."""
        found: Any = self.client.xread({self._results_key(run_id): after}, count=count)
        entries: list[tuple[Any, dict[Any, Any]]] = found[0][1] if found else []
        results = [
            CompactionResult.model_validate_json(fields.get(b"r") or fields["r"])
            for _, fields in entries
        ]
        return results, _text(entries[-1][0]) if entries else after

    def failed_streams(self, run_id: str) -> list[FailedStream]:
        raw = self.client.lrange(self._keys(run_id)[2], 0, -1)
        return [FailedStream.model_validate_json(item) for item in raw]


def _digest(stream_type: str, stream_id: str) -> str:
    """A fixed-size name for a stream in the run's streams hash (type and id are
    length-prefixed, so no two streams share one)."""
    return hashlib.sha256(f"{len(stream_type)}:{stream_type}|{stream_id}".encode()).hexdigest()[:32]


#: RunProgress's epoch-second fields, shown as ISO 8601 UTC.
_TIMES = ("started_at", "updated_at", "finished_at")


class _Shown(str):
    """Text a repr shows as it is, without quotes."""

    __slots__ = ()

    def __repr__(self) -> str:
        return str(self)


def _iso(epoch: float) -> str:
    """``2026-12-03T07:00:05Z``: an epoch second in UTC."""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _duration(seconds: float) -> str:
    """``1h02m05s``, ``3m07s``, ``4.2s``."""
    if seconds < 60:
        return f"{max(seconds, 0):.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
