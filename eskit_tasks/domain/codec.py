"""JSON encoding of states (snapshots) and event payloads.

A snapshot is the only record of the events it replaced, so its encoding keeps
everything a decider can observe that JSON can hold: dict insertion order (the stored
bytes are exactly what the encoder produced, and the hash is over those bytes), every
field of a model. What JSON cannot hold (a ``ZoneInfo``, an enum inside a plain
``dict``, a set) is caught by the strict comparison (:mod:`eskit_tasks.domain.compare`)
before anything is deleted.

Each snapshot also records which state schema wrote it (a
:class:`~eskit_tasks.domain.schema.SchemaMarker`). A snapshot of another schema is
decoded only through the decider's upcasters, and then strictly: a key the current type
does not know, or a field the snapshot lacks, is an error, never a silent default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Mapping
from enum import Enum
from typing import Any, Generic, TypeVar

import orjson
import pydantic_core
from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic_core import PydanticSerializationError

from eskit_tasks.domain.compare import ABSENT, Difference
from eskit_tasks.domain.schema import (
    SchemaMarker,
    Upcaster,
    checked_upcasters,
    checked_version,
    schema_fingerprint,
)
from eskit_tasks.errors import SnapshotCodecError, SnapshotSchemaError

S = TypeVar("S")


def dumps(value: Any) -> str:
    """Encode an event payload or metadata as compact JSON text.

    Dataclasses, enums (as their values) and pydantic models (as their fields) are
    accepted anywhere inside ``value``.

    Raises:
        TypeError: the value is not JSON: an unsupported type, or NaN/Infinity anywhere
            inside it (orjson would silently store them as ``null``); the message gives
            the path, e.g. ``$['items'][2].price``.
    """
    encoded = orjson.dumps(value, default=_plain_model)
    if b"null" in encoded:
        where = non_finite_path(value)
        if where is not None:
            raise TypeError(
                f"{where} is NaN or Infinity, which JSON cannot hold; store it as a string or null"
            )
    return encoded.decode()


def _plain_model(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="python")
    raise TypeError(f"Type is not JSON serializable: {type(value).__qualname__}")


def non_finite_path(value: Any, path: str = "$") -> str | None:
    """Where NaN or Infinity hides inside ``value`` (containers, dataclasses, enums,
    pydantic models), or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else path
    if isinstance(value, Enum):
        return non_finite_path(value.value, path)
    if isinstance(value, dict):
        items: Any = ((f"{path}[{k!r}]", v) for k, v in value.items())
    elif isinstance(value, list | tuple):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    elif isinstance(value, BaseModel):
        # What is stored: the model's dump, with computed fields and serializers' output.
        dumped = value.model_dump(mode="python")
        items = ((f"{path}.{k}", v) for k, v in dumped.items())
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        items = ((f"{path}.{f.name}", getattr(value, f.name)) for f in dataclasses.fields(value))
    else:
        return None
    for where, inner in items:
        found = non_finite_path(inner, where)
        if found is not None:
            return found
    return None


def state_hash(encoded: bytes) -> str:
    """sha256 of a state's stored bytes, hex."""
    return hashlib.sha256(encoded).hexdigest()


