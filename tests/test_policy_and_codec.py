"""Pure units: the cut arithmetic, policy validation, the state codec and its markers."""

from __future__ import annotations

import dataclasses
import hashlib
from datetime import UTC, datetime, timedelta
from typing import Annotated

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, Field

from eskit_tasks import (
    CompactionPolicy,
    ConfigurationError,
    InvalidPolicyError,
    SnapshotCodecError,
    SnapshotSchemaError,
)
from eskit_tasks.core.loading import codec_for
from eskit_tasks.domain.codec import StateCodec, state_hash
from eskit_tasks.domain.policy import plan_cut
from eskit_tasks.domain.schema import SchemaMarker, schema_fingerprint
from eskit_tasks.testing.deciders import LedgerModel


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


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("90", timedelta(seconds=90)),
        ("2.5", timedelta(seconds=2.5)),
        (90.0, timedelta(seconds=90)),
        ("1d12h", timedelta(days=1, hours=12)),
        ("1w 2d", timedelta(weeks=1, days=2)),
        ("2 weeks", timedelta(weeks=2)),
        ("1 week", timedelta(weeks=1)),
        ("3days", timedelta(days=3)),
        ("1 hour 30 minutes", timedelta(hours=1, minutes=30)),
        ("45 seconds", timedelta(seconds=45)),
        ("10 min", timedelta(minutes=10)),
        (" 1h, 30m ", timedelta(hours=1, minutes=30)),
    ],
)
def test_retain_younger_than_reads_seconds_words_and_compounds(given, expected):
    assert CompactionPolicy(retain_younger_than=given).retain_younger_than == expected


@pytest.mark.parametrize("given", ["abc", "", "30x", "-1d", "1d-2h", "2 fortnights", "1e3s", "d"])
def test_an_unreadable_duration_lists_the_accepted_forms(given):
    with pytest.raises(InvalidPolicyError) as info:
        CompactionPolicy(retain_younger_than=given)
    message = str(info.value)
    assert "retain_younger_than" in message and repr(given) in message
    for form in ('"90"', '"30d"', '"1d12h"', '"2 weeks"', '"P30D"'):
        assert form in message


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


class _Thing(BaseModel):
    n: int = 0


class _Pair(BaseModel):
    a: int = 0
    b: int = 0


@pytest.mark.parametrize(
    ("stored_version", "current_version", "upcasters", "usable"),
    [
        (None, None, {}, True),
        (3, 3, {}, True),
        (None, 1, {}, True),  # versions declared from now on, starting at 1
        (None, 2, {}, False),  # which of versions 1..2 was it? an upcaster must say
        (2, None, {}, False),  # versions no longer declared: the meaning may have changed
        (1, 2, {}, False),  # same shape, new meaning: needs the upcaster
        (1, 3, {1: lambda s: s, 2: lambda s: s}, True),
        (1, 3, {2: lambda s: s}, False),
        (4, 3, {}, False),  # written by newer code
    ],
)
def test_which_markers_decode_without_or_with_upcasters(
    stored_version, current_version, upcasters, usable
):
    codec = StateCodec(_Thing, version=current_version, upcasters=upcasters)
    stored = SchemaMarker(codec.marker.fingerprint, stored_version)
    args = {"stream_type": "t", "stream_id": "1", "version": 5}
    if usable:
        assert codec.decode_snapshot(b'{"n":2}', stored, **args) == _Thing(n=2)
    else:
        with pytest.raises(SnapshotSchemaError, match="t/1 snapshot at version 5"):
            codec.decode_snapshot(b'{"n":2}', stored, **args)


@pytest.mark.parametrize(
    ("upcasters", "version", "match"),
    [
        ({1: "not callable"}, 2, "not callable"),
        ({2: lambda s: s}, 2, "needs a higher current state_version"),
        ({1: lambda s: s}, None, "needs a higher current state_version"),
        ({1.5: lambda s: s}, 2, "must be the state_version"),
        ([], 2, "must be a mapping"),
        ({True: lambda s: s}, 2, "must be the state_version"),  # a bool is not a version
    ],
)
def test_malformed_upcasters_are_configuration_errors(upcasters, version, match):
    with pytest.raises(ConfigurationError, match=match):
        StateCodec(_Thing, version=version, upcasters=upcasters)


def test_another_fingerprint_at_the_same_state_version_needs_an_upcaster():
    # Same JSON, same declared version, another schema (a constraint, a set for a list):
    # only an upcaster by fingerprint may say it means the same.
    codec = StateCodec(_Thing, version=2)
    stored = SchemaMarker("0" * 64, 2)
    args = {"stream_type": "t", "stream_id": "1", "version": 5}
    with pytest.raises(SnapshotSchemaError, match="no upcaster leads to the current one"):
        codec.decode_snapshot(b'{"n":2}', stored, **args)
    by_fingerprint = StateCodec(_Thing, version=2, upcasters={"0" * 64: lambda s: s})
    assert by_fingerprint.decode_snapshot(b'{"n":2}', stored, **args) == _Thing(n=2)


