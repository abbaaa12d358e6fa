"""Unit tests of the per-stream Redis lock (``StreamLock``) and its key (``lock_key``).

These are fast tests of the lock's logic against fakeredis (with Lua, so redis-py's
token-checking release/extend scripts really run). Timings are short: a lock with a
0.3 s TTL is renewed every 0.1 s.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator

import fakeredis
import pytest
import redis

from eskit_tasks.errors import FencedError, LockLostError
from eskit_tasks.fleet.constants import LOCK_PREFIX
from eskit_tasks.fleet.locks import StreamLock, lock_key

SHORT_TTL = 0.3  # renewed every 0.1 s
LONG_TTL = 30.0  # no renewal happens during a test


@pytest.fixture
def server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


@pytest.fixture
def client(server: fakeredis.FakeServer) -> Iterator[fakeredis.FakeRedis]:
    c = fakeredis.FakeRedis(server=server)
    yield c
    server.connected = True
    c.close()


@pytest.fixture
def locks() -> Iterator[list[StreamLock]]:
    """Every lock a test creates is released at the end, so no renewal thread outlives it."""
    made: list[StreamLock] = []
    yield made
    for lock in made:
        lock.release()


@pytest.fixture
def make_lock(client: fakeredis.FakeRedis, locks: list[StreamLock]) -> Callable[..., StreamLock]:
    def make(
        stream_id: str = "acc-1",
        *,
        owner: str = "task-1",
        ttl: float = LONG_TTL,
        stream_type: str = "ledger",
    ) -> StreamLock:
        lock = StreamLock(client, stream_type, stream_id, ttl=ttl, owner=owner)
        locks.append(lock)
        return lock

    return make


def wait_for(check: Callable[[], bool], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def renewal_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("eskit-lock-renew-")]


# --- acquire / holder / release -----------------------------------------------------------


def test_acquire_takes_a_free_lock_and_stores_the_owner_with_a_ttl(make_lock, client):
    """acquire() on a free stream succeeds, writes the key with the lock's TTL, and
    holder() reports the owner (the task id) recorded in the value."""
    lock = make_lock(owner="celery-task-42")
    assert lock.holder() is None
    assert lock.acquire() is True
    assert lock.holder() == "celery-task-42"
    assert 0 < client.pttl(lock.key) <= LONG_TTL * 1000
    lock.check()  # held: no exception


def test_second_lock_on_the_same_stream_cannot_acquire_and_does_not_block(make_lock):
    """The lock is exclusive and non-blocking: a second StreamLock on the same stream
    gets False at once (it does not wait for the 30 s TTL) and the first stays holder."""
    first = make_lock(owner="task-a")
    second = make_lock(owner="task-b")
    assert first.acquire()
    started = time.monotonic()
    assert second.acquire() is False
    assert time.monotonic() - started < 1.0
    assert second.holder() == "task-a"
    first.check()
    with pytest.raises(LockLostError):
        second.check()


def test_redelivered_copy_with_the_same_owner_cannot_acquire_either(make_lock):
    """The value carries a per-lock nonce: a redelivered copy of the same task (same owner)
    is not mistaken for the holder; it cannot acquire, but holder() names its own task id."""
    first = make_lock(owner="task-same")
    copy = make_lock(owner="task-same")
    assert first.acquire()
    assert copy.acquire() is False
    assert copy.holder() == "task-same"
    assert first.token != copy.token


def test_locks_on_different_streams_do_not_exclude_each_other(make_lock):
    """Exclusion is per stream: another id, or the same id under another type, is free."""
    assert make_lock("acc-1").acquire()
    assert make_lock("acc-2").acquire()
    assert make_lock("acc-1", stream_type="other").acquire()


def test_holder_keeps_an_owner_that_contains_the_separator(make_lock):
    """The value is ``<owner>|<nonce>``; holder() splits on the last ``|`` only."""
    lock = make_lock(owner="worker|weird|id")
    assert lock.acquire()
    assert lock.holder() == "worker|weird|id"


def test_release_frees_the_lock_for_the_next_worker(make_lock, client):
    """After release() the key is gone and another StreamLock can acquire at once."""
    first = make_lock(owner="task-a")
    assert first.acquire()
    first.release()
    assert client.exists(first.key) == 0
    assert first.holder() is None
    second = make_lock(owner="task-b")
    assert second.acquire()
    assert second.holder() == "task-b"


def test_context_manager_releases_on_exit(make_lock, client):
    """``with lock:`` releases the lock when the block ends, even by an exception."""
    lock = make_lock()
    assert lock.acquire()
    with pytest.raises(RuntimeError), lock:
        raise RuntimeError("compaction blew up")
    assert client.exists(lock.key) == 0


def test_stale_holder_release_does_not_delete_the_new_holders_lock(make_lock, client):
    """Token check: A's lock vanished (expired) and B took the stream; A's late release()
    must not delete B's key, and B still passes check()."""
    a = make_lock(owner="task-a")
    b = make_lock(owner="task-b")
    assert a.acquire()
    client.delete(a.key)  # A's lock expired while A was paused
    assert b.acquire()
    a.release()
    assert client.exists(b.key) == 1
    assert b.holder() == "task-b"
    b.check()