class StateCodec(Generic[S]):
    """Encodes a state to JSON and decodes it back through pydantic.

    Encoding keeps dict insertion order and model field order; the bytes are stored as
    they are and hashed. A codec can be *lossy* — a ``set`` becomes a list, integer dict
    keys become strings, an enum in a plain ``dict`` becomes its value — which is why
    compaction compares what it decodes with the replayed state before trusting it.

    Args:
        state_type: Any type pydantic can serialise: a model, a dataclass, ``dict``, ...
        version: The ``state_version`` the decider declares (None: none).
        upcasters: Functions from the decoded JSON of an older snapshot to a newer
            schema, keyed by the ``state_version`` they upgrade *from* (to the next
            version) or by the fingerprint they upgrade from (to the current schema).

    Raises:
        SnapshotCodecError: pydantic cannot handle ``state_type``.
        ConfigurationError: ``version`` or ``upcasters`` are malformed.
    """

    def __init__(
        self,
        state_type: type[S] | Any,
        *,
        version: int | None = None,
        upcasters: Mapping[int | str, Upcaster] | None = None,
    ) -> None:
        self.state_type = state_type
        try:
            self._adapter: TypeAdapter[S] = TypeAdapter(state_type)
        except Exception as exc:  # pydantic raises several types for unsupported types
            raise SnapshotCodecError(
                f"pydantic cannot build a codec for state type {state_type!r}: {exc}"
            ) from exc
        self.upcasters: dict[int | str, Upcaster] = checked_upcasters(upcasters, version)
        self.marker = SchemaMarker(schema_fingerprint(state_type), checked_version(version))

    @property
    def type_name(self) -> str:
        """The state type as messages name it."""
        return getattr(self.state_type, "__qualname__", None) or repr(self.state_type)

    def encode(self, state: S) -> bytes:
        """Return the JSON bytes of ``state`` (insertion order kept)."""
        try:
            # pydantic's own JSON writer: compact, insertion order, any int size, and
            # several times faster than dumping to Python objects and then to JSON.
            return self._adapter.dump_json(state)
        except (PydanticSerializationError, TypeError, ValueError) as exc:
            raise SnapshotCodecError(f"cannot encode state as {self.type_name}: {exc}") from exc

    def decode(self, encoded: bytes | str) -> S:
        """Return the state that ``encoded`` describes, as pydantic validates it (lenient:
        use :meth:`decode_snapshot` for a stored snapshot)."""
        try:
            return self._adapter.validate_json(encoded)
        except ValidationError as exc:
            raise SnapshotCodecError(f"cannot decode snapshot as {self.type_name}: {exc}") from exc

    def decode_snapshot(
        self,
        encoded: bytes,
        marker: SchemaMarker,
        *,
        stream_type: str,
        stream_id: str,
        version: int,
    ) -> S:
        """Decode a stored snapshot written under ``marker``, strictly.

        Another schema: the upcasters from ``marker`` to the current schema run on the
        decoded JSON first. Then the decoded state must encode back to the same JSON (see
        :func:`json_difference`): no key dropped, no default invented, no value coerced.

        Raises:
            SnapshotSchemaError: no upcaster path, an upcaster raised, or the snapshot
                does not decode exactly; the message names the stream, the version, the
                stored and current markers and what to do.
        """
        where = f"{stream_type}/{stream_id} snapshot at version {version}"

        def fail(problem: str, advice: str) -> SnapshotSchemaError:
            return SnapshotSchemaError(
                f"{where}: {problem} (stored: {marker}; current {self.type_name}: "
                f"{self.marker}). {advice}",
                stream_type=stream_type,
                stream_id=stream_id,
                version=version,
            )

        steps = self._upcast_path(marker)
        if steps is None:
            raise fail(
                "written for another state schema and no upcaster leads to the current one",
                "Register upcasters with the decider (upcasters={old state_version: fn} with "
                "a higher state_version, or {old fingerprint: fn}), or deploy the old state "
                "type again; nothing was changed.",
            )
        source = encoded
        if steps:
            plain = _parsed(encoded, fail)
            for name, step in steps:
                try:
                    plain = step(plain)
                except Exception as exc:  # the user's upcaster: report it, never half-apply
                    raise fail(
                        f"upcaster {name} raised {type(exc).__name__}: {exc}", "Fix the upcaster."
                    ) from exc
            try:
                source = pydantic_core.to_json(plain)
            except (PydanticSerializationError, TypeError, ValueError) as exc:
                raise fail(
                    f"the upcasters' result is not JSON ({exc})", "Fix the upcaster."
                ) from None
        try:
            state = self._adapter.validate_json(source)
            again = self.encode(state)
        except (ValidationError, SnapshotCodecError) as exc:
            raise fail(
                f"does not decode as the current state type: {_first_line(exc)}",
                "Register an upcaster that turns its JSON into the current shape.",
            ) from None
        if again != source:  # not the same bytes: is it the same JSON?
            difference = json_difference(_parsed(source, fail), _parsed(again, fail))
            if difference is not None:
                raise fail(
                    f"decoding it would change its JSON: {_explained(difference)}",
                    "Register an upcaster that produces exactly the current shape.",
                )
        return state

    def _upcast_path(self, stored: SchemaMarker) -> list[tuple[str, Upcaster]] | None:
        """The upcasters from ``stored`` to the current marker ([] when none are needed),
        None when there is no path."""
        current = self.marker
        if stored.fingerprint == current.fingerprint and (
            stored.version == current.version
            # Written before the decider declared versions, and it now declares its
            # first: the same shape and, by that declaration, the same meaning.
            or (stored.version is None and current.version == 1)
        ):
            return []
        by_fingerprint = self.upcasters.get(stored.fingerprint)
        if by_fingerprint is not None:
            return [(f"from fingerprint {stored.fingerprint[:16]}", by_fingerprint)]
        if stored.version is None or current.version is None or stored.version >= current.version:
            return None
        path = []
        for v in range(stored.version, current.version):
            step = self.upcasters.get(v)
            if step is None:
                return None
            path.append((f"from state_version {v}", step))
        return path


