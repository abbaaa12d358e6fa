"""Which revision of the eskit tables a database has, and upgrading it (Alembic).

A database is in one of five states (:class:`SchemaStatus`):

* ``empty`` — no eskit tables: ``upgrade`` creates them;
* ``unversioned`` — tables made before eskit-tasks shipped migrations: ``upgrade``
  recognises their layout, records that revision, then applies the rest;
* ``behind`` — an older revision: ``upgrade`` applies the missing migrations;
* ``current`` — nothing to do;
* ``ahead`` — a revision this code does not know (a newer eskit-tasks made it).

Reading the status never changes the database. ``upgrade`` runs in one transaction (on
PostgreSQL under an advisory lock, so two ``init-db`` at once are harmless).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, Engine

from eskit_tasks.errors import DatabaseNotReadyError, TableLayoutError
from eskit_tasks.stores.driver_errors import mask_url, translate_errors
from eskit_tasks.stores.engine import write_transaction

#: The table holding the eskit tables' revision (not Alembic's default name: the
#: application may run Alembic for its own tables in the same database).
VERSION_TABLE = "eskit_alembic_version"
#: The revision of the first layout, and of the layout with schema markers: the two
#: layouts that databases made before migrations can have.
FIRST_LAYOUT, SCHEMA_MARKERS = "0001", "0002"
#: How the layout with schema markers differs from this code's (what
#: :func:`~eskit_tasks.stores.schema.layout_differences` says of it).
SCHEMA_MARKERS_DIFFERENCES = frozenset(
    {
        "eskit_events lacks column position",
        "eskit_position_counter is missing",
        "eskit_checkpoints is missing",
        "eskit_compaction_log lacks columns archive_uri, archive_sha256, restored_at, run_id",
        "eskit_runs is missing",
        "eskit_quarantine is missing",
        "eskit_plans is missing",
        "eskit_plan_streams is missing",
    }
)
#: How the first layout differs from this code's.
FIRST_LAYOUT_DIFFERENCES = SCHEMA_MARKERS_DIFFERENCES | {
    "eskit_snapshots lacks columns fingerprint, state_version"
}
#: Arbitrary constant key of the advisory lock that serialises upgrades.
_UPGRADE_LOCK_KEY = 0x65736B6974  # "eskit"
_MIGRATIONS = Path(__file__).with_name("migrations")

State = Literal["empty", "unversioned", "behind", "current", "ahead"]


@dataclass(frozen=True)
class SchemaStatus:
    """Where a database's eskit tables stand.

    Args:
        state: ``empty``, ``unversioned``, ``behind``, ``current`` or ``ahead``.
        revision: The revision recorded in the database (None: none recorded).
        head: The newest revision this code knows.
    """

    state: State
    revision: str | None
    head: str

    @property
    def ready(self) -> bool:
        return self.state == "current"


def _config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    return cfg


@functools.cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(_config())


def head() -> str:
    """The newest revision this code knows."""
    found = _scripts().get_current_head()
    assert found is not None, "the package ships no migrations"
    return found


@functools.cache
def _known() -> tuple[str, ...]:
    """Every revision, oldest first."""
    walked = _scripts().walk_revisions()
    return tuple(r.revision for r in reversed(list(walked)))


def _revision(conn: Connection) -> str | None:
    context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
    return context.get_current_revision()


def _status(conn: Connection) -> SchemaStatus:
    newest = head()
    revision = _revision(conn)
    if revision is None:
        names = set(sa.inspect(conn).get_table_names())
        state: State = "unversioned" if "eskit_streams" in names else "empty"
    elif revision == newest:
        state = "current"
    elif revision in _known():
        state = "behind"
    else:
        state = "ahead"
    return SchemaStatus(state, revision, newest)


def status(engine: Engine) -> SchemaStatus:
    """The database's status; changes nothing.

    Raises:
        DatabaseUnavailableError: the database cannot be reached.
    """
    with translate_errors(engine, "open the event store"), engine.connect() as conn:
        return _status(conn)


def require_current(engine: Engine) -> SchemaStatus:
    """Raise unless the tables are at this code's revision (for read-only commands and
    workers, which never change the tables).

    Raises:
        DatabaseNotReadyError: empty, unversioned or older — run ``eskit-tasks init-db``.
        TableLayoutError: a newer eskit-tasks made the tables.
    """
    found = status(engine)
    if found.state == "ahead":
        raise _ahead(engine, found)
    if not found.ready:
        raise DatabaseNotReadyError(
            f"the eskit tables in {mask_url(engine.url)} are "
            f"{_described(found)}: run eskit-tasks init-db"
        )
    return found


def upgrade(engine: Engine, *, replay: bool = False) -> tuple[SchemaStatus, SchemaStatus]:
    """Bring the tables to this code's revision; returns the status before and after.

    An empty database gets the newest layout at once (``replay``: through every
    revision instead; tests/test_migrations.py checks that both give the same tables).

    Raises:
        TableLayoutError: the tables have a layout no revision describes, or were made
            by a newer eskit-tasks; nothing was changed.
    """
    from eskit_tasks.stores.schema import layout_differences, metadata

    with translate_errors(engine, "upgrade the eskit tables"), write_transaction(engine) as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_UPGRADE_LOCK_KEY)))
        before = _status(conn)
        if before.state == "ahead":
            raise _ahead(engine, before)
        cfg = _config()
        cfg.attributes["connection"] = conn
        if before.state == "empty" and not replay:
            metadata.create_all(conn)
            context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
            context.stamp(_scripts(), before.head)
        else:
            if before.state == "unversioned":
                command.stamp(cfg, _recognise(engine, layout_differences(conn)))
            if before.state != "current":
                command.upgrade(cfg, "head")
        after = _status(conn)
        differences = layout_differences(conn)
        if differences:
            raise TableLayoutError(
                f"the eskit tables in {mask_url(engine.url)} do not have the layout of "
                f"revision {after.revision}: {'; '.join(differences)}. Nothing was changed."
            )
    return before, after


def recognised(differences: list[str]) -> str | None:
    """The revision of tables made before migrations, from how their layout differs
    from this code's (None: no revision has that layout)."""
    if not differences:  # made by this code's create_all, but not recorded
        return head()
    if set(differences) == SCHEMA_MARKERS_DIFFERENCES:
        return SCHEMA_MARKERS
    if set(differences) == FIRST_LAYOUT_DIFFERENCES:
        return FIRST_LAYOUT
    return None


def _recognise(engine: Engine, differences: list[str]) -> str:
    """The revision of tables made before migrations, from their layout."""
    found = recognised(differences)
    if found is not None:
        return found
    raise TableLayoutError(
        f"the eskit tables in {mask_url(engine.url)} have a layout no eskit-tasks "
        f"revision describes: {'; '.join(differences)}. The tables were not changed; "
        "see docs/upgrading.md."
    )


def _described(found: SchemaStatus) -> str:
    if found.state == "empty":
        return "not initialised"
    if found.state == "unversioned":
        return f"from before migrations and need an upgrade to revision {found.head}"
    return f"at revision {found.revision} and need an upgrade to {found.head}"


def _ahead(engine: Engine, found: SchemaStatus) -> TableLayoutError:
    return TableLayoutError(
        f"the eskit tables in {mask_url(engine.url)} are at revision {found.revision}, "
        f"which this eskit-tasks does not know (its newest is {found.head}): a newer "
        "version made them. Upgrade eskit-tasks; the tables were not changed."
    )