def test_release_by_a_lock_that_never_acquired_leaves_the_holder_alone(make_lock, client):
    """A StreamLock whose acquire() returned False can still call release() (e.g. in a
    ``finally``) without error and without freeing the other worker's lock."""
    holder = make_lock(owner="task-a")
    loser = make_lock(owner="task-b")
    assert holder.acquire()
    assert not loser.acquire()
    loser.release()
    assert holder.holder() == "task-a"
    holder.check()


# --- renewal ------------------------------------------------------------------------------


def test_renewal_keeps_the_lock_alive_well_beyond_its_ttl(make_lock, client):
    """With a 0.3 s TTL, the lock is still ours after 1 s (more than three TTLs): the
    background thread renews it; the remaining TTL never exceeds the lock's TTL."""
    lock = make_lock(ttl=SHORT_TTL)
    assert lock.acquire()
    # The same kind of key without renewal is gone by then (the test can fail).
    client.set("control", "x", px=int(SHORT_TTL * 1000))
    time.sleep(1.0)
    assert client.exists("control") == 0
    assert 0 < client.pttl(lock.key) <= SHORT_TTL * 1000
    assert not lock.lost
    lock.check()
    assert lock.holder() == "task-1"


def test_renewal_notices_a_deleted_key_and_check_then_raises(make_lock, client):
    """When the key disappears behind the lock's back, the renewal thread marks the lock
    lost by itself (no check() needed) and check() raises LockLostError, a FencedError."""
    lock = make_lock(ttl=SHORT_TTL)
    assert lock.acquire()
    client.delete(lock.key)
    assert wait_for(lambda: lock.lost), "renewal did not notice the deleted key"
    assert lock.lost_reason is not None and "renewal" in lock.lost_reason
    with pytest.raises(LockLostError, match="lost") as info:
        lock.check()
    assert isinstance(info.value, FencedError)
    assert lock.key in str(info.value)


def test_renewal_does_not_extend_a_lock_taken_over_by_another_worker(make_lock, client):
    """If another token now sits in the key, renewal marks the lock lost and leaves the
    other worker's value (and TTL) alone."""
    lock = make_lock(ttl=SHORT_TTL)
    assert lock.acquire()
    client.set(lock.key, "task-intruder|nonce", px=10_000)
    assert wait_for(lambda: lock.lost)
    assert client.get(lock.key) == b"task-intruder|nonce"
    assert client.pttl(lock.key) > 5_000  # not shortened to the lock's 0.3 s TTL
    with pytest.raises(LockLostError):
        lock.check()
    assert lock.holder() == "task-intruder"


