"""Which decider and state type fold each stream type, for workers; and which stream
types are kept outside the event store (:class:`StreamSource`: the aggregates of a
pyeventsourcing application, registered by
:func:`eskit_tasks.eventsourcing.register_application`).

User modules call :func:`register_decider` at import time; workers import the modules
listed in ``ESKIT_DECIDER_MODULES`` when they start.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from eskit_tasks.core.compactor import Compactor
from eskit_tasks.core.loading import codec_for
from eskit_tasks.domain.codec import StateCodec
from eskit_tasks.domain.decider import Decider
from eskit_tasks.domain.policy import CompactionPolicy
from eskit_tasks.domain.result import CompactionResult
from eskit_tasks.domain.schema import Upcaster
from eskit_tasks.domain.space import ReclaimReport
from eskit_tasks.errors import ConfigurationError, SnapshotCodecError, UnknownStreamTypeError
from eskit_tasks.ports import Archive, Candidate, EventStore, SnapshotStore


@dataclass(frozen=True)
class Registration:
    """A decider, the state type its snapshots decode to, and the state schema's version
    and upcasters (see :class:`~eskit_tasks.domain.codec.StateCodec`)."""

    decider: Decider[Any]
    state_type: Any
    state_version: int | None = None
    upcasters: Mapping[int | str, Upcaster] | None = None

    def codec(self) -> StateCodec[Any]:
        """The codec of this stream type's snapshots."""
        return codec_for(self.decider, self.state_type, self.state_version, self.upcasters)

    def compactor(
        self,
        store: EventStore,
        snapshots: SnapshotStore,
        policy: CompactionPolicy,
        *,
        guard: Callable[[], None] | None = None,
        archive: Archive | None = None,
    ) -> Compactor[Any]:
        """A Compactor for streams of this type (the CLI and the fleet's task use this)."""
        return Compactor(
            store=store,
            snapshot_store=snapshots,
            decider=self.decider,
            state_type=self.state_type,
            state_version=self.state_version,
            upcasters=self.upcasters,
            policy=policy,
            guard=guard,
            archive=archive,
        )


class SourceCompactor(Protocol):
    """Compacts the streams of a :class:`StreamSource`."""

    def compact(
        self, stream_id: str, *, compaction_id: str | None = None, run_id: str | None = None
    ) -> CompactionResult:
        """Compact one stream of the source (a result for every outcome); ``run_id`` is
        recorded in its audit log."""
        ...


class StreamSource(Protocol):
    """Streams of one type kept outside eskit's event store, which the fleet's fan-out,
    ``compact_stream`` and the CLI compact like the store's own."""

    def compactor(
        self, policy: CompactionPolicy, *, guard: Callable[[], None] | None = None
    ) -> SourceCompactor:
        """A compactor under ``policy``; ``guard`` runs before each write (the fleet's
        lock check)."""
        ...

    def candidate_page(
        self, *, after: int, limit: int, min_live_events: int
    ) -> tuple[list[Candidate], int | None]:
        """At most ``limit`` streams with at least ``min_live_events`` live events whose
        key is above ``after``, in key order; and the key the next page starts after
        (None: there is no next page)."""
        ...

    def reclaim(self, *, full: bool = False) -> ReclaimReport | None:
        """Give back the space of the events compaction deleted and measure it (see
        :mod:`eskit_tasks.stores.reclaim`); None if this source never does."""
        ...


_lock = threading.Lock()
_registry: dict[str, Registration] = {}
_sources: dict[str, StreamSource] = {}


def register_decider(
    stream_type: str,
    decider: Decider[Any],
    state_type: Any,
    *,
    state_version: int | None = None,
    upcasters: Mapping[int | str, Upcaster] | None = None,
) -> None:
    """Tell workers how to fold streams of ``stream_type``.

    Registering the same type again replaces the earlier registration (module reloads).

    Args:
        stream_type: The stream type, as passed to ``append``.
        decider: An object with ``initial_state``, ``evolve`` and ``decide``.
        state_type: The state's type, as given to the Compactor.
        state_version: The state schema's version, recorded in each snapshot; raise it
            when the meaning or shape of the state changes (default:
            ``decider.state_version``, else none).
        upcasters: Functions from an older snapshot's JSON to a newer one, keyed by the
            ``state_version`` (to the next version) or the fingerprint (to the current
            schema) they upgrade from (default: ``decider.upcasters``).

    Raises:
        ConfigurationError: the decider lacks a method, pydantic cannot serialise
            ``state_type``, or ``state_version``/``upcasters`` are malformed.
    """
    if not isinstance(stream_type, str):
        raise ConfigurationError(f"stream_type must be a string, got {stream_type!r}")
    missing = [
        m for m in ("initial_state", "evolve", "decide") if not callable(getattr(decider, m, None))
    ]
    if missing:
        raise ConfigurationError(
            f"decider for {stream_type!r} lacks {', '.join(missing)}: a decider needs "
            "initial_state(), evolve(state, event) and decide(command, state)"
        )
    registration = Registration(decider, state_type, state_version, upcasters)
    try:
        registration.codec()  # fail at registration, not in the middle of a fleet run
    except SnapshotCodecError as exc:
        raise ConfigurationError(
            f"state type {state_type!r} for {stream_type!r} cannot be stored as JSON: use a "
            "pydantic model, a dataclass, a TypedDict or dict of JSON values"
        ) from exc
    except ConfigurationError as exc:
        raise ConfigurationError(f"decider for {stream_type!r}: {exc}") from exc
    with _lock:
        if stream_type in _sources:
            raise ConfigurationError(
                f"stream type {stream_type!r} is registered as an application already; "
                "give the decider another stream type"
            )
        _registry[stream_type] = registration


