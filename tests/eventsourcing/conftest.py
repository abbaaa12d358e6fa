"""A database for a pyeventsourcing application: a SQLite file, or a PostgreSQL database
of its own (the library's tables and eskit's side tables live in it)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from eskit_tasks.testing.services import (
    eventsourcing_postgres_env,
    postgres_admin_url,
    scratch_database,
)


@dataclass
class Backend:
    """Where the applications of a test keep their events."""

    name: str
    url: str
    _base: dict[str, str]
    _made: list[Any] = field(default_factory=list)

    def env(self, app_name: str, **extra: str) -> dict[str, str]:
        """The environment of an application named ``app_name`` (SQLite: a file per
        application, as the library needs)."""
        env = dict(self._base)
        if self.name == "sqlite":
            env["SQLITE_DBNAME"] = str(Path(self.url) / f"{app_name.lower()}.sqlite")
        env.update(extra)
        return env

    def app(self, cls: Callable[..., Any], **extra: str) -> Any:
        """A new instance of application class ``cls`` on this backend (closed at the end)."""
        made = cls(env=self.env(cls.__name__, **extra))
        self._made.append(made)
        return made

    def execute(self, app: Any, statement: str, **params: Any) -> list[Any]:
        """Run SQL on an application's database (to damage it on purpose, or to look)."""
        url = self.url
        if self.name == "sqlite":
            url = f"sqlite:///{self.env(app.name)['SQLITE_DBNAME']}"
        engine = sa.create_engine(url)
        try:
            with engine.begin() as conn:
                result = conn.execute(sa.text(statement), params)
                return list(result) if result.returns_rows else []
        finally:
            engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.services)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        made = Backend("sqlite", str(tmp_path), {"PERSISTENCE_MODULE": "eventsourcing.sqlite"})
        yield made
    else:
        request.getfixturevalue("postgres_url")  # the server is up, or the run stops
        with scratch_database(postgres_admin_url(), "eskit_es") as url:
            made = Backend(
                "postgres",
                url,
                eventsourcing_postgres_env(url),
            )
            try:
                yield made
            finally:
                for app in made._made:
                    app.close()
        return
    for app in made._made:
        app.close()