def test_check_asks_redis_and_detects_a_deleted_key_before_any_renewal(make_lock, client):
    """check() does not trust the renewal thread alone: with a 30 s TTL (no renewal has
    run yet) a deleted key is detected by check() itself."""
    lock = make_lock(ttl=LONG_TTL)
    assert lock.acquire()
    lock.check()
    client.delete(lock.key)
    assert not lock.lost  # the renewal thread has not looked yet
    with pytest.raises(LockLostError, match="expired or was taken over"):
        lock.check()
    assert lock.lost


def test_check_detects_a_takeover_by_another_stream_lock(make_lock, client):
    """Key expired, another worker acquired: the first worker's check() raises."""
    a = make_lock(owner="task-a")
    b = make_lock(owner="task-b")
    assert a.acquire()
    client.delete(a.key)
    assert b.acquire()
    with pytest.raises(LockLostError):
        a.check()
    b.check()


def test_lost_is_sticky_even_if_the_key_comes_back(make_lock, client):
    """Once lost, a lock stays lost: putting its exact token back does not revive it, so
    a worker never resumes writing after a gap in which another might have run."""
    lock = make_lock()
    assert lock.acquire()
    token = client.get(lock.key)
    client.delete(lock.key)
    with pytest.raises(LockLostError):
        lock.check()
    client.set(lock.key, token, px=10_000)
    with pytest.raises(LockLostError):
        lock.check()


# --- Redis failures -----------------------------------------------------------------------


def test_check_raises_lock_lost_mentioning_redis_when_redis_does_not_answer(make_lock, server):
    """A Redis that cannot answer counts as a lost lock: check() raises LockLostError whose
    message says Redis did not answer; it does not let the RedisError escape."""
    lock = make_lock(ttl=LONG_TTL)
    assert lock.acquire()
    server.connected = False
    with pytest.raises(LockLostError, match="Redis did not answer"):
        lock.check()
    assert lock.lost
    server.connected = True
    with pytest.raises(LockLostError):  # still lost once Redis is back
        lock.check()


def test_renewal_failure_from_redis_marks_the_lock_lost(make_lock, server):
    """When Redis is unreachable at renewal time, the renewal thread marks the lock lost
    with the reason, and check() raises even though nobody else took the stream."""
    lock = make_lock(ttl=SHORT_TTL)
    assert lock.acquire()
    server.connected = False
    assert wait_for(lambda: lock.lost)
    assert lock.lost_reason is not None and "Redis did not answer the renewal" in lock.lost_reason
    with pytest.raises(LockLostError):
        lock.check()


def test_release_is_best_effort_when_redis_is_down(make_lock, server, client):
    """release() with Redis unreachable neither raises nor hangs (the key frees itself
    after the TTL) and stops the renewal thread."""
    baseline = len(renewal_threads())
    lock = make_lock(ttl=LONG_TTL)
    assert lock.acquire()
    server.connected = False
    started = time.monotonic()
    lock.release()
    assert time.monotonic() - started < 2.0
    assert len(renewal_threads()) == baseline


def test_acquire_raises_redis_error_when_redis_is_down(make_lock, server):
    """acquire() does not report an unreachable Redis as "held by someone else": it
    raises a RedisError (so the task retries) and starts no renewal thread."""
    baseline = len(renewal_threads())
    lock = make_lock()
    server.connected = False
    with pytest.raises(redis.exceptions.RedisError):
        lock.acquire()
    assert len(renewal_threads()) == baseline


# --- no thread leak -----------------------------------------------------------------------


def test_renewal_threads_stop_after_release(client):
    """Each held lock runs one renewal thread; release() stops it, so after releasing
    every lock the process is back to its baseline thread count."""
    baseline = threading.active_count()
    held = [
        StreamLock(client, "ledger", f"acc-{i}", ttl=SHORT_TTL, owner=f"t{i}") for i in range(5)
    ]
    try:
        for lock in held:
            assert lock.acquire()
        assert threading.active_count() == baseline + 5
    finally:
        for lock in held:
            lock.release()
    assert threading.active_count() == baseline
    assert renewal_threads() == []


