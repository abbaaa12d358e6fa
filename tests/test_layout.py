"""Tables of another layout are refused with one line, on SQLite and PostgreSQL ([1/6]
case 6: `init-db` used to say "tables ready" and compaction failed later)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from eskit_tasks import (
    SqlEventStore,
    TableLayoutError,
)
from eskit_tasks.cli import main
from eskit_tasks.testing.services import scratch_database

UPGRADING = Path(__file__).resolve().parent.parent / "docs" / "upgrading.md"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.services)])
def fresh_url(request, tmp_path: Path) -> Iterator[str]:
    """A database of its own (the layout is changed by hand, so not the shared one)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'layout.db'}"
        return
    with scratch_database(request.getfixturevalue("postgres_url"), "eskit_layout") as url:
        yield url


def _alter(url: str, *statements: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        for statement in statements:
            conn.exec_driver_sql(statement)
    engine.dispose()


def _columns(url: str, table: str) -> list[str]:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        names = [c["name"] for c in sa.inspect(conn).get_columns(table)]
    engine.dispose()
    return names


def _first_layout(url: str) -> None:
    """The tables as the first release made them (no schema markers on snapshots)."""
    SqlEventStore.from_url(url).engine.dispose()
    _alter(
        url,
        "ALTER TABLE eskit_snapshots DROP COLUMN state_version",
        "ALTER TABLE eskit_snapshots DROP COLUMN fingerprint",
    )


@pytest.mark.parametrize(
    ("table", "column"),
    [("eskit_streams", "fence_token"), ("eskit_snapshots", "fingerprint")],
)
def test_a_missing_column_is_refused_with_one_line_and_nothing_changes(
    fresh_url: str, table: str, column: str
):
    SqlEventStore.from_url(fresh_url).engine.dispose()
    _alter(
        fresh_url, f"ALTER TABLE {table} DROP COLUMN {column}", "DROP TABLE eskit_compaction_log"
    )
    with pytest.raises(TableLayoutError) as info:
        SqlEventStore.from_url(fresh_url)
    text = str(info.value)
    assert "\n" not in text
    assert f"{table} lacks column {column}" in text
    assert "The tables were not changed" in text and "docs/upgrading.md" in text
    engine = sa.create_engine(fresh_url)
    with engine.connect() as conn:
        assert "eskit_compaction_log" not in sa.inspect(conn).get_table_names()
    engine.dispose()


def test_init_db_refuses_instead_of_saying_ready(fresh_url: str, capsys: pytest.CaptureFixture):
    _first_layout(fresh_url)
    assert main(["init-db", "--database", fresh_url]) == 1
    captured = capsys.readouterr()
    assert "ready" not in captured.out + captured.err
    [line] = captured.err.strip().splitlines()
    assert line.startswith("error: the eskit tables in ")
    assert "eskit_snapshots lacks columns fingerprint, state_version" in line


def test_an_unknown_column_this_version_cannot_fill_is_refused(fresh_url: str):
    SqlEventStore.from_url(fresh_url).engine.dispose()
    _alter(fresh_url, "ALTER TABLE eskit_events ADD COLUMN tenant TEXT NOT NULL DEFAULT 'x'")
    SqlEventStore.from_url(fresh_url).engine.dispose()  # a default fills it: fine
    _alter(fresh_url, "ALTER TABLE eskit_streams ADD COLUMN shard BIGINT")
    SqlEventStore.from_url(fresh_url).engine.dispose()  # nullable: fine
    if fresh_url.startswith("sqlite"):
        return  # SQLite cannot add a NOT NULL column without a default
    _alter(fresh_url, "ALTER TABLE eskit_streams ALTER COLUMN shard SET NOT NULL")
    with pytest.raises(TableLayoutError, match="eskit_streams has column shard that this version"):
        SqlEventStore.from_url(fresh_url)
