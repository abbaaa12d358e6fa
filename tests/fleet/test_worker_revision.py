"""A worker refuses to start on tables this code cannot use, and says what to do."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from eskit_tasks.stores import migrate
from eskit_tasks.tasks import compact_stream
from tests.fleet.conftest import Fleet
from tests.test_migrations import tables_at


def _first_layout_database(path: Path) -> str:
    """Tables as the first release made them, before migrations (no revision)."""
    url = f"sqlite:///{path}"
    tables_at(url, migrate.FIRST_LAYOUT)
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"DROP TABLE {migrate.VERSION_TABLE}")
    engine.dispose()
    return url


def test_a_worker_refuses_tables_that_need_an_upgrade_until_init_db(fleet: Fleet, tmp_path: Path):
    url = _first_layout_database(tmp_path / "old.db")
    with pytest.raises(RuntimeError, match="exited at start") as info:
        fleet.worker("old-tables", concurrency=1, ESKIT_DATABASE_URL=url)
    said = str(info.value)
    assert "the worker cannot start" in said and "run eskit-tasks init-db" in said
    engine = sa.create_engine(url)
    assert migrate.status(engine).state == "unversioned"  # the worker changed nothing

    migrate.upgrade(engine)
    engine.dispose()
    fleet.worker("upgraded", concurrency=1, ESKIT_DATABASE_URL=url)
    result = compact_stream.delay("ledger", "nothing-here").get(timeout=60)
    assert result["outcome"] == "nothing_to_compact", result


def test_a_worker_refuses_an_archive_it_cannot_write(fleet: Fleet, tmp_path: Path):
    not_a_directory = tmp_path / "trash"
    not_a_directory.write_text("a file")
    with pytest.raises(RuntimeError, match="exited at start") as info:
        fleet.worker("bad-archive", concurrency=1, ESKIT_ARCHIVE_URL=str(not_a_directory))
    said = str(info.value)
    assert "the worker cannot start" in said and "is not a directory" in said
