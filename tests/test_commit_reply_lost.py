"""A deletion whose COMMIT reply is lost on the wire, on real PostgreSQL.

The Compactor talks to PostgreSQL through a TCP proxy (tests/tcp_proxy.py) that lets the
delete's COMMIT reach the server, waits for the server's reply — the transaction has
committed — and then drops that reply and cuts the connection. The driver sees a dead
connection in the middle of COMMIT; the events are gone all the same. The result must
say so (settled from the audit log over a new connection), not "failed, nothing
deleted".
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy.engine import make_url

from eskit_tasks import (
    CompactionPolicy,
    Compactor,
    NewEvent,
    Outcome,
    SqlEventStore,
    SqlSnapshotStore,
    load_state,
)
from eskit_tasks.errors import DatabaseUnavailableError
from eskit_tasks.stores.schema import metadata
from eskit_tasks.testing.deciders import Ledger, ledger_fold
from tests.tcp_proxy import PgProxy

N = 100
KEEP = 10


@pytest.fixture
def proxy(postgres_url: str) -> Iterator[PgProxy]:
    server = make_url(postgres_url)
    with PgProxy((server.host or "127.0.0.1", server.port or 5432)) as running:
        yield running


@pytest.fixture
def store(proxy: PgProxy, postgres_url: str) -> Iterator[SqlEventStore]:
    """An event store that reaches the session's database through the proxy only."""
    url = make_url(postgres_url).set(host="127.0.0.1", port=proxy.port)
    store = SqlEventStore.from_url(url)
    with store.engine.begin() as conn:
        names = ", ".join(t.name for t in metadata.sorted_tables)
        conn.exec_driver_sql(f"TRUNCATE {names} RESTART IDENTITY")
    yield store
    store.engine.dispose()


def _seed(store: SqlEventStore, stream_id: str) -> None:
    events = [NewEvent("Deposited", {"amount": v}) for v in range(1, N + 1)]
    store.append("account", stream_id, events, expected_version=0)


def _compact(store: SqlEventStore, stream_id: str):
    return Compactor(
        store=store,
        snapshot_store=SqlSnapshotStore(store.engine),
        decider=Ledger(),
        state_type=dict,
        policy=CompactionPolicy(retain_last=KEEP),
    ).compact("account", stream_id)


def _assert_compacted_once(store: SqlEventStore, stream_id: str, result) -> None:
    [row] = store.compaction_log("account", stream_id)
    assert result.compaction_id == row.compaction_id
    assert (row.events_deleted, row.through_version) == (N - KEEP, N - KEEP)
    assert (result.events_deleted, result.snapshot_version) == (N - KEEP, N - KEEP)
    assert (result.head_version, result.events_retained) == (N, KEEP)
    assert result.bytes_reclaimed == row.bytes_reclaimed > 0
    assert [e.version for e in store.read("account", stream_id)] == list(range(N - KEEP + 1, N + 1))
    snapshots = SqlSnapshotStore(store.engine, create_tables=False)
    latest = snapshots.latest("account", stream_id)
    assert latest is not None and latest.version == N - KEEP
    state = load_state(store, snapshots, Ledger(), dict, "account", stream_id)
    assert state == (ledger_fold(list(range(1, N + 1))), N)


def test_through_the_unarmed_proxy_a_compaction_is_a_plain_one(
    proxy: PgProxy, store: SqlEventStore
):
    _seed(store, "plain")
    result = _compact(store, "plain")
    assert (result.outcome, result.recovered, result.error) == (Outcome.COMPACTED, False, None)
    _assert_compacted_once(store, "plain", result)
    assert proxy.dropped == [] and proxy.connections >= 1


def test_a_commit_whose_reply_is_lost_is_reported_as_the_deletion_it_was(
    proxy: PgProxy, store: SqlEventStore
):
    _seed(store, "a-1")
    raised: list[BaseException] = []
    real = store.commit_compaction

    def commit_compaction(plan):  # a spy: what the driver made of the lost reply
        try:
            return real(plan)
        except BaseException as exc:
            raised.append(exc)
            raise

    store.commit_compaction = commit_compaction  # type: ignore[method-assign]
    proxy.lose_commit_reply_after(b"DELETE FROM eskit_events")
    result = _compact(store, "a-1")

    # The proxy did lose a COMMIT's reply (this test is not vacuous): the server had
    # answered that COMMIT succeeded, and the client never got the answer.
    assert proxy.reply_dropped.is_set() and not proxy.armed
    [dropped] = proxy.dropped
    # psycopg 3 sends COMMIT as a simple query ('Q'); the extended protocol would be 'P'.
    assert dropped.commit[:1] in (b"Q", b"P") and b"COMMIT" in dropped.commit
    assert b"C\x00\x00\x00\x0bCOMMIT\x00" in dropped.reply  # CommandComplete "COMMIT"
    assert dropped.reply.endswith(b"Z\x00\x00\x00\x05I")  # ReadyForQuery, idle again
    [error] = raised  # the delete transaction ended in a dead connection, not a refusal
    assert isinstance(error, DatabaseUnavailableError), repr(error)

    assert result.outcome == Outcome.COMPACTED, result  # before the fix: failed, 0 deleted
    assert (result.recovered, result.error, result.error_type) == (True, None, None)
    _assert_compacted_once(store, "a-1", result)
    # A second compaction finds nothing more to delete and the stream stays whole.
    again = _compact(store, "a-1")
    assert (again.outcome, again.events_deleted) == (Outcome.NOTHING_TO_COMPACT, 0)
    assert len(store.compaction_log("account", "a-1")) == 1
