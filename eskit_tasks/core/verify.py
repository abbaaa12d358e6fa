"""The pre-deploy check: can the code about to be deployed still read every snapshot?

A snapshot is the only record of the events it replaced. Before deploying a new state
type, a new ``state_version`` or new upcasters, :func:`verify_snapshots` opens every
stream's verified snapshot with the registrations of *that* code, exactly as
``load_state`` and the Compactor will: hash, schema marker, upcasters, strict decode.
It reads; it never writes. ``eskit-tasks verify-snapshots`` is its command line.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from eskit_tasks.core.loading import open_snapshot
from eskit_tasks.core.registry import get_registration
from eskit_tasks.domain.codec import StateCodec
from eskit_tasks.errors import (
    ConfigurationError,
    SnapshotIntegrityError,
    SnapshotSchemaError,
)
from eskit_tasks.ports import SnapshotStore, StoredSnapshot

#: Snapshots read per page.
PAGE_SIZE = 500
#: Failures kept with their message (all are counted).
MAX_PROBLEMS = 1000


@dataclass(frozen=True, slots=True)
class SnapshotProblem:
    """One snapshot the current code cannot use.

    Args:
        stream_type: The stream's type.
        stream_id: The stream's id.
        version: The snapshot's version.
        kind: ``integrity`` (bytes do not match the hash), ``schema`` (another schema
            and no upcaster, or not an exact decode), ``unregistered`` (no decider) or
            ``missing`` (the stream is compacted but its snapshot is gone).
        error: The error ``load_state`` would raise.
    """

    stream_type: str
    stream_id: str
    version: int
    kind: str
    error: str


@dataclass
class TypeTally:
    """Snapshots checked and failed for one stream type."""

    checked: int = 0
    failed: dict[str, int] = field(default_factory=dict)

    @property
    def failures(self) -> int:
        return sum(self.failed.values())


@dataclass
class SnapshotReport:
    """What :func:`verify_snapshots` found.

    Args:
        by_type: Per stream type, how many snapshots were checked and failed by kind.
        problems: The first ``MAX_PROBLEMS`` failures with their errors.
    """

    by_type: dict[str, TypeTally] = field(default_factory=dict)
    problems: list[SnapshotProblem] = field(default_factory=list)

    @property
    def checked(self) -> int:
        return sum(t.checked for t in self.by_type.values())

    @property
    def failed(self) -> int:
        return sum(t.failures for t in self.by_type.values())

    @property
    def ok(self) -> bool:
        """True when every snapshot can be used by the current code."""
        return self.failed == 0

    def to_json(self) -> dict[str, Any]:
        return {
            "checked": self.checked,
            "failed": self.failed,
            "by_type": {
                t: {"checked": tally.checked, "failed": tally.failures, "by_kind": tally.failed}
                for t, tally in sorted(self.by_type.items())
            },
            "problems": [
                {
                    "stream_type": p.stream_type,
                    "stream_id": p.stream_id,
                    "version": p.version,
                    "kind": p.kind,
                    "error": p.error,
                }
                for p in self.problems
            ],
        }


def registered_codec(stream_type: str) -> StateCodec[Any]:
    """The codec the registry gives ``stream_type`` (what workers will use).

    Raises:
        UnknownStreamTypeError: no decider is registered for it.
    """
    return get_registration(stream_type).codec()


def verify_snapshots(
    snapshots: SnapshotStore,
    *,
    stream_types: Sequence[str] | None = None,
    codec_of: Callable[[str], StateCodec[Any]] = registered_codec,
    page_size: int = PAGE_SIZE,
) -> SnapshotReport:
    """Open every compacted stream's verified snapshot as ``load_state`` would; report
    those that cannot be used (and compacted streams whose snapshot is missing).
    Memory is bounded by ``page_size`` (and ``MAX_PROBLEMS``).

    Args:
        snapshots: The snapshot store.
        stream_types: Only these stream types (default: all).
        codec_of: The codec of a stream type (default: from :func:`register_decider`).
        page_size: Snapshots read per query.

    Raises:
        ConfigurationError: ``page_size`` < 1.
        StoreError: the database fails.
    """
    if page_size < 1:
        raise ConfigurationError(f"page_size must be at least 1, got {page_size}")
    report = SnapshotReport()
    codecs: dict[str, StateCodec[Any] | ConfigurationError] = {}
    after = 0
    while page := snapshots.verified_snapshots(
        after=after, limit=page_size, stream_types=stream_types
    ):
        for found in page:
            st, sid, snap = found.stream_type, found.stream_id, found.snapshot
            tally = report.by_type.setdefault(st, TypeTally())
            tally.checked += 1
            kind, error = _problem(codecs, codec_of, found)
            if kind is not None:
                tally.failed[kind] = tally.failed.get(kind, 0) + 1
                if len(report.problems) < MAX_PROBLEMS:
                    version = found.compacted_through if snap is None else snap.version
                    report.problems.append(SnapshotProblem(st, sid, version, kind, error))
        after = page[-1].key
    return report


def _problem(
    codecs: dict[str, StateCodec[Any] | ConfigurationError],
    codec_of: Callable[[str], StateCodec[Any]],
    found: StoredSnapshot,
) -> tuple[str | None, str]:
    """(kind, error) of what keeps ``found`` from being used; (None, "") when nothing."""
    st, sid, snap = found.stream_type, found.stream_id, found.snapshot
    if snap is None:
        return "missing", (
            f"{st}/{sid}: compacted through {found.compacted_through}, but its verified "
            "snapshot is missing; the stream cannot be loaded until the snapshot row is "
            "restored from a backup"
        )
    if st not in codecs:
        try:
            codecs[st] = codec_of(st)
        except ConfigurationError as exc:
            codecs[st] = exc
    codec = codecs[st]
    if isinstance(codec, ConfigurationError):
        return "unregistered", str(codec)
    try:
        open_snapshot(codec, snap, st, sid)
    except SnapshotIntegrityError as exc:
        return "integrity", str(exc)
    except SnapshotSchemaError as exc:
        return "schema", str(exc)
    return None, ""
