"""RunProgressStore against a real redis-server (the fleet's ``state`` server).

Each test starts from an empty Redis. The store's updates are Lua scripts; these tests
pin down what a fleet run's summary relies on: each stream counted once, the right
counters per outcome, a fan-out page fixed once for all its copies, the fan-out cursor as
a compare-and-set, and every key expiring.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from eskit_tasks.domain.result import CompactionResult, Outcome
from eskit_tasks.errors import ConfigurationError
from eskit_tasks.fleet import progress as progress_module
from eskit_tasks.fleet.constants import RUN_PREFIX
from eskit_tasks.fleet.progress import Page, RunProgressStore, check_run_id, new_run_id
from eskit_tasks.testing.services import RedisServer

TTL = 600


@pytest.fixture
def client(redis_servers: tuple[RedisServer, RedisServer]) -> Iterator[redis.Redis]:
    _, state = redis_servers
    if state.proc is None:  # a previous test left it stopped
        state.start()
    state.flush()
    c = redis.Redis.from_url(state.url(0))
    yield c
    c.close()


@pytest.fixture
def store(client: redis.Redis) -> RunProgressStore:
    return RunProgressStore(client, ttl=TTL)


def result(
    stream_id: str,
    outcome: Outcome,
    *,
    deleted: int = 0,
    nbytes: int = 0,
    error: str | None = None,
    stream_type: str = "ledger",
) -> CompactionResult:
    return CompactionResult(
        stream_type=stream_type,
        stream_id=stream_id,
        outcome=outcome,
        events_deleted=deleted,
        bytes_reclaimed=nbytes,
        error=error,
        compaction_id=uuid.uuid4().hex,
    )


def run_keys(client: redis.Redis) -> list[bytes]:
    return sorted(client.scan_iter(f"{RUN_PREFIX}*"))


def page(cursor: int, next_cursor: int, *ids: str, last: bool = False) -> Page:
    return Page(cursor, next_cursor, last, tuple(("ledger", i) for i in ids))


# --- create -------------------------------------------------------------------------------


def test_create_starts_an_empty_record(store):
    """A new run has zero counters, cursor 0, the policy as given, and is not finished."""
    run = new_run_id()
    assert store.get(run) is None
    assert not store.exists(run)
    store.create(run, {"min_events": 10, "dry_run": True})
    got = store.get(run)
    assert got is not None
    assert got.run_id == run
    assert got.policy == {"min_events": 10, "dry_run": True}
    assert (got.candidates, got.done, got.outcomes, got.events_deleted) == (0, 0, {}, 0)
    assert store.cursor(run) == 0
    assert got.started_at > 0
    assert not got.fanout_done
    assert not got.finished


def test_create_is_idempotent_and_never_resets_progress(store):
    """A second create (a redelivered first fan-out page) keeps the original policy,
    start time, cursor and counters."""
    run = new_run_id()
    store.create(run, {"min_events": 10})
    before = store.get(run)
    assert before is not None
    first = store.store_page(run, page(0, 7, "s1", "s2", "s3"))
    assert first is not None
    assert store.advance(run, first, depth=0).claimed
    assert store.report(run, result("s1", Outcome.COMPACTED, deleted=5, nbytes=50)).counted
    time.sleep(0.01)
    store.create(run, {"min_events": 999})
    after = store.get(run)
    assert after is not None
    assert after.policy == {"min_events": 10}
    assert after.started_at == before.started_at
    assert store.cursor(run) == 7
    assert (after.candidates, after.done, after.events_deleted) == (3, 1, 5)


# --- report -------------------------------------------------------------------------------


def test_report_counts_a_stream_once_even_if_reported_twice(store):
    """A redelivered compact_stream task reports the same stream again: the second report
    returns False and changes no counter, even with a different outcome or numbers."""
    run = new_run_id()
    store.create(run, {})
    assert (
        store.report(run, result("s1", Outcome.COMPACTED, deleted=10, nbytes=100)).counted is True
    )
    assert (
        store.report(run, result("s1", Outcome.COMPACTED, deleted=10, nbytes=100)).counted is False
    )
    assert store.report(run, result("s1", Outcome.FAILED, error="later copy")).counted is False
    got = store.get(run)
    assert got is not None
    assert got.done == 1
    assert got.outcomes == {"compacted": 1}
    assert (got.events_deleted, got.bytes_reclaimed) == (10, 100)
    assert store.failed_streams(run) == []


def test_report_tells_streams_apart_by_type_and_id(store):
    """Same id under two types, and ids that concatenate alike, are different streams."""
    run = new_run_id()
    store.create(run, {})
    assert store.report(run, result("1", Outcome.NOTHING_TO_COMPACT, stream_type="a")).counted
    assert store.report(run, result("1", Outcome.NOTHING_TO_COMPACT, stream_type="b")).counted
    assert store.report(run, result("c", Outcome.NOTHING_TO_COMPACT, stream_type="a:b")).counted
    assert store.report(run, result("b:c", Outcome.NOTHING_TO_COMPACT, stream_type="a")).counted
    got = store.get(run)
    assert got is not None and got.done == 4


def test_the_same_stream_counts_again_in_another_run(store):
    """Deduplication is per run: a stream reported in run A still counts in run B."""
    a, b = new_run_id(), new_run_id()
    store.create(a, {})
    store.create(b, {})
    assert store.report(a, result("s1", Outcome.COMPACTED, deleted=1)).counted
    assert store.report(b, result("s1", Outcome.COMPACTED, deleted=1)).counted
    ga, gb = store.get(a), store.get(b)
    assert ga is not None and gb is not None
    assert (ga.done, gb.done) == (1, 1)


def test_report_counts_each_outcome(store):
    """outcomes maps each outcome value to how many streams ended that way."""
    run = new_run_id()
    store.create(run, {})
    reported = {
        Outcome.COMPACTED: 3,
        Outcome.DRY_RUN: 2,
        Outcome.NOTHING_TO_COMPACT: 4,
        Outcome.FENCED: 1,
        Outcome.LOCKED: 1,
        Outcome.FAILED: 2,
        Outcome.VERIFICATION_FAILED: 1,
    }
    for outcome, n in reported.items():
        for i in range(n):
            assert store.report(run, result(f"{outcome.value}-{i}", outcome, error="e")).counted
    got = store.get(run)
    assert got is not None
    assert got.outcomes == {o.value: n for o, n in reported.items()}
    assert got.done == sum(reported.values())
    assert got.failed == 5  # every outcome that needs attention: fenced, locked, failed...


def test_only_compacted_counts_as_deleted_and_only_dry_run_as_would_delete(store):
    """events_deleted/bytes_reclaimed sum compacted streams only; dry_run_events/bytes sum
    dry runs only; numbers carried by other outcomes are ignored."""
    run = new_run_id()
    store.create(run, {})
    store.report(run, result("c1", Outcome.COMPACTED, deleted=100, nbytes=1000))
    store.report(run, result("c2", Outcome.COMPACTED, deleted=20, nbytes=200))
    store.report(run, result("d1", Outcome.DRY_RUN, deleted=7, nbytes=70))
    store.report(run, result("d2", Outcome.DRY_RUN, deleted=3, nbytes=30))
    for outcome in (Outcome.FAILED, Outcome.VERIFICATION_FAILED, Outcome.FENCED):
        store.report(run, result(f"x-{outcome.value}", outcome, deleted=5000, nbytes=50000))
    got = store.get(run)
    assert got is not None
    assert (got.events_deleted, got.bytes_reclaimed) == (120, 1200)
    assert (got.dry_run_events, got.dry_run_bytes) == (10, 100)


def test_failed_streams_list_every_stream_a_run_did_not_compact_because_of_a_problem(store):
    """failed_streams lists failed, verification_failed, fenced and locked streams, in
    report order, with outcome and error; compacted/dry_run/nothing_to_compact are not."""
    run = new_run_id()
    store.create(run, {})
    store.report(run, result("ok", Outcome.COMPACTED, deleted=1))
    store.report(run, result("bad", Outcome.FAILED, error="EvolveError: boom at v3"))
    store.report(run, result("fenced", Outcome.FENCED, error="newer compaction"))
    store.report(
        run, result("odd", Outcome.VERIFICATION_FAILED, error="hash mismatch", stream_type="x")
    )
    store.report(run, result("locked", Outcome.LOCKED))
    store.report(run, result("idle", Outcome.NOTHING_TO_COMPACT))
    store.report(run, result("dry", Outcome.DRY_RUN))
    got = [(f.stream_type, f.stream_id, f.outcome, f.error) for f in store.failed_streams(run)]
    assert got == [
        ("ledger", "bad", "failed", "EvolveError: boom at v3"),
        ("ledger", "fenced", "fenced", "newer compaction"),
        ("x", "odd", "verification_failed", "hash mismatch"),
        ("ledger", "locked", "locked", None),
    ]


def test_failed_streams_are_capped_but_still_counted(store, monkeypatch):
    """At most RUN_FAILED_KEEP failed streams are kept (the first ones); the outcome
    counters still count every failure. The cap is read from eskit_tasks.fleet.progress at
    each report call (patching eskit_tasks.fleet.constants would not change it)."""
    monkeypatch.setattr(progress_module, "RUN_FAILED_KEEP", 3)
    run = new_run_id()
    store.create(run, {})
    for i in range(7):
        store.report(run, result(f"f{i}", Outcome.FAILED, error=f"error {i}"))
    kept = store.failed_streams(run)
    assert [f.stream_id for f in kept] == ["f0", "f1", "f2"]
    got = store.get(run)
    assert got is not None
    assert got.outcomes == {"failed": 7}
    assert got.failed == 7


def test_a_duplicate_failed_report_is_not_listed_twice(store):
    """A redelivered failing task does not add a second entry to failed_streams."""
    run = new_run_id()
    store.create(run, {})
    store.report(run, result("bad", Outcome.FAILED, error="boom"))
    store.report(run, result("bad", Outcome.FAILED, error="boom"))
    assert [f.stream_id for f in store.failed_streams(run)] == ["bad"]


def test_report_on_an_unknown_run_is_refused_and_creates_no_keys(store, client):
    """A report for a run that was never created (or already expired) returns False and
    writes nothing: no hash, no streams hash, no failed list."""
    run = new_run_id()
    assert store.report(run, result("bad", Outcome.FAILED, error="boom")) is None
    assert store.report(run, result("ok", Outcome.COMPACTED, deleted=3)) is None
    assert run_keys(client) == []
    assert client.dbsize() == 0
    assert store.get(run) is None


# --- advance (fan-out cursor) -------------------------------------------------------------


def test_a_page_counts_its_streams_as_candidates_once(store):
    """store_page returns the page to send and counts its new streams; a stream already
    counted (named by an earlier page) is not counted again."""
    run = new_run_id()
    store.create(run, {})
    got = store.store_page(run, page(0, 500, "s1", "s2", "s3"))
    assert got == page(0, 500, "s1", "s2", "s3")
    assert store.advance(run, got, depth=0).claimed
    again = store.store_page(run, page(500, 900, "s3", "s4"))
    assert again == page(500, 900, "s3", "s4")
    progress = store.get(run)
    assert progress is not None and progress.candidates == 4


def test_every_copy_of_a_page_gets_the_page_the_first_copy_stored(store):
    """Two copies of one page (a duplicate fan-out, or a retry) read the database at
    different moments and may find different streams: the second gets the first's page
    back, with its next cursor and last flag, and nothing more is counted."""
    run = new_run_id()
    store.create(run, {})
    first = store.store_page(run, page(0, 10000, "s1", "s2", last=True))
    second = store.store_page(run, page(0, 10000, "s1", "s2", "s3", "s4", last=False))
    assert first == second == page(0, 10000, "s1", "s2", last=True)
    progress = store.get(run)
    assert progress is not None and progress.candidates == 2


def test_a_page_keeps_odd_stream_ids_and_types_intact(store):
    """Entries are JSON: quotes, separators, unicode and long ids come back as sent."""
    run = new_run_id()
    store.create(run, {})
    streams = (("a:b", 'x"y'), ("t", "é{*}|:"), ("t", "z" * 5000), ("t", ""))
    got = store.store_page(run, Page(0, 9, True, streams))
    assert got is not None and got.streams == streams


def test_a_page_after_the_cursor_moved_on_is_a_duplicate(store):
    """Once a copy of the page advanced the cursor, a late copy gets None (send nothing)
    and its advance is refused: nothing counted, the cursor stays."""
    run = new_run_id()
    store.create(run, {})
    first = store.store_page(run, page(0, 500, "s1"))
    assert first is not None and store.advance(run, first, depth=0).claimed
    assert store.store_page(run, page(0, 500, "s1", "s9", last=True)) is None
    assert store.advance(run, page(0, 700, "s9", last=True), depth=0).claimed is False
    progress = store.get(run)
    assert progress is not None
    assert (progress.candidates, store.cursor(run), progress.fanout_done) == (1, 500, False)


def test_a_page_of_an_unknown_run_is_refused_and_creates_nothing(store, client):
    assert store.store_page(new_run_id(), page(0, 5, "s1")) is None
    assert client.dbsize() == 0


def test_a_stream_no_page_named_counts_as_a_candidate_when_it_reports(store):
    """A task sent by hand with a run id: its report adds a candidate too, so done never
    passes candidates; a stream a page named is not counted twice."""
    run = new_run_id()
    store.create(run, {})
    store.store_page(run, page(0, 5, "s1"))
    assert store.report(run, result("s1", Outcome.COMPACTED, deleted=1)).counted
    assert store.report(run, result("by-hand", Outcome.COMPACTED, deleted=1)).counted
    progress = store.get(run)
    assert progress is not None and (progress.candidates, progress.done) == (2, 2)


def test_advance_moves_the_cursor_and_keeps_the_deepest_queue(store):
    """advance moves the cursor to the page's next cursor, records the highest queue
    depth seen and, after the last page, fanout_done."""
    run = new_run_id()
    store.create(run, {})
    first = store.store_page(run, page(0, 500, "s1"))
    assert first is not None and store.advance(run, first, depth=40).claimed is True
    last = store.store_page(run, page(500, 731, "s2", last=True))
    assert last is not None and store.advance(run, last, depth=12).claimed is True
    got = store.get(run)
    assert got is not None
    assert store.cursor(run) == 731
    assert got.candidates == 2
    assert got.max_queue_depth == 40
    assert got.fanout_done


def test_advance_is_a_compare_and_set_so_a_duplicate_page_counts_once(store):
    """Two copies of a page both advance from the same cursor; the second call returns
    False and moves no cursor, sets no done and records no depth."""
    run = new_run_id()
    store.create(run, {})
    first = store.store_page(run, page(0, 500, "s1"))
    assert first is not None
    assert store.advance(run, first, depth=0).claimed
    assert store.advance(run, first, depth=0).claimed is False
    assert store.advance(run, page(0, 900, last=True), depth=9999).claimed is False
    got = store.get(run)
    assert got is not None
    assert store.cursor(run) == 500
    assert got.candidates == 1
    assert not got.fanout_done
    assert got.max_queue_depth == 0


def test_advance_on_an_unknown_run_returns_false_and_creates_nothing(store, client):
    """No record, no cursor: the compare fails and no key appears."""
    assert store.advance(new_run_id(), page(0, 5, "s1", last=True), depth=1).claimed is False
    assert client.dbsize() == 0


def test_note_depth_keeps_the_maximum(store):
    """note_depth raises max_queue_depth but never lowers it."""
    run = new_run_id()
    store.create(run, {})
    store.note_depth(run, 2500)
    store.note_depth(run, 2100)
    got = store.get(run)
    assert got is not None and got.max_queue_depth == 2500


# --- finished -----------------------------------------------------------------------------


def test_finished_only_when_fanout_done_and_every_candidate_reported(store):
    """Not finished while the fan-out pages (even if every candidate so far reported);
    not finished while candidates are missing; finished when both hold."""
    run = new_run_id()
    store.create(run, {})
    first = store.store_page(run, page(0, 2, "s1", "s2"))
    assert first is not None and store.advance(run, first, depth=0).claimed
    store.report(run, result("s1", Outcome.COMPACTED, deleted=1))
    store.report(run, result("s2", Outcome.COMPACTED, deleted=1))
    got = store.get(run)
    assert got is not None and got.done == got.candidates == 2
    assert not got.finished  # more pages may come

    last = store.store_page(run, page(2, 3, "s3", last=True))
    assert last is not None and store.advance(run, last, depth=0).claimed
    got = store.get(run)
    assert got is not None and got.fanout_done
    assert not got.finished  # s3 has not reported

    store.report(run, result("s3", Outcome.FAILED, error="boom"))
    got = store.get(run)
    assert got is not None and got.finished


def test_a_run_without_candidates_is_finished_once_the_fanout_is_done(store):
    run = new_run_id()
    store.create(run, {})
    empty = store.store_page(run, page(0, 0, last=True))
    assert empty == page(0, 0, last=True)
    assert store.advance(run, empty, depth=0).claimed
    got = store.get(run)
    assert got is not None and got.finished


def test_an_error_finishes_the_run_at_once(store):
    """fail() records the error; the run is finished although nothing was fanned out."""
    run = new_run_id()
    store.create(run, {})
    store.fail(run, "min_events must be an int >= 1, got 0")
    got = store.get(run)
    assert got is not None
    assert got.error == "min_events must be an int >= 1, got 0"
    assert not got.fanout_done
    assert got.finished


def test_the_call_that_ends_a_run_is_told_so_once(store):
    """What eskit_runs_finished_total counts: of every report, page and check, exactly
    one says it ended a run that needs no finishing step (a report after the last page,
    or the last page after every report), none says so for a run that needs one, and
    the first fail() of a run says it stopped it."""
    by_report = new_run_id()
    store.create(by_report, {})
    last = store.store_page(by_report, page(0, 2, "a", "b", last=True))
    assert last is not None
    assert not store.advance(by_report, last, depth=0).finished
    assert not store.report(by_report, result("a", Outcome.COMPACTED, deleted=1)).finished
    ended = store.report(by_report, result("b", Outcome.FAILED, error="boom"))
    assert ended is not None and ended.finished and not ended.complete
    again = store.report(by_report, result("b", Outcome.FAILED, error="boom"))
    assert again is not None and not again.finished  # a report seen again
    assert not store.advance(by_report, last, depth=0).finished  # a page seen again
    assert not store.needs_finish(by_report)

    by_page = new_run_id()
    store.create(by_page, {})
    first = store.store_page(by_page, page(0, 1, "a", last=True))
    assert first is not None
    assert not store.report(by_page, result("a", Outcome.DRY_RUN)).finished
    assert store.advance(by_page, first, depth=0).finished

    reclaiming = new_run_id()
    store.create(reclaiming, {}, finish=True)
    only = store.store_page(reclaiming, page(0, 1, "a", last=True))
    assert only is not None and not store.advance(reclaiming, only, depth=0).finished
    done = store.report(reclaiming, result("a", Outcome.COMPACTED, deleted=5))
    assert done is not None and done.complete and not done.finished  # finish_run ends it
    assert store.finish(reclaiming, None) and not store.finish(reclaiming, None)

    stopped = new_run_id()
    store.create(stopped, {})
    assert store.fail(stopped, "first") and not store.fail(stopped, "second")
    got = store.get(stopped)
    assert got is not None and got.error == "second"


# --- expiry -------------------------------------------------------------------------------


def test_every_key_of_a_run_has_a_ttl(store, client):
    """After create, store_page, report (incl. a failure), advance, note_depth and fail,
    every key of the run (hash, streams hash, page list, failed list, results stream)
    expires within the store's ttl; advance drops the page it moved past."""
    run = new_run_id()
    store.create(run, {})
    first = store.store_page(run, page(0, 2, "ok", "bad"))
    assert first is not None
    store.report(run, result("ok", Outcome.COMPACTED, deleted=1))
    store.report(run, result("bad", Outcome.FAILED, error="boom"))
    keys = run_keys(client)
    assert len(keys) == 5  # hash, :streams, :page, :failed, :results
    for key in keys:
        assert 0 < client.ttl(key) <= TTL, key
    store.advance(run, first, depth=3)
    store.note_depth(run, 5000)
    store.fail(run, "stopped")
    keys = run_keys(client)
    assert len(keys) == 4  # the page is gone
    for key in keys:
        assert 0 < client.ttl(key) <= TTL, key
    assert client.dbsize() == 4  # nothing outside the run's prefix


