"""The one Redis call that starts a compaction in a worker.

Before a compaction touches the database, a task copy asks Redis four questions, in
this order, and stops at the first that says no:

1. has a copy of this task id finished already (its result claimed, see
   :mod:`eskit_tasks.fleet.redelivery`)?
2. has the operator paused or cancelled the run (see ``RunProgressStore.set_state``)?
3. is any throttle cap in force, globally or for the run (see
   :mod:`eskit_tasks.fleet.throttle`)?
4. is the stream's lock free (see :mod:`eskit_tasks.fleet.locks`)? Then it is taken.

Asked one by one that was six to ten round trips per task (a done-key read, a state
read, a gate per throttle scope, the lock, the done key again once locked, then giving
back throttle slots nobody needed). :data:`_START` asks them in one Lua call: atomic,
so the done key is read at the very moment the lock is taken, and no copy can claim the
task's result between the two.

The answer to 3 is only "a cap is set": the throttle's own gates (token bucket, slots,
waiting) run as before, and only then. With no cap anywhere — the default — a task
holds no slot and charges no bucket, so the common case costs nothing more.

The script names keys of several owners (the task's done key, the stream's lock, the
run's hash, the global throttle config) in one call: fine on the one Redis the fleet
uses (``ESKIT_REDIS_URL``); a Redis Cluster would refuse it unless they shared a hash
tag, which they do not.

The lock is taken exactly as :class:`~eskit_tasks.fleet.locks.StreamLock` takes it
(``SET key token NX PX ttl``), so renewal, checks and release work on it unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis

from eskit_tasks.fleet.locks import StreamLock
from eskit_tasks.fleet.progress import RUN_ID_PATTERN
from eskit_tasks.fleet.settings import EskitSettings
from eskit_tasks.fleet.throttle import global_scope, run_scope

# KEYS: done key (the task's claim), lock key, run hash (the done key again when the
#       task has no run), global throttle config.
# ARGV: lock token, lock ttl (ms), gates ('1': ask 2 and 3, '0': only 1 and 4, for a
#       copy the throttle has admitted already), has a run ('1'/'0'), the global caps
#       from the environment (events per second, concurrent compactions).
# Returns {'done', claim} | {'paused'} | {'cancelled'} | {'throttled'} |
#         {'held', lock value or false} | {'locked'} (the lock is now ours).
_START = """
local claim = redis.call('GET', KEYS[1])
if claim then return {'done', claim} end
if ARGV[3] == '1' then
  if ARGV[4] == '1' then
    local state = redis.call('HGET', KEYS[3], 'state')
    if state == 'paused' or state == 'cancelled' then return {state} end
  end
  -- A cap set live (eskit-tasks throttle) wins over the environment's; 0 is no cap.
  local function capped(key, rate_field, slots_field, env_rate, env_slots)
    local rate = tonumber(redis.call('HGET', key, rate_field) or env_rate)
    local slots = tonumber(redis.call('HGET', key, slots_field) or env_slots)
    return rate > 0 or slots > 0
  end
  if capped(KEYS[4], 'events_per_second', 'max_concurrent', ARGV[5], ARGV[6]) then
    return {'throttled'}
  end
  if ARGV[4] == '1' and capped(KEYS[3], 'max_events_per_second', 'max_concurrent', 0, 0) then
    return {'throttled'}
  end
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {'locked'} end
return {'held', redis.call('GET', KEYS[2])}
"""


@dataclass(frozen=True)
class Started:
    """What :meth:`TaskStart.ask` found: ``answer`` is ``done`` (``value``: the claim),
    ``paused``, ``cancelled``, ``throttled``, ``held`` (``value``: the lock's holder,
    None if it was freed meanwhile) or ``locked`` (the lock is ours: the caller owns
    ``lock`` and must release it)."""

    answer: str
    value: str | None = None


class TaskStart:
    """The start script of one Redis client (registered once per process)."""

    def __init__(self, client: redis.Redis) -> None:
        self._script = client.register_script(_START)

    def ask(
        self,
        lock: StreamLock,
        done_key: str,
        run_id: str | None,
        settings: EskitSettings,
        *,
        gates: bool,
    ) -> Started:
        """Ask the four questions for ``lock``'s stream; on ``locked`` the lock is held
        and renewed (see :meth:`StreamLock.held`).

        Raises:
            redis.exceptions.RedisError: Redis is unreachable.
        """
        has_run = run_id is not None and RUN_ID_PATTERN.fullmatch(run_id) is not None
        glob = global_scope(settings.max_events_per_second, settings.max_concurrent_compactions)
        run_key = run_scope(run_id).config if has_run and run_id is not None else done_key
        found: Any = self._script(
            keys=[done_key, lock.key, run_key, glob.config],
            args=[
                lock.token,
                int(lock.ttl * 1000),
                "1" if gates else "0",
                "1" if has_run else "0",
                glob.env_rate,
                glob.env_slots,
            ],
        )
        answer = _text(found[0])
        value = _text(found[1]) if len(found) > 1 and found[1] is not None else None
        if answer == "held" and value is not None:
            value = value.rsplit("|", 1)[0]  # the owner recorded in the lock's value
        if answer == "locked":
            lock.held()
        return Started(answer, value)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
