"""The pre-deploy check: `verify_snapshots` and `eskit-tasks verify-snapshots`."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from eskit_tasks import (
    CompactionPolicy,
    Compactor,
    ConfigurationError,
    Snapshot,
    SqlEventStore,
    SqlSnapshotStore,
    StateCodec,
    verify_snapshots,
)
from eskit_tasks.cli import Exit, main
from eskit_tasks.errors import UnknownStreamTypeError
from eskit_tasks.testing.contracts.helpers import Proxy
from eskit_tasks.testing.deciders import Balances, BalanceV1, BalanceV2, Ledger, deposits
from tests.backends import MemoryBackend, PostgresBackend, SqliteBackend, Stores


def _compact(stores: Stores, stream_type: str, stream_id: str, decider, state_type) -> None:
    stores.events.append(stream_type, stream_id, deposits(1, 2, 3), expected_version=0)
    result = Compactor(
        store=stores.events,
        snapshot_store=stores.snapshots,
        decider=decider,
        state_type=state_type,
        policy=CompactionPolicy(retain_last=1),
    ).compact(stream_type, stream_id)
    assert result.outcome == "compacted", result.error


class VerifyContract:
    def test_reports_each_kind_of_unusable_snapshot_and_passes_the_rest(self, stores: Stores):
        for i in range(7):
            _compact(stores, "balance", f"ok-{i}", Balances(), BalanceV1)
        _compact(stores, "balance", "tampered", Balances(), BalanceV1)
        _compact(stores, "ledger", "l-1", Ledger(), dict)
        _compact(stores, "ghost", "g-1", Ledger(), dict)
        stores.events.append("balance", "never-compacted", deposits(1), expected_version=0)
        stores.tamper_snapshot("balance", "tampered", 2, b'{"balance":999}')
        codecs = {"balance": StateCodec(BalanceV1), "ledger": StateCodec(dict)}

        def codec_of(stream_type: str):
            if stream_type not in codecs:
                raise UnknownStreamTypeError(f"no decider registered for {stream_type!r}")
            return codecs[stream_type]

        report = verify_snapshots(stores.snapshots, codec_of=codec_of, page_size=3)
        assert (report.checked, report.failed, report.ok) == (10, 2, False)
        assert report.by_type["balance"].checked == 8
        assert report.by_type["balance"].failed == {"integrity": 1}
        assert report.by_type["ghost"].failed == {"unregistered": 1}
        assert {(p.stream_id, p.kind, p.version) for p in report.problems} == {
            ("tampered", "integrity", 2),
            ("g-1", "unregistered", 2),
        }
        # The deploy that would break every balance snapshot is caught before it happens.
        codecs["balance"] = StateCodec(BalanceV2)
        report = verify_snapshots(stores.snapshots, codec_of=codec_of, stream_types=["balance"])
        assert report.by_type["balance"].failed == {"integrity": 1, "schema": 7}
        assert set(report.by_type) == {"balance"}
        assert any("written for another state schema" in p.error for p in report.problems)
        codecs["balance"] = StateCodec(
            BalanceV2,
            upcasters={StateCodec(BalanceV1).marker.fingerprint: lambda s: {**s, "deposits": 0}},
        )
        report = verify_snapshots(stores.snapshots, codec_of=codec_of, stream_types=["balance"])
        assert report.by_type["balance"].failed == {"integrity": 1}

    def test_a_running_compactions_unverified_snapshot_is_not_the_one_checked(self, stores: Stores):
        _compact(stores, "ledger", "l-1", Ledger(), dict)  # verified snapshot at 2
        stores.events.append("ledger", "l-1", deposits(4, 5), expected_version=3)
        fence = stores.events.acquire_fence("ledger", "l-1")
        assert fence is not None
        half_done = Snapshot(4, b"not yet verified", "0" * 64, False, datetime.now(UTC))
        stores.snapshots.save("ledger", "l-1", half_done, fence_token=fence.fence_token)
        [found] = stores.snapshots.verified_snapshots()
        assert (found.stream_id, found.snapshot.version, found.snapshot.verified) == (
            "l-1",
            2,
            True,
        )
        report = verify_snapshots(stores.snapshots, codec_of=lambda _t: StateCodec(dict))
        assert (report.checked, report.ok) == (1, True)

    def test_snapshots_are_read_page_by_page(self, stores: Stores):
        for i in range(5):
            _compact(stores, "ledger", f"l-{i}", Ledger(), dict)
        pages: list[int] = []

        def verified_snapshots(**kwargs):
            page = stores.snapshots.verified_snapshots(**kwargs)
            pages.append(len(page))
            return page

        spy = Proxy(stores.snapshots, verified_snapshots=verified_snapshots)
        report = verify_snapshots(spy, codec_of=lambda _t: StateCodec(dict), page_size=2)
        assert (report.checked, report.ok, pages) == (5, True, [2, 2, 1, 0])

    def test_a_compacted_stream_whose_snapshot_is_gone_is_reported_missing(self, stores: Stores):
        _compact(stores, "balance", "ok", Balances(), BalanceV1)
        _compact(stores, "balance", "lost", Balances(), BalanceV1)
        stores.remove_snapshot("balance", "lost", 2)
        report = verify_snapshots(stores.snapshots, codec_of=lambda _t: StateCodec(BalanceV1))
        assert (report.checked, report.failed) == (2, 1)
        assert report.by_type["balance"].failed == {"missing": 1}
        [problem] = report.problems
        assert (problem.stream_id, problem.kind, problem.version) == ("lost", "missing", 2)
        assert "compacted through 2, but its verified snapshot is missing" in problem.error

    def test_an_empty_store_is_ok(self, stores: Stores):
        report = verify_snapshots(stores.snapshots, codec_of=lambda _t: StateCodec(dict))
        assert (report.checked, report.ok) == (0, True)

    def test_a_page_size_below_one_is_refused_not_an_empty_pass(self, stores: Stores):
        _compact(stores, "ledger", "l-1", Ledger(), dict)
        with pytest.raises(ConfigurationError, match="page_size"):
            verify_snapshots(stores.snapshots, codec_of=lambda _t: StateCodec(dict), page_size=0)


class TestVerifyMemory(MemoryBackend, VerifyContract):
    pass


class TestVerifySqlite(SqliteBackend, VerifyContract):
    pass


class TestVerifyPostgres(PostgresBackend, VerifyContract):
    pass


# -- the command line (SQLite; the `ledger` type comes from tests.fleet_deciders) ------------


def test_cli_passes_then_fails_with_exit_4_naming_the_stream(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    db = f"sqlite:///{tmp_path / 'v.db'}"
    store = SqlEventStore.from_url(db)
    for stream_id in ("a", "b"):
        store.append("ledger", stream_id, deposits(1, 2, 3), expected_version=0)
        assert main(["compact", "ledger", stream_id, "--database", db]) == 0
    capsys.readouterr()
    assert main(["verify-snapshots", "--database", db]) == Exit.OK
    out = capsys.readouterr().out
    assert "2 snapshots checked, 0 cannot be used" in out and "ledger" in out

    with store.engine.begin() as conn:
        conn.exec_driver_sql(
            'UPDATE eskit_snapshots SET state = \'{"total":1,"count":3,"last":3}\' '
            "WHERE stream_pk = (SELECT pk FROM eskit_streams WHERE stream_id = 'b')"
        )
    assert main(["verify-snapshots", "--database", db]) == Exit.FAILED_STREAMS
    out = capsys.readouterr().out
    assert "2 snapshots checked, 1 cannot be used" in out
    assert "integrity: ledger/b: the snapshot at version 3 does not match its stored hash" in out
    assert "Do not deploy" in out

    assert main(["verify-snapshots", "--database", db, "--json"]) == Exit.FAILED_STREAMS
    report = json.loads(capsys.readouterr().out)
    assert (report["checked"], report["failed"]) == (2, 1)
    assert report["by_type"]["ledger"] == {"checked": 2, "failed": 1, "by_kind": {"integrity": 1}}
    assert report["problems"][0]["stream_id"] == "b"
    # Read-only: the snapshot is still there, still verified, and nothing else changed.
    snap = SqlSnapshotStore(store.engine).latest("ledger", "b")
    assert snap is not None and snap.verified
    store.engine.dispose()


def test_cli_filters_by_stream_type_and_names_unregistered_types(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    db = f"sqlite:///{tmp_path / 'v.db'}"
    store = SqlEventStore.from_url(db)
    stores = Stores(store, SqlSnapshotStore(store.engine))
    _compact(stores, "nobody-registered-this", "x", Ledger(), dict)
    assert main(["verify-snapshots", "--database", db, "--stream-type", "ledger"]) == Exit.OK
    capsys.readouterr()
    assert main(["verify-snapshots", "--database", db]) == Exit.FAILED_STREAMS
    out = capsys.readouterr().out
    assert "unregistered: no decider registered for stream type 'nobody-registered-this'" in out
    store.engine.dispose()
