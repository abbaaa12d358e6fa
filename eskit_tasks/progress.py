"""Progress of a fleet run, kept in Redis so that any shell or host can read it.

One hash per run (``eskit:run:{<run id>}``) holds counters; a set remembers which
streams have reported, so a redelivered task or a fan-out page enqueued twice is
counted once; a capped list keeps the failed streams with their errors. All keys
of a run share a Redis Cluster hash tag and expire ``run_ttl`` seconds after the
last update. Updates are Lua scripts, so counters never tear.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from typing import Any

import redis
from pydantic import BaseModel, Field

from eskit_tasks.constants import RUN_FAILED_KEEP, RUN_PREFIX
from eskit_tasks.errors import ConfigurationError
from eskit_tasks.result import CompactionResult, Outcome

_RUN_ID = re.compile(r"[0-9a-f]{32}")

# KEYS: hash, reported set, failed list.
# ARGV: stream digest, outcome, events deleted, bytes, dry-run events, dry-run bytes,
#       ttl, failed entry ('' if none), failed cap, now.
_REPORT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[1], 'done', 1)
redis.call('HINCRBY', KEYS[1], 'outcome:' .. ARGV[2], 1)
redis.call('HINCRBY', KEYS[1], 'events_deleted', ARGV[3])
redis.call('HINCRBY', KEYS[1], 'bytes_reclaimed', ARGV[4])
redis.call('HINCRBY', KEYS[1], 'dry_run_events', ARGV[5])
redis.call('HINCRBY', KEYS[1], 'dry_run_bytes', ARGV[6])
redis.call('HSET', KEYS[1], 'updated_at', ARGV[10])
if ARGV[8] ~= '' and redis.call('LLEN', KEYS[3]) < tonumber(ARGV[9]) then
  redis.call('RPUSH', KEYS[3], ARGV[8])
end
for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[7]) end
return 1
"""

# KEYS: hash. ARGV: expected cursor, new cursor, candidates found, fan-out done (0/1),
#       queue depth seen, ttl, now.
_ADVANCE = """
if redis.call('HGET', KEYS[1], 'cursor') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'cursor', ARGV[2], 'updated_at', ARGV[7])
redis.call('HINCRBY', KEYS[1], 'candidates', ARGV[3])
if ARGV[4] == '1' then redis.call('HSET', KEYS[1], 'fanout_done', '1') end
local seen = tonumber(ARGV[5])
if seen > tonumber(redis.call('HGET', KEYS[1], 'max_queue_depth') or '0') then
  redis.call('HSET', KEYS[1], 'max_queue_depth', seen)
end
redis.call('EXPIRE', KEYS[1], ARGV[6])
return 1
"""

_MAX_DEPTH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local seen = tonumber(ARGV[1])
if seen > tonumber(redis.call('HGET', KEYS[1], 'max_queue_depth') or '0') then
  redis.call('HSET', KEYS[1], 'max_queue_depth', seen)
end
return 1
"""


# Outcomes that need no attention; every other one is listed with its error.
_FINE = (Outcome.COMPACTED, Outcome.DRY_RUN, Outcome.NOTHING_TO_COMPACT)


class RunProgress(BaseModel):
    """A run's counters, as read from Redis."""

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

    @property
    def finished(self) -> bool:
        """The fan-out has enqueued every candidate and each one has reported."""
        return self.error is not None or (self.fanout_done and self.done >= self.candidates)

    @property
    def failed(self) -> int:
        return sum(
            self.outcomes.get(o.value, 0) for o in (Outcome.FAILED, Outcome.VERIFICATION_FAILED)
        )


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
        self._max_depth = client.register_script(_MAX_DEPTH)

    @staticmethod
    def _keys(run_id: str) -> tuple[str, str, str]:
        base = f"{RUN_PREFIX}{{{check_run_id(run_id)}}}"
        return base, f"{base}:reported", f"{base}:failed"

    def create(self, run_id: str, policy: dict[str, Any]) -> None:
        """Start a run's record (idempotent: an existing record is left as it is)."""
        key = self._keys(run_id)[0]
        now = time.time()
        fields: dict[str, str | float | int] = {
            "started_at": now,
            "updated_at": now,
            "cursor": "0",
            "candidates": 0,
            "done": 0,
            "policy": json.dumps(policy, default=str),
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

    def advance(
        self, run_id: str, *, expected: int, new: int, found: int, done: bool, depth: int
    ) -> bool:
        """Move the fan-out cursor from ``expected`` to ``new``; False if another
        fan-out task already moved it (this page was a duplicate)."""
        return bool(
            self._advance(
                keys=[self._keys(run_id)[0]],
                args=[
                    str(expected),
                    str(new),
                    found,
                    "1" if done else "0",
                    depth,
                    self.ttl,
                    time.time(),
                ],
            )
        )

    def note_depth(self, run_id: str, depth: int) -> None:
        """Record a queue depth seen while waiting (the high-water check)."""
        self._max_depth(keys=[self._keys(run_id)[0]], args=[depth])

    def fail(self, run_id: str, error: str) -> None:
        """Mark the run as stopped by an error (e.g. an invalid policy)."""
        key = self._keys(run_id)[0]
        self.client.hset(key, mapping={"error": error, "updated_at": time.time()})
        self.client.expire(key, self.ttl)

    def report(self, run_id: str, result: CompactionResult) -> bool | None:
        """Count one stream's result; False if that stream already reported in this run,
        None if the run has no progress (expired, or Redis lost it)."""
        digest = hashlib.sha256(
            f"{len(result.stream_type)}:{result.stream_type}|{result.stream_id}".encode()
        ).hexdigest()[:32]
        compacted = result.outcome == Outcome.COMPACTED
        dry = result.outcome == Outcome.DRY_RUN
        failed = result.outcome not in _FINE
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
            keys=list(self._keys(run_id)),
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
            ],
        )
        return None if int(status) == -1 else int(status) == 1

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
        )

    def failed_streams(self, run_id: str) -> list[FailedStream]:
        raw = self.client.lrange(self._keys(run_id)[2], 0, -1)
        return [FailedStream.model_validate_json(item) for item in raw]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
