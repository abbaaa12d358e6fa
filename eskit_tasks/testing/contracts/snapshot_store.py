"""The :class:`~eskit_tasks.ports.SnapshotStore` contract: fenced writes, unverified
snapshots invisible to readers, nothing written at or below the compaction point."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from eskit_tasks.domain.codec import state_hash
from eskit_tasks.errors import CompactionError, FencedError
from eskit_tasks.ports import DeletionPlan, Snapshot
from eskit_tasks.testing.contracts.backend import Stores
from eskit_tasks.testing.deciders import deposits


def snap(version: int, body: bytes = b'{"n":1}') -> Snapshot:
    return Snapshot(version, body, state_hash(body), False, datetime.now(UTC))


class SnapshotStoreContract:
    @pytest.fixture
    def token(self, stores: Stores) -> int:
        stores.events.append("account", "a-1", deposits(1, 2, 3, 4), expected_version=0)
        info = stores.events.acquire_fence("account", "a-1")
        assert info is not None
        return info.fence_token

    def test_saved_snapshot_reads_back_byte_exact_but_is_not_latest(
        self, stores: Stores, token: int
    ) -> None:
        body = '{"name":"ünï","n":1.5}'.encode()
        stores.snapshots.save("account", "a-1", snap(2, body), fence_token=token)
        got = stores.snapshots.read("account", "a-1", 2)
        assert got is not None
        assert (got.state, got.state_hash, got.verified) == (body, state_hash(body), False)
        assert stores.snapshots.latest("account", "a-1") is None, "unverified must be invisible"

    def test_stale_token_cannot_write(self, stores: Stores, token: int) -> None:
        stores.events.acquire_fence("account", "a-1")
        with pytest.raises(FencedError, match="stale"):
            stores.snapshots.save("account", "a-1", snap(2), fence_token=token)
        assert stores.snapshots.read("account", "a-1", 2) is None

    def test_snapshot_for_missing_stream_is_refused(self, stores: Stores) -> None:
        with pytest.raises(CompactionError, match="does not exist"):
            stores.snapshots.save("account", "ghost", snap(1), fence_token=1)

    def test_unverified_leftover_is_replaced(self, stores: Stores, token: int) -> None:
        stores.snapshots.save("account", "a-1", snap(2, b'{"n":1}'), fence_token=token)
        stores.snapshots.save("account", "a-1", snap(2, b'{"n":2}'), fence_token=token)
        got = stores.snapshots.read("account", "a-1", 2)
        assert got is not None and got.state == b'{"n":2}'

    def test_discard_removes_unverified_only_under_current_token(
        self, stores: Stores, token: int
    ) -> None:
        stores.snapshots.save("account", "a-1", snap(2), fence_token=token)
        stores.snapshots.discard("account", "a-1", 2, fence_token=token - 1)
        assert stores.snapshots.read("account", "a-1", 2) is not None
        stores.snapshots.discard("account", "a-1", 2, fence_token=token)
        assert stores.snapshots.read("account", "a-1", 2) is None

    def test_never_writes_at_or_below_compaction_point(self, stores: Stores, token: int) -> None:
        body = b'{"n":3}'
        stores.snapshots.save("account", "a-1", snap(3, body), fence_token=token)
        stores.events.commit_compaction(
            DeletionPlan(
                stream_type="account",
                stream_id="a-1",
                fence_token=token,
                compacted_through_before=0,
                through_version=3,
                head_version=4,
                expected_deleted=3,
                state_hash=state_hash(body),
                bytes_reclaimed=0,
                compaction_id="c1",
            )
        )
        newer = stores.events.acquire_fence("account", "a-1")
        assert newer is not None
        for version in (2, 3):
            with pytest.raises(FencedError, match="already compacted through 3"):
                stores.snapshots.save(
                    "account", "a-1", snap(version), fence_token=newer.fence_token
                )
        latest = stores.snapshots.latest("account", "a-1")
        assert latest is not None and (latest.version, latest.state) == (3, body)
        assert latest.verified