def test_keys_of_a_run_share_one_cluster_hash_tag(store, client):
    """All keys of a run carry ``{<run id>}``, so the Lua scripts touch one Cluster slot."""
    run = new_run_id()
    store.create(run, {})
    store.store_page(run, page(0, 1, "bad"))
    store.report(run, result("bad", Outcome.FAILED, error="boom"))
    keys = [k.decode() for k in run_keys(client)]
    assert len(keys) == 5
    assert all(f"{{{run}}}" in k for k in keys)


def test_a_run_expires_after_its_ttl(client):
    """With ttl=1 the run is gone (get() is None, no keys) a little over a second later,
    and a late report does not resurrect it."""
    short = RunProgressStore(client, ttl=1)
    run = new_run_id()
    short.create(run, {})
    short.report(run, result("bad", Outcome.FAILED, error="boom"))
    assert short.get(run) is not None
    deadline = time.monotonic() + 5
    while run_keys(client) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert run_keys(client) == []
    assert short.get(run) is None
    assert short.report(run, result("late", Outcome.COMPACTED, deleted=1)) is None
    assert client.dbsize() == 0


def test_each_update_pushes_the_expiry_back(client):
    """The ttl counts from the last update: a run that keeps reporting stays readable."""
    short = RunProgressStore(client, ttl=2)
    run = new_run_id()
    short.create(run, {})
    for i in range(5):  # 2.5 s in all, longer than the 2 s ttl
        time.sleep(0.5)
        assert short.report(run, result(f"s{i}", Outcome.COMPACTED, deleted=1))
    got = short.get(run)
    assert got is not None and got.done == 5


