"""A pyeventsourcing application registered for the fleet and the command line:
:func:`register_application`.

Called in a module listed in ``ESKIT_DECIDER_MODULES`` (or given with
``--decider-module``), it makes the application's aggregates a stream type — the
application's name — that ``compact_all``, ``fan_out``, ``compact_stream``,
``candidates`` and ``compact-all --local`` handle like the event store's own streams.
Each process builds the application (and its followers) on first use, from the class
and the environment given here: a forked worker builds its own, never its parent's
connections.
"""

from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from eskit_tasks.core.registry import register_source
from eskit_tasks.domain.policy import CompactionPolicy
from eskit_tasks.domain.redact import mask_url
from eskit_tasks.domain.space import ReclaimReport
from eskit_tasks.errors import ConfigurationError, DatabaseUnavailableError
from eskit_tasks.eventsourcing.compactor import ApplicationCompactor
from eskit_tasks.ports import Candidate


def register_application(
    application: str | type[Any],
    *,
    env: Mapping[str, str] | None = None,
    followers: Iterable[str | type[Any]] = (),
    vacuum_after: int | None = None,
) -> str:
    """Register a pyeventsourcing application's aggregates for workers and the CLI.

    Args:
        application: The application class, or its topic ``"package.module:Class"``.
        env: The environment it is built with (as ``Class(env=...)``), on top of
            ``os.environ`` as the library reads it.
        followers: The follower applications (classes or topics), built with the same
            ``env``: events they have not processed are never deleted.
        vacuum_after: See :class:`~eskit_tasks.eventsourcing.ApplicationCompactor`.

    Returns:
        The stream type: the application's name.

    Raises:
        ConfigurationError: a topic cannot be imported or names no application class,
            or the name is a decider's stream type already.
    """
    cls = _application_class(application)
    source = ApplicationSource(
        cls,
        env=dict(env or {}),
        followers=[_application_class(f) for f in followers],
        vacuum_after=vacuum_after,
    )
    register_source(source.name, source)
    return source.name


class ApplicationSource:
    """The aggregates of one application as a
    :class:`~eskit_tasks.core.registry.StreamSource` (built per process, on first use)."""

    def __init__(
        self,
        cls: type[Any],
        *,
        env: dict[str, str],
        followers: list[type[Any]],
        vacuum_after: int | None,
    ) -> None:
        self.cls = cls
        self.name = str(getattr(cls, "name", cls.__name__))
        self.env = env
        self.follower_classes = followers
        self.vacuum_after = vacuum_after
        self._lock = threading.Lock()
        self._built: tuple[int, ApplicationCompactor] | None = None

    def __repr__(self) -> str:
        return f"ApplicationSource({self.cls.__module__}:{self.cls.__qualname__})"

    def _compactor(self) -> ApplicationCompactor:
        """This process's application, followers and compactor (built on first use)."""
        with self._lock:
            if self._built is None or self._built[0] != os.getpid():
                app, followers = self._build()
                options: dict[str, Any] = {"followers": followers}
                if self.vacuum_after is not None:
                    options["vacuum_after"] = self.vacuum_after
                self._built = (os.getpid(), ApplicationCompactor(app, **options))
            return self._built[1]

    def _build(self) -> tuple[Any, list[Any]]:
        """The application and its followers, as the library builds them.

        Raises:
            DatabaseUnavailableError: the library could not reach its database (a task
                tries again later).
            ConfigurationError: anything else the library refused (its message kept).
        """
        from eventsourcing.persistence import InterfaceError, OperationalError

        building = self.cls.__name__
        try:
            app = self.cls(env=dict(self.env))
            followers = []
            for follower in self.follower_classes:
                building = follower.__name__
                followers.append(follower(env=dict(self.env)))
        except (InterfaceError, OperationalError) as exc:
            raise DatabaseUnavailableError(
                f"cannot build application {building} (of {self.name}): its database is "
                f"unreachable: {mask_url(str(exc))}"
            ) from exc
        except Exception as exc:
            raise ConfigurationError(
                f"cannot build application {building} (of {self.name}): "
                f"{type(exc).__name__}: {mask_url(str(exc))}"
            ) from exc
        return app, followers

    def compactor(
        self, policy: CompactionPolicy, *, guard: Callable[[], None] | None = None
    ) -> ApplicationCompactor:
        return self._compactor().with_policy(policy, guard=guard)

    def close(self) -> None:
        """Close this process's application, followers and connections (built again on
        the next use)."""
        with self._lock:
            built, self._built = self._built, None
        if built is not None and built[0] == os.getpid():
            compactor = built[1]
            compactor.close()
            for app in (compactor.app, *compactor.followers):
                app.close()

    def candidate_page(
        self, *, after: int, limit: int, min_live_events: int
    ) -> tuple[list[Candidate], int | None]:
        return self._compactor().candidate_page(
            after=after, limit=limit, min_live_events=min_live_events
        )

    def reclaim(self, *, full: bool = False) -> ReclaimReport | None:
        return self._compactor().reclaim(full=full)


def _application_class(spec: str | type[Any]) -> type[Any]:
    try:
        from eventsourcing.application import Application
    except ImportError:  # pragma: no cover - the extra is installed with the tests
        raise ConfigurationError(
            "the eventsourcing library is not installed: pip install 'eskit-tasks[eventsourcing]'"
        ) from None
    cls: Any = spec
    if isinstance(spec, str):
        module, _, name = spec.partition(":")
        if not module or not name:
            raise ConfigurationError(
                f"application {spec!r}: give the class as 'package.module:Class'"
            )
        try:
            cls = importlib.import_module(module)
            for part in name.split("."):
                cls = getattr(cls, part)
        except (ImportError, AttributeError) as exc:
            raise ConfigurationError(f"cannot import application {spec!r}: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, Application)):
        raise ConfigurationError(
            f"{spec!r} is not an eventsourcing Application class (give the class, not an "
            "instance: each process builds its own)"
        )
    return cls