def register_source(stream_type: str, source: StreamSource) -> None:
    """Register streams kept outside the event store under ``stream_type`` (again:
    replaces the earlier source).

    Raises:
        ConfigurationError: a decider is registered for ``stream_type``.
    """
    with _lock:
        if stream_type in _registry:
            raise ConfigurationError(
                f"stream type {stream_type!r} has a decider registered already; an "
                "application's name must not be a stream type of the event store"
            )
        _sources[stream_type] = source


def get_source(stream_type: str) -> StreamSource | None:
    """The source registered for ``stream_type`` (None: its streams are the store's)."""
    with _lock:
        return _sources.get(stream_type)


def registered_sources() -> list[str]:
    """The stream types kept outside the event store, sorted."""
    with _lock:
        return sorted(_sources)


def sources_for(stream_types: Iterable[str] | None) -> list[tuple[str, StreamSource]]:
    """The sources a run over ``stream_types`` (None: every type) covers, with their
    names, by name."""
    wanted = None if stream_types is None else set(stream_types)
    with _lock:
        return [(t, s) for t, s in sorted(_sources.items()) if wanted is None or t in wanted]


def unregister_source(stream_type: str) -> None:
    """Forget a source (tests)."""
    with _lock:
        _sources.pop(stream_type, None)


def get_registration(stream_type: str) -> Registration:
    """Return the registration for ``stream_type``.

    Raises:
        UnknownStreamTypeError: nothing is registered for it.
    """
    with _lock:
        found = _registry.get(stream_type)
        known = sorted({*_registry, *_sources})
    if found is None:
        raise UnknownStreamTypeError(
            f"no decider registered for stream type {stream_type!r} (known: "
            f"{', '.join(map(repr, known)) or 'none'}); add the module that calls "
            "register_decider to ESKIT_DECIDER_MODULES"
        )
    return found


def check_stream_types(
    stream_types: Iterable[str] | None, store: EventStore, *, compacted_here: bool
) -> None:
    """Refuse a selection of stream types that names a type nobody knows, rather than
    select no stream and report success.

    A type is known when a decider or an application is registered for it, or when the
    store has a stream of it (a fleet's shell need not import the workers' deciders).
    When the streams are ``compacted_here`` (in this process), a type must also have a
    registration: its streams could only fail.

    Raises:
        UnknownStreamTypeError: a type is unknown; the message says what to check.
    """
    with _lock:
        known = {*_registry, *_sources}
    missing = sorted({*(stream_types or ())} - known)
    if not missing:
        return
    in_store = store.stream_types_in_use(missing)
    registered = ", ".join(map(repr, sorted(known))) or "none"
    for stream_type in missing:
        if stream_type not in in_store:
            raise UnknownStreamTypeError(
                f"unknown stream type {stream_type!r}: the store has no stream of that "
                f"type and no decider or application is registered for it (registered: "
                f"{registered}); check the spelling, or add the module that registers it "
                "(--decider-module or ESKIT_DECIDER_MODULES)"
            )
        if compacted_here:
            raise UnknownStreamTypeError(
                f"no decider registered for stream type {stream_type!r}, which has streams "
                f"in the store (registered: {registered}); add the module that calls "
                "register_decider (--decider-module or ESKIT_DECIDER_MODULES)"
            )


def registered_types() -> list[str]:
    with _lock:
        return sorted(_registry)


def unregister_decider(stream_type: str) -> None:
    """Forget a registration (tests)."""
    with _lock:
        _registry.pop(stream_type, None)


def import_decider_modules(
    modules: Iterable[str], *, source: str = "ESKIT_DECIDER_MODULES"
) -> None:
    """Import each module so that its register_decider calls run.

    Args:
        modules: Module names.
        source: Where the names came from (a setting or a flag), for the error message.

    Raises:
        ConfigurationError: a module cannot be imported.
    """
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # a syntax error or a crash at import: same advice
            raise ConfigurationError(
                f"cannot import decider module {name!r} (given by {source}): {exc}"
            ) from exc
