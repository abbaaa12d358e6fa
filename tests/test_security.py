"""Security checks: stream types and ids are data, never code, patterns or key syntax.

Whatever a stream type or id contains — SQL metacharacters, LIKE wildcards, backslashes,
parameter markers, 10k characters, combining marks, right-to-left overrides, emoji, NFC
and NFD spellings of the same visible text, Redis glob and hash-tag syntax — it must:

* stay inside its query (append/read/compact/load_state on SQLite and PostgreSQL, the
  candidate filter on stream types);
* never be confused with another stream, in particular with a pair that would collide
  if type and id were naively joined (``a:b`` + ``c`` vs ``a`` + ``b:c``): not in the
  database, not in the Redis lock keys, not in a run's per-stream dedupe.

Ids the database cannot store (NUL on PostgreSQL, lone surrogates anywhere) must be
refused with a clear error and nothing written.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import fakeredis
import pytest
import sqlalchemy as sa

from eskit_tasks import (
    CompactionPolicy,
    CompactionResult,
    Compactor,
    ConfigurationError,
    NewEvent,
    Outcome,
    load_state,
)
from eskit_tasks.cli import main as cli_main
from eskit_tasks.errors import StoreError
from eskit_tasks.fleet.constants import LOCK_PREFIX, RUN_PREFIX
from eskit_tasks.fleet.locks import StreamLock, lock_key
from eskit_tasks.fleet.progress import Page, RunProgressStore, check_run_id, new_run_id
from eskit_tasks.stores.driver_errors import PG_KEY_BYTES
from eskit_tasks.stores.schema import compaction_log, events, metadata, snapshots, streams
from eskit_tasks.testing.deciders import Ledger
from tests.backends import PostgresBackend, SqliteBackend, Stores

# -- the hostile values ---------------------------------------------------------------

NFC = unicodedata.normalize("NFC", "r\u00e9sum\u00e9")
NFD = unicodedata.normalize("NFD", NFC)

HOSTILE: dict[str, str] = {
    "sql-drop": "'; DROP TABLE eskit_events; --",
    "sql-or": "x' OR '1'='1",
    "sql-comment": "a/*b*/c -- d",
    "sql-dollar-quote": "$$; DELETE FROM eskit_streams; $$",
    "like-percent": "%",
    "like-underscore": "_",
    "like-mixed": "a%b_c",
    "backslash": "\\",
    "backslash-escapes": "a\\%b\\_c\\\\d\\'",
    "param-markers": "%s ? $1 :name %(x)s {0}",
    "quotes": "\"double\" `back` 'single'",
    "long-10k": "x" * 10_000,
    "long-10k-unicode": "\u8d26\U0001f642" * 5_000,
    "nfc": NFC,
    "nfd": NFD,
    "combining-stack": "a\u0300\u0301\u0302\u0303\u0304",
    "rtl-override": "\u202eexe.txt\u202c",
    "hebrew-arabic": "\u05e9\u05dc\u05d5\u05dd \u0645\u0631\u062d\u0628\u0627",
    "emoji": "\U0001f642",
    "emoji-zwj": "\U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466",
    "emoji-skin-tone": "\U0001f44d\U0001f3fd",
    "zero-width": "a\u200bb\ufeff",
    "redis-star": "*",
    "redis-question": "?",
    "redis-class": "[a]",
    "redis-colon": ":",
    "redis-braces": "{}",
    "redis-hashtag": "{tag}",
    "redis-keyish": f"{LOCK_PREFIX}*",
    "redis-run-keyish": f"{RUN_PREFIX}{{{'0' * 32}}}",
    "empty": "",
    "whitespace": " \t\r\n ",
}

# Pairs (groups) that could collide if type and id were joined naively, compared with
# LIKE, case-folded, trimmed or Unicode-normalised. Every member is a separate stream.
COLLIDING_GROUPS: list[list[tuple[str, str]]] = [
    [("a:b", "c"), ("a", "b:c"), ("a:b:c", ""), ("", "a:b:c")],
    [("a|b", "c"), ("a", "b|c")],
    [("a/b", "c"), ("a", "b/c")],
    [("1:a", "b"), ("1", "a|b"), ("3:1:a", "b")],
    [("ab", ""), ("a", "b"), ("", "ab")],
    [("t", "%"), ("t", "a"), ("t", "_"), ("t", "\\%"), ("t", "\\_"), ("t", "\\")],
    [("t", NFC), ("t", NFD), ("t", NFC.upper()), ("T", NFC)],
    [("t", "{tag}a"), ("t", "{tag}b"), ("t", "{tag}"), ("{tag}", "t")],
    [("t", "b"), ("t", "B"), ("t", "b "), ("t", " b")],
    [("t", "*"), ("t", "acc-1"), ("t", "?"), ("t", "[a]")],
]
ALL_PAIRS = [pair for group in COLLIDING_GROUPS for pair in group]
assert len(set(ALL_PAIRS)) == len(ALL_PAIRS)

MARKERS = "'\"%_\\*?[]{}:|/"


def _ledger_events(base: int, n: int) -> list[NewEvent]:
    """n deposits whose amounts are unique to the stream (base * 1000 + version)."""
    return [NewEvent("Deposited", {"amount": base * 1000 + v}) for v in range(1, n + 1)]


def _expected_state(base: int, n: int) -> tuple[dict[str, int], int]:
    amounts = [base * 1000 + v for v in range(1, n + 1)]
    return {"total": sum(amounts), "count": n, "last": n}, n


def _compactor(stores: Stores, retain_last: int) -> Compactor[dict[str, int]]:
    return Compactor(
        store=stores.events,
        snapshot_store=stores.snapshots,
        decider=Ledger(),
        state_type=dict,
        policy=CompactionPolicy(retain_last=retain_last),
    )


def _row_counts(stores: Stores) -> dict[str, int]:
    engine = stores.events.engine  # type: ignore[attr-defined]
    with engine.connect() as conn:
        return {
            t.name: conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one()
            for t in (streams, events, snapshots, compaction_log)
        }


def _assert_schema_intact(stores: Stores) -> None:
    engine = stores.events.engine  # type: ignore[attr-defined]
    present = set(sa.inspect(engine).get_table_names())
    assert {t.name for t in metadata.sorted_tables} <= present


def _hostile_streams() -> list[tuple[str, str]]:
    """Every hostile value as an id (type "ledger") and as a type (id "id")."""
    pairs = [("ledger", value) for value in HOSTILE.values()]
    pairs += [(value, "id") for value in HOSTILE.values()]
    return pairs


# -- SQL stores: SQLite and PostgreSQL -------------------------------------------------


class HostileIdsContract:
    backend: str

    def test_hostile_ids_round_trip_through_append_read_compact_and_load_state(
        self, stores: Stores
    ):
        """Every hostile value, as a stream id and as a stream type, is appended, read,
        compacted and loaded as its own stream: the events, the audit row and the state
        belong to exactly that stream, and no table was dropped or emptied."""
        assert NFC != NFD and unicodedata.normalize("NFC", NFD) == NFC
        pairs = _hostile_streams()
        assert len(set(pairs)) == len(pairs)
        sizes = {pair: 3 + n % 5 for n, pair in enumerate(pairs)}
        for n, (stream_type, stream_id) in enumerate(pairs):
            head = stores.events.append(
                stream_type,
                stream_id,
                _ledger_events(n, sizes[stream_type, stream_id]),
                expected_version=0,
            )
            assert head == sizes[stream_type, stream_id]

        for n, (stream_type, stream_id) in enumerate(pairs):
            size = sizes[stream_type, stream_id]
            read = list(stores.events.read(stream_type, stream_id))
            assert [(e.version, e.data["amount"]) for e in read] == [
                (v, n * 1000 + v) for v in range(1, size + 1)
            ], (stream_type[:40], stream_id[:40])
            assert stores.events.head_version(stream_type, stream_id) == size

        compactor = _compactor(stores, retain_last=1)
        for n, (stream_type, stream_id) in enumerate(pairs):
            size = sizes[stream_type, stream_id]
            result = compactor.compact(stream_type, stream_id)
            assert result.outcome == Outcome.COMPACTED, result.error
            assert (result.stream_type, result.stream_id) == (stream_type, stream_id)
            assert result.events_deleted == size - 1
            [row] = stores.events.compaction_log(stream_type, stream_id)
            assert (row.stream_type, row.stream_id) == (stream_type, stream_id)
            assert row.compaction_id == result.compaction_id
            got = load_state(
                stores.events, stores.snapshots, Ledger(), dict, stream_type, stream_id
            )
            assert got == _expected_state(n, size)
            assert [e.version for e in stores.events.read(stream_type, stream_id)] == [size]

        _assert_schema_intact(stores)
        assert _row_counts(stores) == {
            "eskit_streams": len(pairs),
            "eskit_events": len(pairs),  # one retained event each
            "eskit_snapshots": len(pairs),
            "eskit_compaction_log": len(pairs),
        }
        # The audit log as a whole holds each stream exactly once, spelled exactly.
        logged = {(r.stream_type, r.stream_id) for r in stores.events.compaction_log(limit=1000)}
        assert logged == set(pairs)

    def test_pairs_that_collide_when_joined_naively_are_separate_streams(self, stores: Stores):
        """("a:b", "c") and ("a", "b:c"), LIKE wildcards and their escapes, NFC and NFD,
        case and surrounding spaces, hash tags and globs: each is its own stream. Compacting
        one member of a group leaves the others exactly as they were."""
        sizes = {pair: 2 + n % 4 for n, pair in enumerate(ALL_PAIRS)}
        for n, pair in enumerate(ALL_PAIRS):
            stores.events.append(*pair, _ledger_events(n, sizes[pair]), expected_version=0)

        compactor = _compactor(stores, retain_last=0)
        for group in COLLIDING_GROUPS:
            first, *others = group
            assert compactor.compact(*first).outcome == Outcome.COMPACTED
            assert list(stores.events.read(*first)) == []
            for pair in others:
                n = ALL_PAIRS.index(pair)
                assert [e.data["amount"] for e in stores.events.read(*pair)] == [
                    n * 1000 + v for v in range(1, sizes[pair] + 1)
                ], (first, pair)
                assert stores.events.compaction_log(*pair) == []
                info = stores.events.stream_info(*pair)
                assert info is not None and info.compacted_through == 0

        for n, pair in enumerate(ALL_PAIRS):
            if pair not in [g[0] for g in COLLIDING_GROUPS]:
                assert compactor.compact(*pair).outcome == Outcome.COMPACTED
            state = load_state(stores.events, stores.snapshots, Ledger(), dict, *pair)
            assert state == _expected_state(n, sizes[pair]), pair
            [row] = stores.events.compaction_log(*pair)
            assert (row.stream_type, row.stream_id) == pair
            assert row.events_deleted == sizes[pair]
        assert _row_counts(stores)["eskit_streams"] == len(ALL_PAIRS)

    def test_appending_to_one_of_a_colliding_pair_does_not_move_the_others_head(
        self, stores: Stores
    ):
        """Optimistic concurrency is per stream: the head of ("a", "b:c") is not the head
        of ("a:b", "c"), so a writer of one can neither block nor overwrite the other."""
        stores.events.append("a:b", "c", _ledger_events(1, 3), expected_version=0)
        stores.events.append("a", "b:c", _ledger_events(2, 1), expected_version=0)
        assert stores.events.append("a", "b:c", _ledger_events(3, 1), expected_version=1) == 2
        assert stores.events.head_version("a:b", "c") == 3
        assert stores.events.append("a:b", "c", _ledger_events(4, 1), expected_version=3) == 4
        assert stores.events.head_version("a", "b:c") == 2

    def test_candidates_filter_matches_stream_types_exactly_not_as_patterns(self, stores: Stores):
        """The candidate filter compares stream types for equality: "%" does not match
        every type, "a_c" does not match "axc", a backslash does not escape anything and a
        quote does not end the query — on every page of a paged scan."""
        types = [
            "%",
            "_",
            "a%",
            "a%c",
            "abc",
            "a_c",
            "axc",
            "A_C",
            "a_c ",
            "a\\_c",
            "a\\",
            "\\",
            "*",
            "[a]c",
            "'; DROP TABLE eskit_streams; --",
            "' OR '1'='1",
        ]
        for n, stream_type in enumerate(types):
            for k in range(2):  # two streams per type, so paging crosses types
                stores.events.append(
                    stream_type, f"s{k}", _ledger_events(n, 2 + k), expected_version=0
                )

        def paged(filter_types: list[str], limit: int) -> list[tuple[str, str]]:
            found, after = [], 0
            while True:
                page = stores.events.candidates(after=after, limit=limit, stream_types=filter_types)
                found += [(c.stream_type, c.stream_id) for c in page]
                if len(page) < limit:
                    return found
                after = page[-1].key

        for stream_type in types:
            expected = [(stream_type, "s0"), (stream_type, "s1")]
            for limit in (1, 3, 500):
                assert paged([stream_type], limit) == expected, (stream_type, limit)
            bounded = stores.events.candidates(
                until=stores.events.max_stream_key(), stream_types=[stream_type]
            )
            assert [(c.stream_type, c.stream_id) for c in bounded] == expected
        assert sorted(paged(["%", "_"], 1)) == [("%", "s0"), ("%", "s1"), ("_", "s0"), ("_", "s1")]
        for absent in ("a.c", "ab%", "%%", "a__", "'", "' OR 1=1 --", ""):
            assert paged([absent], 2) == [], absent
        min_live = stores.events.candidates(min_live_events=3, stream_types=["%"])
        assert [(c.stream_type, c.stream_id, c.live_events) for c in min_live] == [("%", "s1", 3)]
        _assert_schema_intact(stores)
        assert _row_counts(stores)["eskit_streams"] == 2 * len(types)

    def test_unencodable_text_is_refused_before_anything_is_written(self, stores: Stores):
        """A lone surrogate cannot be stored as text by any database: a clear
        ConfigurationError, and nothing written."""
        for stream_type, stream_id in [("ledger", "a\ud800b"), ("t\udfff", "id")]:
            with pytest.raises(ConfigurationError, match="valid Unicode text"):
                stores.events.append(
                    stream_type, stream_id, _ledger_events(1, 2), expected_version=0
                )
        assert all(count == 0 for count in _row_counts(stores).values())

    def test_long_incompressible_ids_are_valid_ids_or_refused_cleanly(self, stores: Stores):
        """Long ids that do not compress (random text, not "xxxx..."): SQLite stores them;
        PostgreSQL's unique index cannot hold them, and the store says so with a
        ConfigurationError naming the limit, writing nothing. Ids up to the documented
        limit work everywhere."""
        noise = "".join(hashlib.sha256(str(i).encode()).hexdigest() for i in range(160))
        long_id = noise[:10_000]
        long_type = noise[::-1][:10_000]
        at_limit = noise[: PG_KEY_BYTES - len("ledger")]
        cases = [("ledger", long_id), (long_type, "id"), ("ledger", at_limit)]
        for n, (stream_type, stream_id) in enumerate(cases):
            too_long = self.backend == "postgres" and stream_id != at_limit
            if too_long:
                with pytest.raises(ConfigurationError, match=f"under {PG_KEY_BYTES:,} bytes"):
                    stores.events.append(
                        stream_type, stream_id, _ledger_events(n, 3), expected_version=0
                    )
                assert stores.events.stream_info(stream_type, stream_id) is None
                assert all(count == 0 for count in _row_counts(stores).values())
                continue
            stores.events.append(stream_type, stream_id, _ledger_events(n, 3), expected_version=0)
            result = _compactor(stores, retain_last=1).compact(stream_type, stream_id)
            assert result.outcome == Outcome.COMPACTED, result.error
            got = load_state(
                stores.events, stores.snapshots, Ledger(), dict, stream_type, stream_id
            )
            assert got == _expected_state(n, 3)


class TestHostileIdsSqlite(HostileIdsContract, SqliteBackend):
    def test_nul_in_ids_is_data_on_sqlite(self, stores: Stores):
        """SQLite stores NUL inside text: "a\\x00b", "a\\x00c" and "a" are three streams,
        not one truncated at the NUL."""
        pairs = [("t", "a\x00b"), ("t", "a\x00c"), ("t", "a"), ("t\x00x", "a"), ("t", "\x00")]
        for n, pair in enumerate(pairs):
            stores.events.append(*pair, _ledger_events(n, 2 + n), expected_version=0)
        compactor = _compactor(stores, retain_last=1)
        for n, pair in enumerate(pairs):
            assert compactor.compact(*pair).outcome == Outcome.COMPACTED
            got = load_state(stores.events, stores.snapshots, Ledger(), dict, *pair)
            assert got == _expected_state(n, 2 + n), pair
            [row] = stores.events.compaction_log(*pair)
            assert (row.stream_type, row.stream_id) == pair
        assert _row_counts(stores)["eskit_streams"] == len(pairs)

    def test_cli_candidates_filter_is_exact_too(self, stores: Stores, capsys, tmp_path: Path):
        """The same through the command line: --stream-type "%" lists only type "%"."""
        import json

        for stream_type in ("%", "a", "_"):
            stores.events.append(stream_type, "s", _ledger_events(1, 2), expected_version=0)
        url = stores.url
        assert url is not None
        code = cli_main(["candidates", "--database", url, "--stream-type", "%", "--json"])
        out = capsys.readouterr().out
        assert code == 0
        assert [(c["stream_type"], c["stream_id"]) for c in json.loads(out)] == [("%", "s")]


class TestHostileIdsPostgres(HostileIdsContract, PostgresBackend):
    @pytest.mark.parametrize(
        ("stream_type", "stream_id", "event_type"),
        [
            ("ledger", "a\x00b", "Deposited"),
            ("led\x00ger", "a", "Deposited"),
            ("ledger", "\x00", "Deposited"),
            ("ledger", "a", "Depo\x00sited"),
        ],
    )
    def test_nul_is_refused_with_a_clear_error_and_nothing_written(
        self, stores: Stores, stream_type, stream_id, event_type
    ):
        """PostgreSQL text cannot hold NUL. An append naming one (in the type, the id or
        an event type) fails with a StoreError that says so, and writes nothing — not
        the stream row, not a truncated "a" stream, not an event."""
        stores.events.append("ledger", "other", _ledger_events(9, 2), expected_version=0)
        before = _row_counts(stores)
        with pytest.raises(StoreError, match="NUL") as info:
            stores.events.append(
                stream_type,
                stream_id,
                [NewEvent(event_type, {"amount": 1})],
                expected_version=0,
            )
        assert "Traceback" not in str(info.value)
        assert _row_counts(stores) == before
        assert stores.events.head_version("ledger", "a") == 0
        assert stores.events.head_version("ledger", "other") == 2
        # Reading such a stream is refused just as clearly, never answered for "a".
        if "\x00" in stream_type + stream_id:
            with pytest.raises(StoreError, match="NUL"):
                stores.events.head_version(stream_type, stream_id)
            result = _compactor(stores, retain_last=0).compact(stream_type, stream_id)
            assert result.outcome == Outcome.FAILED
            assert result.error is not None and "NUL" in result.error
        assert _row_counts(stores) == before


# -- Redis: lock keys ------------------------------------------------------------------


@pytest.fixture
def fake_redis() -> Iterator[fakeredis.FakeRedis]:
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    yield client
    client.close()


LOCK_PAIRS = ALL_PAIRS + [("ledger", value) for value in HOSTILE.values()]


def test_lock_keys_of_colliding_and_pattern_like_ids_are_distinct_and_opaque():
    """Every stream gets its own lock key; the key never contains the raw type or id,
    so a glob, a hash tag or a colon in an id is never Redis key syntax."""
    pairs = list(dict.fromkeys(LOCK_PAIRS))
    keys = [lock_key(*pair) for pair in pairs]
    assert len(set(keys)) == len(pairs)
    for (stream_type, stream_id), key in zip(pairs, keys, strict=True):
        suffix = key.removeprefix(LOCK_PREFIX)
        assert len(suffix) == 64 and set(suffix) <= set("0123456789abcdef"), key
        assert not set(suffix) & set(MARKERS)
        for raw in (stream_type, stream_id):
            if len(raw) > 2 and not set(raw) <= set("0123456789abcdef"):
                assert raw not in key


def test_a_lock_on_one_stream_never_blocks_a_colliding_one(fake_redis):
    """All locks held at once: each stream's lock is taken by its own owner; a second
    taker of the same stream is refused (so the lock works), and releasing one (the
    lock of id "*") frees only that one."""
    pairs = list(dict.fromkeys(LOCK_PAIRS))
    held: list[StreamLock] = []
    try:
        for n, pair in enumerate(pairs):
            lock = StreamLock(fake_redis, *pair, ttl=30, owner=f"owner-{n}")
            assert lock.acquire(), f"{pair!r} was blocked by another stream's lock"
            held.append(lock)
        assert len(fake_redis.keys("*")) == len(pairs)
        for n, (pair, lock) in enumerate(zip(pairs, held, strict=True)):
            assert lock.holder() == f"owner-{n}", pair
            rival = StreamLock(fake_redis, *pair, ttl=30, owner="rival")
            assert rival.acquire() is False, pair
        # Exactly one opaque key per stream, nothing else.
        assert {k.decode() for k in fake_redis.keys("*")} == {lock_key(*p) for p in pairs}
        star = pairs.index(("t", "*"))
        held[star].release()
        assert fake_redis.get(held[star].key) is None
        assert len(fake_redis.keys("*")) == len(pairs) - 1
        again = StreamLock(fake_redis, "t", "*", ttl=30, owner="next")
        assert again.acquire()
        held.append(again)
        for n, lock in enumerate(held[:-1]):
            if n != star:
                assert lock.holder() == f"owner-{n}"
    finally:
        for lock in held:
            lock.release()


# -- Redis: a run's per-stream dedupe --------------------------------------------------


def _result(stream_type: str, stream_id: str, outcome: Outcome, n: int) -> CompactionResult:
    return CompactionResult(
        stream_type=stream_type,
        stream_id=stream_id,
        outcome=outcome,
        events_deleted=n,
        bytes_reclaimed=10 * n,
        error=None if outcome == Outcome.COMPACTED else f"failed {stream_type!r}/{stream_id!r}",
        compaction_id=f"c-{n}",
    )


def test_run_progress_counts_every_colliding_stream_once(fake_redis):
    """A run's streams hash tells ("a:b", "c") from ("a", "b:c"), NFC from NFD, "*" from
    "acc-1": a fan-out page of them comes back exactly and counts each as a candidate,
    each reports once, a repeated report of any of them is ignored, and the totals add
    up per stream."""
    progress = RunProgressStore(fake_redis, ttl=600)
    run_id = new_run_id()
    progress.create(run_id, {"min_events": 1})
    pairs = list(dict.fromkeys(LOCK_PAIRS))
    stored = progress.store_page(run_id, Page(0, 1, True, tuple(pairs)))
    assert stored is not None and list(stored.streams) == pairs
    for n, pair in enumerate(pairs, start=1):
        assert progress.report(run_id, _result(*pair, Outcome.COMPACTED, n)).counted is True, pair
    for n, pair in enumerate(pairs, start=1):
        assert progress.report(run_id, _result(*pair, Outcome.COMPACTED, n)).counted is False, pair
    got = progress.get(run_id)
    assert got is not None
    assert got.done == got.candidates == len(pairs)
    assert got.outcomes == {"compacted": len(pairs)}
    assert got.events_deleted == sum(range(1, len(pairs) + 1))
    # Only the run's own keys exist, named by the run id, never by a stream id.
    keys = {k.decode() for k in fake_redis.keys("*")}
    base = f"{RUN_PREFIX}{{{run_id}}}"
    assert keys == {base, f"{base}:streams", f"{base}:page", f"{base}:results"}
    assert fake_redis.hlen(f"{base}:streams") == len(pairs)


def test_failed_streams_keep_hostile_ids_exactly(fake_redis):
    """The failed-stream list of a run gives back every hostile type and id exactly as
    reported (quotes, newlines, RTL marks, NFD, 10k characters), each once."""
    progress = RunProgressStore(fake_redis, ttl=600)
    run_id = new_run_id()
    progress.create(run_id, {})
    pairs = [*COLLIDING_GROUPS[0], *COLLIDING_GROUPS[6], *_hostile_streams()]
    for n, pair in enumerate(pairs):
        assert progress.report(run_id, _result(*pair, Outcome.FAILED, n)).counted is True
        assert progress.report(run_id, _result(*pair, Outcome.FAILED, n)).counted is False
    failed = progress.failed_streams(run_id)
    assert [(f.stream_type, f.stream_id) for f in failed] == pairs
    assert all(f.outcome == "failed" for f in failed)
    got = progress.get(run_id)
    assert got is not None and got.failed == len(pairs)


@pytest.mark.parametrize("bad", ["*", "{x}", "0" * 31 + "*", "A" * 32, "../" + "0" * 29, ""])
def test_run_ids_that_are_not_ours_never_become_redis_keys(fake_redis, bad):
    """Run ids are part of Redis key names, so only 32 hex digits are accepted."""
    with pytest.raises(ConfigurationError, match="not a run id"):
        check_run_id(bad)
    progress = RunProgressStore(fake_redis, ttl=600)
    with pytest.raises(ConfigurationError):
        progress.create(bad, {})
    with pytest.raises(ConfigurationError):
        progress.report(bad, _result("t", "i", Outcome.COMPACTED, 1))
    assert fake_redis.keys("*") == []
