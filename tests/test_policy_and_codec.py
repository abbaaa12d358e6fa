"""Pure units: the cut arithmetic, policy validation, the state codec."""

from __future__ import annotations

import dataclasses
import hashlib
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eskit_tasks import CompactionPolicy, InvalidPolicyError, SnapshotCodecError
from eskit_tasks.codec import StateCodec, state_hash
from eskit_tasks.policy import plan_cut
from tests.deciders import LedgerModel


@pytest.mark.parametrize(
    ("head", "done", "retain", "old", "cut"),
    [
        (10, 0, 0, None, 10),
        (10, 0, 3, None, 7),
        (10, 7, 3, None, None),  # C == P: nothing to do
        (10, 8, 3, None, None),  # C < P
        (10, 0, 0, 4, 4),  # age rule is stricter
        (10, 0, 8, 4, 2),  # count rule is stricter
        (10, 4, 0, 4, None),  # nothing old enough beyond P
        (0, 0, 0, None, None),
        (5, 0, 5, None, None),
        (5, 0, 50, None, None),
    ],
)
def test_plan_cut(head, done, retain, old, cut):
    assert (
        plan_cut(head=head, compacted_through=done, retain_last=retain, newest_old_enough=old)
        == cut
    )


@given(
    st.integers(0, 10**6),
    st.integers(0, 10**6),
    st.integers(0, 10**6),
    st.none() | st.integers(0, 10**6),
)
def test_cut_never_exceeds_either_rule_and_is_above_previous_point(head, done, retain, old):
    done = min(done, head)
    cut = plan_cut(head=head, compacted_through=done, retain_last=retain, newest_old_enough=old)
    if cut is not None:
        assert done < cut <= head - retain
        assert old is None or cut <= old


def test_policy_defaults_and_cutoff():
    policy = CompactionPolicy()
    assert (policy.retain_last, policy.retain_younger_than, policy.dry_run) == (0, None, False)
    now = datetime(2026, 1, 31, tzinfo=UTC)
    assert policy.age_cutoff(now) is None
    aged = CompactionPolicy(retain_younger_than=timedelta(days=30))
    assert aged.age_cutoff(now) == datetime(2026, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("30d", timedelta(days=30)),
        ("12h", timedelta(hours=12)),
        ("90m", timedelta(minutes=90)),
        ("1.5s", timedelta(seconds=1.5)),
        ("2w", timedelta(weeks=2)),
        ("P3D", timedelta(days=3)),
        (3600, timedelta(hours=1)),
        (timedelta(minutes=5), timedelta(minutes=5)),
    ],
)
def test_retain_younger_than_accepts_operator_forms(given, expected):
    assert CompactionPolicy(retain_younger_than=given).retain_younger_than == expected


def test_policy_error_names_every_bad_field():
    with pytest.raises(InvalidPolicyError) as info:
        CompactionPolicy(retain_last=-2, retain_younger_than=timedelta(seconds=-5))
    assert "retain_last" in str(info.value) and "must be 0 or more, got -2" in str(info.value)
    assert "retain_younger_than" in str(info.value)


def test_policy_is_immutable():
    policy = CompactionPolicy(retain_last=3)
    with pytest.raises(Exception):  # noqa: B017, PT011 -- pydantic's frozen error type varies
        policy.retain_last = 0  # type: ignore[misc]


def test_codec_keeps_insertion_order_and_hashes_the_stored_bytes():
    codec: StateCodec[dict] = StateCodec(dict)
    a = codec.encode({"b": 1, "a": [1, 2], "ü": "x"})
    b = codec.encode({"ü": "x", "a": [1, 2], "b": 1})
    assert a == '{"b":1,"a":[1,2],"ü":"x"}'.encode()
    assert b == '{"ü":"x","a":[1,2],"b":1}'.encode()
    assert list(codec.decode(b)) == ["ü", "a", "b"]
    assert state_hash(a) == hashlib.sha256(a).hexdigest()


@dataclasses.dataclass
class Point:
    x: int
    y: list[int]


@pytest.mark.parametrize(
    ("state_type", "state"),
    [
        (dict, {"n": 1, "nested": {"k": [1, 2]}}),
        (LedgerModel, LedgerModel(total=3)),
        (Point, Point(1, [2, 3])),
    ],
)
def test_codec_round_trips_supported_types(state_type, state):
    codec = StateCodec(state_type)
    assert codec.decode(codec.encode(state)) == state


def test_codec_detectably_lossy_for_sets_and_int_keys():
    codec: StateCodec[dict] = StateCodec(dict)
    for state in ({"tags": {"a"}}, {1: "one"}):
        assert codec.decode(codec.encode(state)) != state


def test_codec_errors_are_eskit_errors():
    codec: StateCodec[LedgerModel] = StateCodec(LedgerModel)
    with pytest.raises(SnapshotCodecError, match="cannot decode snapshot as LedgerModel"):
        codec.decode(b'{"total": "lots"}')
    with pytest.raises(SnapshotCodecError, match="cannot encode"):
        StateCodec(dict).encode({"x": object()})
