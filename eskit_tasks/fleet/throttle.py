"""A fleet-wide cap on the database work of compactions, kept in Redis.

Two caps, each set globally (``ESKIT_MAX_EVENTS_PER_SECOND``,
``ESKIT_MAX_CONCURRENT_COMPACTIONS``, or live with ``eskit-tasks throttle``) and per run
(``compact_all(max_events_per_second=..., max_concurrent=...)``, or live with
``eskit-tasks throttle --run RUN``); where both are set, both hold:

* **events deleted per second**: a token bucket refilled at the cap, holding at most
  one second's worth. A compaction starts only when the bucket is not in debt, and
  after it committed its deleted events are taken from the bucket, which may go into
  debt: the next compactions wait until it is paid back. So the rate over any stretch
  of time stays at the cap, give or take what the compactions running at once delete.
  One compaction is one delete transaction — splitting it to pace it would give up the
  one-transaction guarantee — so a huge stream deletes at once and the fleet then
  rests until the bucket has refilled for it.
* **concurrent compactions**: slots in a sorted set, each leased for
  ``ESKIT_LOCK_TTL`` seconds and renewed while the compaction runs, so a worker that
  dies frees its slot within that time.

A task waits for its turn in the worker for up to :data:`WAIT_IN_TASK_S`, then gives
its worker back and is re-sent for later. Each gate is one Lua call per scope (the
global keys and the run's keys are apart, so Redis Cluster can hash them apart).
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from dataclasses import dataclass

import redis

from eskit_tasks.fleet.constants import KEY_PREFIX, RUN_PREFIX

#: The global caps set live (``eskit-tasks throttle``): hash of events_per_second,
#: max_concurrent.
GLOBAL_KEY = f"{KEY_PREFIX}:throttle:{{global}}"
#: Longest a task waits for its turn inside the worker before it is re-sent.
WAIT_IN_TASK_S = 30.0
#: Shortest sleep between two looks while a slot is taken.
SLOT_POLL_S = 0.1

# KEYS: config hash, bucket hash, slots zset. ARGV: now, lease seconds, member,
#       rate field, concurrency field, env rate, env concurrency.
# A field missing from the config hash falls back to the env value (0: no cap).
# Returns a string: "0" admitted (a slot taken if there is a concurrency cap), "-1" no
# free slot, else the seconds until the bucket is out of debt.
_ADMIT = """
local now = tonumber(ARGV[1])
local rate = tonumber(redis.call('HGET', KEYS[1], ARGV[4]) or ARGV[6])
local slots = tonumber(redis.call('HGET', KEYS[1], ARGV[5]) or ARGV[7])
if rate > 0 then
  local level = tonumber(redis.call('HGET', KEYS[2], 'level') or rate)
  local ts = tonumber(redis.call('HGET', KEYS[2], 'ts') or now)
  level = math.min(rate, level + math.max(now - ts, 0) * rate)
  redis.call('HSET', KEYS[2], 'level', level, 'ts', now)
  redis.call('EXPIRE', KEYS[2], 86400)
  if level < 0 then return tostring(-level / rate) end
end
if slots > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  if redis.call('ZCARD', KEYS[3]) >= slots then return '-1' end
  redis.call('ZADD', KEYS[3], now + tonumber(ARGV[2]), ARGV[3])
  redis.call('EXPIRE', KEYS[3], 86400)
