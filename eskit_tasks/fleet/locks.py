"""The per-stream Redis lock that keeps two workers off one stream.

A lock is a redis-py ``Lock`` (``SET key token NX PX ttl``; release and extend are Lua
scripts that check the token). While a compaction runs, a background thread renews
the lock every ``ttl / 3``; when a renewal fails — the key expired or Redis is
unreachable — the lock is marked lost and the compaction stops at its next checkpoint
before it writes or deletes anything.

The lock is an optimisation for the fleet (one worker per stream, no wasted replays);
it is not what keeps events safe. A worker paused past its lock's expiry can wake up
believing it still holds the lock — the database's fencing token stops it.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import uuid
from types import TracebackType

import redis
from redis.exceptions import LockError, RedisError

from eskit_tasks.errors import LockLostError
from eskit_tasks.fleet.constants import LOCK_PREFIX, LOCK_RENEW_FRACTION


def lock_key(stream_type: str, stream_id: str) -> str:
    """The Redis key of a stream's lock.

    Type and id are hashed with a length prefix, so ids containing ``:``, ``*``,
    ``{}`` or any other byte can neither collide nor act as key patterns.
    """
    raw = f"{len(stream_type)}:{stream_type}|{stream_id}".encode()
    return LOCK_PREFIX + hashlib.sha256(raw).hexdigest()


class StreamLock:
    """A renewable per-stream lock.

    Args:
        client: The Redis client (``ESKIT_REDIS_URL``).
        stream_type: The stream's type.
        stream_id: The stream's id.
        ttl: Seconds the lock lives without renewal.
        owner: Who takes it (the Celery task id); stored in the value for diagnosis
            and to recognise a redelivered copy of the same task.
    """

    def __init__(
        self,
        client: redis.Redis,
        stream_type: str,
        stream_id: str,
        *,
        ttl: float,
        owner: str,
    ) -> None:
        self.client = client
        self.key = lock_key(stream_type, stream_id)
        self.ttl = ttl
        self.owner = owner
        self.token = f"{owner}|{uuid.uuid4().hex}"
        # thread_local=False: the renewal thread must see the token acquire() stored.
        self._lock = client.lock(self.key, timeout=ttl, blocking=False, thread_local=False)
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost_reason: str | None = None

    def acquire(self) -> bool:
        """Take the lock if it is free; start renewing it. Never blocks.

        Raises:
            redis.exceptions.RedisError: Redis is unreachable.
        """
        if not self._lock.acquire(token=self.token):
            return False
        self._start_renewing()
        return True

    def held(self) -> None:
        """The lock was taken with this lock's token by a script (``SET key token NX PX
        ttl``, as :meth:`acquire` does; see :mod:`eskit_tasks.fleet.task_start`): hold
        it from now on, renewing it, checking it and releasing it as if acquired here."""
        self._lock.local.token = self.token.encode()
        self._start_renewing()

    def _start_renewing(self) -> None:
        self._stop.clear()
        self._lost.clear()
        self.lost_reason = None
        self._thread = threading.Thread(
            target=self._renew, name=f"eskit-lock-renew-{self.key[-8:]}", daemon=True
        )
        self._thread.start()

    def holder(self) -> str | None:
        """The owner recorded in the lock's value, None when nobody holds it."""
        value = self.client.get(self.key)
        if value is None:
            return None
        text = value.decode() if isinstance(value, bytes) else str(value)
        return text.rsplit("|", 1)[0]

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    def check(self) -> None:
        """Raise LockLostError unless the lock is still ours, asking Redis now.

        Called before every write of a compaction; a Redis that cannot answer counts
        as a lost lock, so nothing is written without a held lock.
        """
        if not self._lost.is_set():
            try:
                if not self._lock.owned():
                    self._mark_lost("the lock expired or was taken over")
            except RedisError as exc:
                self._mark_lost(f"Redis did not answer: {exc}")
        if self._lost.is_set():
            raise LockLostError(
                f"stream lock {self.key} lost ({self.lost_reason}); stopped before writing"
            )

    def release(self) -> None:
        """Stop renewing and release the lock if it is still ours (best effort)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        # Expired, taken over, or Redis down: the key frees itself after the TTL.
        with contextlib.suppress(LockError, RedisError):
            self._lock.release()

    def __enter__(self) -> StreamLock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def _renew(self) -> None:
        interval = self.ttl * LOCK_RENEW_FRACTION
        while not self._stop.wait(interval):
            try:
                self._lock.extend(self.ttl, replace_ttl=True)
            except LockError:
                self._mark_lost("renewal found the lock expired or taken over")
                return
            except RedisError as exc:
                self._mark_lost(f"Redis did not answer the renewal: {exc}")
                return

    def _mark_lost(self, reason: str) -> None:
        if not self._lost.is_set():
            self.lost_reason = reason
            self._lost.set()
