"""What the contract suites share: odd stream ids, a spy that overrides one method of a
port, seeding a stream and looking at it afterwards."""

from __future__ import annotations

from typing import Any

from eskit_tasks.core.loading import load_state
from eskit_tasks.domain.result import CompactionResult
from eskit_tasks.ports import StreamInfo
from eskit_tasks.testing.contracts.backend import Stores
from eskit_tasks.testing.deciders import Ledger, deposits

ODD_IDS = [
    "it's",
    'quote"d',
    "100%",
    "a_b",
    "%",
    "_",
    "ünï©ødé-账户-🙂",
    "x" * 500,
    "🙂" * 500,
    "a'; DROP TABLE eskit_events; --",
    "*",
    "{a}:b",
    "",
]


def versions(stores: Stores, stream_type: str, stream_id: str, **kw: int) -> list[int]:
    return [e.version for e in stores.events.read(stream_type, stream_id, **kw)]


class Proxy:
    """Delegates everything to ``target`` except the attributes given as overrides."""

    def __init__(self, target: Any, **overrides: Any) -> None:
        self._target = target
        self.__dict__.update(overrides)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)


def seed(
    stores: Stores, amounts: list[int], stream_id: str = "a-1", stream_type: str = "account"
) -> int:
    head = stores.events.head_version(stream_type, stream_id)
    return stores.events.append(stream_type, stream_id, deposits(*amounts), expected_version=head)


def state_of(
    stores: Stores, stream_id: str = "a-1", decider: Any = None, state_type: Any = dict
) -> tuple[Any, int]:
    return load_state(
        stores.events, stores.snapshots, decider or Ledger(), state_type, "account", stream_id
    )


def untouched(stores: Stores, n: int, stream_id: str = "a-1") -> None:
    """Assert that a compaction left no trace: all n events, no snapshot, no audit row."""
    assert versions(stores, "account", stream_id) == list(range(1, n + 1))
    assert stores.snapshots.latest("account", stream_id) is None
    assert all(stores.snapshots.read("account", stream_id, v) is None for v in range(1, n + 1))
    assert stores.events.compaction_log("account", stream_id) == []
    assert info_of(stores, stream_id).compacted_through == 0


def info_of(stores: Stores, stream_id: str = "a-1") -> StreamInfo:
    """The bookkeeping of an ``account`` stream that exists."""
    info = stores.events.stream_info("account", stream_id)
    assert info is not None, f"account/{stream_id} does not exist"
    return info


def error_of(result: CompactionResult) -> str:
    """The error of a result that has one."""
    assert result.error is not None, f"{result.outcome} without an error"
    return result.error