def test_state_version_and_upcasters_given_override_the_deciders():
    class Declares:
        def __init__(self) -> None:
            self.state_version = 2
            self.upcasters = {1: lambda s: s}

    declared = codec_for(Declares(), _Thing)
    assert (declared.marker.version, list(declared.upcasters)) == (2, [1])
    given_ = codec_for(Declares(), _Thing, state_version=3, upcasters={2: lambda s: s})
    assert (given_.marker.version, list(given_.upcasters)) == (3, [2])
    bare = codec_for(object(), _Thing, state_version=4)
    assert (bare.marker.version, bare.upcasters) == (4, {})


@pytest.mark.parametrize("version", [-1, True, "2", 1.0])
def test_state_version_must_be_a_non_negative_int(version):
    with pytest.raises(ConfigurationError, match="state_version"):
        StateCodec(_Thing, version=version)


def test_fingerprint_ignores_docs_and_defaults_but_not_fields():
    class A(BaseModel):
        n: int = 0

    class B(BaseModel):
        """Documented."""

        n: int = 5

    class C(BaseModel):
        n: int = 0
        title: str = ""  # a field called "title" is a field, not an annotation

    class D(BaseModel):
        n: str = ""

    class E(BaseModel):
        n: int | None = None

    class F(BaseModel):
        n: Annotated[int, Field(description="inside anyOf")] | None = None

    fingerprints = {schema_fingerprint(t) for t in (A, B)}
    assert len(fingerprints) == 1
    assert schema_fingerprint(E) == schema_fingerprint(F)
    assert schema_fingerprint(C) not in fingerprints
    assert schema_fingerprint(D) not in fingerprints
    assert len(schema_fingerprint(dict)) == 64


def test_strict_decode_refuses_unknown_keys_and_missing_fields():
    codec = StateCodec(_Thing)
    args = {"stream_type": "t", "stream_id": "1", "version": 1}
    with pytest.raises(SnapshotSchemaError, match=r"holds \$\['x'\], which the current"):
        codec.decode_snapshot(b'{"n":1,"x":2}', codec.marker, **args)
    with pytest.raises(SnapshotSchemaError, match=r"lacks \$\['n'\], which decoding would"):
        codec.decode_snapshot(b"{}", codec.marker, **args)
    with pytest.raises(SnapshotSchemaError, match="does not decode as the current state type"):
        codec.decode_snapshot(b'{"n":"many"}', codec.marker, **args)
    # A model's fields follow its class whatever order they were stored in; a dict keeps
    # the stored order (compaction proved that order before it deleted anything).
    pair = StateCodec(_Pair)
    assert pair.decode_snapshot(b'{"b":2,"a":1}', pair.marker, **args) == _Pair(a=1, b=2)
    assert pair.decode_snapshot(b'{"a":1,"b":2}', pair.marker, **args) == _Pair(a=1, b=2)
    plain = StateCodec(dict[str, int])
    assert list(plain.decode_snapshot(b'{"b":2,"a":1}', plain.marker, **args)) == ["b", "a"]
    # Other bytes for the same JSON (another writer's float format) are fine.
    floats = StateCodec(dict[str, float])
    assert floats.decode_snapshot(b'{"f": 1e300}', floats.marker, **args) == {"f": 1e300}


def test_an_upcast_snapshot_keeps_integers_beyond_64_bits():
    from eskit_tasks.domain.schema import UNRECORDED

    codec = StateCodec(dict, upcasters={UNRECORDED: lambda s: s})
    stored = b'{"supply":340282366920938463463374607431768211455}'
    state = codec.decode_snapshot(
        stored, SchemaMarker(UNRECORDED), stream_type="t", stream_id="1", version=1
    )
    assert state == {"supply": 2**128 - 1} and type(state["supply"]) is int


def test_an_upcaster_whose_result_is_not_json_is_a_schema_error():
    from eskit_tasks.domain.schema import UNRECORDED

    codec = StateCodec(dict, upcasters={UNRECORDED: lambda s: {"x": object()}})
    with pytest.raises(SnapshotSchemaError, match="the upcasters' result is not JSON"):
        codec.decode_snapshot(
            b'{"x":1}', SchemaMarker(UNRECORDED), stream_type="t", stream_id="1", version=1
        )


def test_a_models_field_order_in_the_stored_json_does_not_matter():
    codec = StateCodec(LedgerModel)
    stored = b'{"last":3,"count":2,"total":6}'  # fields reordered in the class since
    state = codec.decode_snapshot(stored, codec.marker, stream_type="t", stream_id="1", version=3)
    assert state == LedgerModel(total=6, count=2, last=3)