def _parsed(encoded: bytes, fail: Callable[[str, str], SnapshotSchemaError]) -> Any:
    """JSON as Python values, integers of any size kept (orjson would turn an integer
    beyond 64 bits into a float)."""
    try:
        return pydantic_core.from_json(encoded)
    except ValueError as exc:
        raise fail(f"stored state is not JSON ({exc})", "Restore it from a backup.") from None


def json_difference(stored: Any, decoded: Any, path: str = "$") -> Difference | None:
    """Where the JSON the decoded state encodes to differs from the stored JSON.

    Object keys are compared as sets: the decoded *state* keeps a dict's order (pydantic
    decodes objects in order, and compaction proved the order before deleting), and a
    model's fields follow its class, whatever order the stored object had. An array is
    the same if its items are, in order, or — for a set, which has no order to keep —
    as a multiset. Numbers keep their type (``1`` is not ``1.0``).
    """
    if type(stored) is not type(decoded):
        return Difference(path, "type", stored, decoded)
    if isinstance(stored, dict):
        for key in stored:
            if key not in decoded:
                return Difference(f"{path}[{key!r}]", "missing key", stored[key], ABSENT)
        for key in decoded:
            if key not in stored:
                return Difference(f"{path}[{key!r}]", "unexpected key", ABSENT, decoded[key])
        for key, value in stored.items():
            found = json_difference(value, decoded[key], f"{path}[{key!r}]")
            if found is not None:
                return found
        return None
    if isinstance(stored, list):
        if len(stored) != len(decoded):
            return Difference(path, "length", len(stored), len(decoded))
        for i, (a, b) in enumerate(zip(stored, decoded, strict=True)):
            found = json_difference(a, b, f"{path}[{i}]")
            if found is not None:
                return None if _same_items(stored, decoded) else found
        return None
    return None if stored == decoded else Difference(path, "value", stored, decoded)


def _same_items(a: list[Any], b: list[Any]) -> bool:
    def key(item: Any) -> str:
        return json.dumps(item, sort_keys=True)

    return sorted(map(key, a)) == sorted(map(key, b))


def _explained(difference: Difference) -> str:
    if difference.reason == "missing key":
        return f"it holds {difference.path}, which the current state type does not know"
    if difference.reason == "unexpected key":
        return f"it lacks {difference.path}, which decoding would fill with a default"
    return f"{difference} (a coerced value)"


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return " ".join(text.splitlines()[:3])
