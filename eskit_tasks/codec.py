"""Canonical JSON encoding of states (snapshots) and event payloads."""

from __future__ import annotations

import hashlib
import math
from typing import Any, Generic, TypeVar

import orjson
from pydantic import TypeAdapter, ValidationError
from pydantic_core import PydanticSerializationError

from eskit_tasks.errors import SnapshotCodecError

S = TypeVar("S")


def dumps(value: Any) -> str:
    """Encode an event payload or metadata as compact JSON text.

    Raises:
        TypeError: the value is not JSON: an unsupported type, or NaN/Infinity, which
            orjson would silently store as ``null``.
    """
    encoded = orjson.dumps(value)
    if b"null" in encoded and _has_non_finite(value):
        raise TypeError("NaN and Infinity are not JSON; store them as strings or null")
    return encoded.decode()


def _has_non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_has_non_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_has_non_finite(v) for v in value)
    return False


def state_hash(encoded: bytes) -> str:
    """sha256 of a canonical state encoding, hex."""
    return hashlib.sha256(encoded).hexdigest()


class StateCodec(Generic[S]):
    """Encodes a state to canonical JSON and decodes it back through pydantic.

    The encoding is canonical (object keys sorted, no whitespace), so equal states
    give equal bytes and equal hashes. A codec can be *lossy* — e.g. a ``set`` becomes a
    list, integer dict keys become strings — which is why compaction decodes what it
    encoded and compares before trusting a snapshot.

    Args:
        state_type: Any type pydantic can serialise: a model, a dataclass, ``dict``, ...
    """

    def __init__(self, state_type: type[S] | Any) -> None:
        self.state_type = state_type
        try:
            self._adapter: TypeAdapter[S] = TypeAdapter(state_type)
        except Exception as exc:  # pydantic raises several types for unsupported types
            raise SnapshotCodecError(
                f"pydantic cannot build a codec for state type {state_type!r}: {exc}"
            ) from exc

    def encode(self, state: S) -> bytes:
        """Return the canonical JSON bytes of ``state``."""
        try:
            plain = self._adapter.dump_python(state, mode="json")
            return orjson.dumps(plain, option=orjson.OPT_SORT_KEYS)
        except (PydanticSerializationError, TypeError, ValueError) as exc:
            raise SnapshotCodecError(f"cannot encode state as {self._type_name()}: {exc}") from exc

    def decode(self, encoded: bytes | str) -> S:
        """Return the state that ``encoded`` describes."""
        try:
            return self._adapter.validate_json(encoded)
        except ValidationError as exc:
            raise SnapshotCodecError(
                f"cannot decode snapshot as {self._type_name()}: {exc}"
            ) from exc

    def _type_name(self) -> str:
        return getattr(self.state_type, "__qualname__", None) or repr(self.state_type)