def test_renewal_thread_exits_by_itself_once_the_lock_is_lost(make_lock, client):
    """A renewal thread that found its lock gone exits; it does not spin until release()."""
    baseline = len(renewal_threads())
    lock = make_lock(ttl=SHORT_TTL)
    assert lock.acquire()
    assert len(renewal_threads()) == baseline + 1
    client.delete(lock.key)
    assert wait_for(lambda: lock.lost)
    assert wait_for(lambda: len(renewal_threads()) == baseline)


def test_failed_acquire_starts_no_thread(make_lock):
    """Only a successful acquire() starts a renewal thread."""
    assert make_lock(owner="a").acquire()
    baseline = threading.active_count()
    assert make_lock(owner="b").acquire() is False
    assert threading.active_count() == baseline


# --- lock_key -----------------------------------------------------------------------------

KEY_FORMAT = re.compile(re.escape(LOCK_PREFIX) + r"[0-9a-f]{64}")

TRICKY_PAIRS = [
    ("a:b", "c"),
    ("a", "b:c"),
    ("a|b", "c"),
    ("a", "b|c"),
    ("1:a", "b"),
    ("1", "a|b"),
    ("ledger", "*"),
    ("ledger", "acc-*"),
    ("ledger", "?"),
    ("ledger", "[ab]"),
    ("ledger", "{}"),
    ("ledger", "{acc-1}"),
    ("ledger", "acc:1"),
    ("ledger:acc", "1"),
    ("ledger", "acc 1"),
    ("ledger", "acc\n1"),
    ("ledger", "acc\x001"),
    ("ledger", ""),
    ("", "ledger"),
    ("ledger", "x" * 10_000),
    ("ledger", "x" * 10_001),
    ("ledger", "é"),  # precomposed
    ("ledger", "e\u0301"),  # e + combining accent: looks the same, is not
    ("ledger", "账户-1"),
    ("ledger", "🙂"),
    ("lédger", "acc-1"),
]


def test_lock_key_is_collision_free_for_tricky_pairs():
    """Distinct (type, id) pairs never share a key, including pairs that concatenate to
    the same text (("a:b","c") vs ("a","b:c")), glob characters, hash tags, unicode
    look-alikes, empty parts and very long ids."""
    keys = [lock_key(t, i) for t, i in TRICKY_PAIRS]
    assert len(set(keys)) == len(TRICKY_PAIRS)
    assert lock_key("a:b", "c") != lock_key("a", "b:c")


@pytest.mark.parametrize(("stream_type", "stream_id"), TRICKY_PAIRS)
def test_lock_key_has_a_fixed_safe_shape_without_the_raw_id(stream_type, stream_id):
    """Every key is the prefix plus 64 hex digits: no ``*``/``?``/``[``/``{}`` that
    could act as a pattern or Cluster hash tag, bounded length, and never the raw id."""
    key = lock_key(stream_type, stream_id)
    assert KEY_FORMAT.fullmatch(key), key
    if stream_id and not re.fullmatch(r"[0-9a-f]+", stream_id):
        assert stream_id not in key


def test_lock_key_is_stable_and_used_by_stream_lock(client):
    """The key depends only on (type, id) — every worker computes the same one — and it
    is the key StreamLock writes."""
    assert lock_key("ledger", "acc-1") == lock_key("ledger", "acc-1")
    lock = StreamLock(client, "ledger", "acc-1", ttl=LONG_TTL, owner="t")
    assert lock.key == lock_key("ledger", "acc-1")
    assert lock.acquire()
    try:
        assert client.keys("*") == [lock_key("ledger", "acc-1").encode()]
    finally:
        lock.release()