def test_note_depth_on_an_unknown_run_leaves_no_immortal_key(store, client):
    """note_depth on a run that is not (or no longer) in Redis must not create a key
    without a TTL."""
    store.note_depth(new_run_id(), 2500)
    ttls = {key: client.ttl(key) for key in client.scan_iter("*")}
    assert all(ttl > 0 for ttl in ttls.values()), ttls


# --- run ids ------------------------------------------------------------------------------


def test_new_run_ids_pass_the_check():
    run = new_run_id()
    assert check_run_id(run) == run


@pytest.mark.parametrize(
    "bad",
    [
        "*",
        "../x",
        "{a}",
        "",
        "0" * 31,
        "0" * 33,
        "A" * 32,  # upper case: new_run_id never makes it
        "g" * 32,
        "0" * 31 + "*",
        "0" * 32 + "\n",
        " " + "0" * 31,
        "0" * 16 + "}" + "0" * 15,
        "0" * 8 + "-" + "0" * 23,
        None,
        b"0" * 32,
        1234,
    ],
)
def test_check_run_id_rejects_anything_but_32_lowercase_hex_digits(bad):
    """Run ids become Redis keys: patterns, paths, hash tags, wrong lengths, trailing
    newlines and non-strings are refused with ConfigurationError."""
    with pytest.raises(ConfigurationError, match="not a run id"):
        check_run_id(bad)


@pytest.mark.parametrize("bad", ["*", "{a}", "../x"])
def test_store_methods_refuse_bad_run_ids_before_touching_redis(store, client, bad):
    """Every store method validates the run id first; nothing is written."""
    calls = [
        lambda: store.create(bad, {}),
        lambda: store.get(bad),
        lambda: store.exists(bad),
        lambda: store.cursor(bad),
        lambda: store.report(bad, result("s", Outcome.COMPACTED)),
        lambda: store.store_page(bad, page(0, 1, "s")),
        lambda: store.advance(bad, page(0, 1, "s"), depth=0),
        lambda: store.note_depth(bad, 1),
        lambda: store.fail(bad, "x"),
        lambda: store.failed_streams(bad),
    ]
    for call in calls:
        with pytest.raises(ConfigurationError):
            call()
    assert client.dbsize() == 0