end
return '0'
"""

# KEYS: config hash, bucket hash. ARGV: now, events, rate field, env rate.
_CHARGE = """
local now = tonumber(ARGV[1])
local rate = tonumber(redis.call('HGET', KEYS[1], ARGV[3]) or ARGV[4])
if rate <= 0 then return 0 end
local level = tonumber(redis.call('HGET', KEYS[2], 'level') or rate)
local ts = tonumber(redis.call('HGET', KEYS[2], 'ts') or now)
level = math.min(rate, level + math.max(now - ts, 0) * rate) - tonumber(ARGV[2])
redis.call('HSET', KEYS[2], 'level', level, 'ts', now)
redis.call('EXPIRE', KEYS[2], 86400)
return 1
"""


@dataclass(frozen=True)
class Scope:
    """Where one set of caps lives: its config hash and field names, its bucket and its
    slots, and the caps that apply when the config hash does not set them."""

    config: str
    bucket: str
    slots: str
    rate_field: str
    slots_field: str
    env_rate: float = 0.0
    env_slots: int = 0


def global_scope(env_rate: float, env_slots: int) -> Scope:
    return Scope(
        GLOBAL_KEY,
        f"{KEY_PREFIX}:throttle:{{global}}:bucket",
        f"{KEY_PREFIX}:throttle:{{global}}:slots",
        "events_per_second",
        "max_concurrent",
        env_rate,
        env_slots,
    )


def run_scope(run_id: str) -> Scope:
    """A run's caps live in its progress hash (``max_events_per_second``,
    ``max_concurrent``)."""
    base = f"{RUN_PREFIX}{{{run_id}}}"
    return Scope(base, f"{base}:bucket", f"{base}:slots", "max_events_per_second", "max_concurrent")


class Throttle:
    """The gates one compaction passes: ``admit`` before it starts, ``charge`` with what
    it deleted, ``release`` when it ends.

    Args:
        client: The Redis client (``ESKIT_REDIS_URL``).
        scopes: The caps that apply (the global ones, the run's).
        lease: Seconds a slot lives without renewal (renewed every third of it).
    """

    def __init__(self, client: redis.Redis, scopes: list[Scope], *, lease: float) -> None:
        self.client = client
        self.scopes = scopes
        self.lease = lease
        self.member = uuid.uuid4().hex
        self._admit = client.register_script(_ADMIT)
        self._charge = client.register_script(_CHARGE)
        self._held: list[Scope] = []
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def try_admit(self) -> float:
        """Pass every gate or none: 0.0 when admitted (slots taken), else how long to
        wait before trying again."""
        now = time.time()
        taken: list[Scope] = []
        try:
            answer = self._admit_all(now, taken)
        except redis.RedisError:
            with contextlib.suppress(redis.RedisError):
                self._release(taken)  # no slot held by a gate that then failed
            raise
        if answer != 0.0:
            return answer
        self._held = taken
        if taken:
            self._renewer = threading.Thread(target=self._renew, daemon=True)
            self._renewer.start()
        return 0.0

    def _admit_all(self, now: float, taken: list[Scope]) -> float:
        for scope in self.scopes:
            answer = float(
                self._admit(
                    keys=[scope.config, scope.bucket, scope.slots],
                    args=[
                        now,
                        self.lease,
                        self.member,
                        scope.rate_field,
                        scope.slots_field,
                        scope.env_rate,
                        scope.env_slots,
                    ],
                )
            )
            if answer != 0.0:
                self._release(taken)
                taken.clear()
                return SLOT_POLL_S if answer < 0 else answer
            taken.append(scope)
        return 0.0

    def admit(self, budget: float = WAIT_IN_TASK_S) -> bool:
        """Wait up to ``budget`` seconds for admission; False if still not admitted."""
        deadline = time.monotonic() + budget
        while True:
            wait = self.try_admit()
            if wait == 0.0:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(wait, left, 1.0))

    def charge(self, events: int) -> None:
        """Take ``events`` deleted events from every bucket (it may go into debt)."""
        if events <= 0:
            return
        now = time.time()
        for scope in self.scopes:
            self._charge(
                keys=[scope.config, scope.bucket],
                args=[now, events, scope.rate_field, scope.env_rate],
            )

    def release(self) -> None:
        """Give back the slots taken (idempotent)."""
        self._stop.set()
        held, self._held = self._held, []
        self._release(held)

    def _release(self, scopes: list[Scope]) -> None:
        for scope in scopes:
            self.client.zrem(scope.slots, self.member)

    def _renew(self) -> None:
        while not self._stop.wait(self.lease / 3):
            until = time.time() + self.lease
            for scope in list(self._held):
                try:
                    self.client.zadd(scope.slots, {self.member: until}, xx=True)
                except redis.RedisError:
                    return  # the slot expires by itself; the compaction goes on


def set_caps(
    client: redis.Redis,
    scope: Scope,
    *,
    events_per_second: float | None = None,
    max_concurrent: int | None = None,
) -> None:
    """Set (a value) or clear (0) the caps of a scope, live: the next gate uses them."""
    if events_per_second is not None:
        client.hset(scope.config, scope.rate_field, events_per_second)
    if max_concurrent is not None:
        client.hset(scope.config, scope.slots_field, max_concurrent)


def caps_of(client: redis.Redis, scope: Scope) -> dict[str, float]:
    """The caps in force for a scope (0: no cap): set live, else from the environment."""
    rate, slots = client.hmget(scope.config, [scope.rate_field, scope.slots_field])
    return {
        "events_per_second": float(rate) if rate is not None else scope.env_rate,
        "max_concurrent": float(slots) if slots is not None else float(scope.env_slots),
        "running": float(client.zcount(scope.slots, time.time(), "+inf")),
    }
