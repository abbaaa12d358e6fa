"""Which state schema wrote a snapshot: schema markers, fingerprints, upcasters.

Each snapshot records the schema of the state type that wrote it (:class:`SchemaMarker`):
a fingerprint of the type's JSON schema and the version the decider declares. A snapshot
of another schema is decoded only through the decider's upcasters
(:class:`~eskit_tasks.domain.codec.StateCodec` does the decoding); this module says what
a schema is, how it is recognised and which upcasters are acceptable.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import TypeAdapter

from eskit_tasks.errors import ConfigurationError

#: The fingerprint of snapshots written before eskit-tasks recorded schemas. Such a
#: snapshot is used only through an upcaster registered for this key.
UNRECORDED = "unrecorded"

#: A function from the decoded JSON of an older snapshot to the JSON of a newer schema.
Upcaster = Callable[[Any], Any]

# JSON-schema keys that describe a type to people and do not change what its JSON
# looks like: a new docstring or default must not make every snapshot "foreign".
_ANNOTATIONS = frozenset({"title", "description", "examples", "default", "deprecated"})
# JSON-schema keys whose values map names to sub-schemas.
_NAMED = frozenset({"properties", "$defs", "definitions", "patternProperties"})


@dataclass(frozen=True, slots=True)
class SchemaMarker:
    """Which state schema wrote a snapshot.

    Args:
        fingerprint: sha256 of the state type's JSON schema (:func:`schema_fingerprint`),
            or :data:`UNRECORDED`.
        version: The ``state_version`` the decider declared, None if it declares none.
    """

    fingerprint: str
    version: int | None = None

    def __str__(self) -> str:
        shown = self.fingerprint if self.fingerprint == UNRECORDED else self.fingerprint[:16]
        version = "no state_version" if self.version is None else f"state_version {self.version}"
        return f"{version}, fingerprint {shown}"


def schema_fingerprint(state_type: Any) -> str:
    """A stable fingerprint of ``state_type``'s JSON shape: sha256 of its pydantic JSON
    schema with titles, descriptions, examples and defaults left out.

    It changes when a field is added, removed, renamed or changes type, not when a
    docstring or a default does. A type pydantic cannot describe in JSON schema is
    fingerprinted by its qualified name.

    Computed once per state type.
    """
    try:
        return _fingerprint_cached(state_type)
    except TypeError:  # an unhashable type expression
        return _fingerprint(state_type)


@functools.lru_cache(maxsize=512)
def _fingerprint_cached(state_type: Any) -> str:
    return _fingerprint(state_type)


def _fingerprint(state_type: Any) -> str:
    try:
        schema: Any = TypeAdapter(state_type).json_schema()
    except Exception:  # e.g. a custom type without a JSON schema: fall back to its name
        name = f"{getattr(state_type, '__module__', '')}.{getattr(state_type, '__qualname__', '')}"
        schema = {"eskit-type-name": name if name != "." else repr(state_type)}
    canonical = orjson.dumps(_without_annotations(schema), option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()


def _without_annotations(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {
            k: _named(v) if k in _NAMED else _without_annotations(v)
            for k, v in schema.items()
            if k not in _ANNOTATIONS
        }
    if isinstance(schema, list):
        return [_without_annotations(v) for v in schema]
    return schema


def _named(mapping: Any) -> Any:
    """Under ``properties`` and ``$defs`` the keys are names (a field may be called
    ``title``): keep every key, clean each sub-schema."""
    if not isinstance(mapping, dict):
        return _without_annotations(mapping)
    return {name: _without_annotations(sub) for name, sub in mapping.items()}


def checked_version(version: object) -> int | None:
    if version is None:
        return None
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ConfigurationError(f"state_version must be an int >= 0 or None, got {version!r}")
    return version


def checked_upcasters(
    upcasters: Mapping[int | str, Upcaster] | None, version: int | None
) -> dict[int | str, Upcaster]:
    if upcasters is None:
        return {}
    if not isinstance(upcasters, Mapping):
        raise ConfigurationError(
            f"upcasters must be a mapping of state_version or fingerprint to a function, "
            f"got {type(upcasters).__name__}"
        )
    found: dict[int | str, Upcaster] = {}
    for key, step in upcasters.items():
        if isinstance(key, bool) or not isinstance(key, int | str):
            raise ConfigurationError(
                f"upcaster key {key!r} must be the state_version (int) or fingerprint (str) "
                "it upgrades from"
            )
        if isinstance(key, int) and (version is None or not 0 <= key < version):
            raise ConfigurationError(
                f"upcaster from state_version {key} needs a higher current state_version "
                f"(declared: {version})"
            )
        if not callable(step):
            raise ConfigurationError(f"upcaster {key!r} is not callable: {step!r}")
        found[key] = step
    return found
