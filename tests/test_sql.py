"""SQL-specific behaviour: connecting, URL handling, error translation, password masking."""

from __future__ import annotations

import contextlib
import sqlite3
import uuid
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from eskit_tasks import (
    ConfigurationError,
    DatabaseUnavailableError,
    EskitError,
    NewEvent,
    SqlEventStore,
    SqlSnapshotStore,
    StoreError,
)
from eskit_tasks.testing.deciders import deposits
from eskit_tasks.testing.services import scratch_database

SECRET = "s3cr3t-Pa55"  # noqa: S105 -- a fake password the tests look for in messages


def test_unreachable_postgres_names_host_and_masks_password():
    with pytest.raises(DatabaseUnavailableError) as info:
        SqlEventStore.from_url(f"postgresql+psycopg://bob:{SECRET}@127.0.0.1:1/x")
    message = str(info.value)
    assert "127.0.0.1" in message and "port 1" in message
    assert "bob:***@" in message
    assert SECRET not in message
    assert SECRET not in repr(info.value)


def test_missing_database_is_unavailable_with_masked_password(postgres_url: str):
    url = make_url(postgres_url).set(password=SECRET, database="eskit_no_such_db")
    with pytest.raises(DatabaseUnavailableError, match="eskit_no_such_db") as info:
        SqlEventStore.from_url(url)
    assert SECRET not in str(info.value)


def test_sqlite_file_that_cannot_be_opened_is_unavailable(tmp_path: Path):
    with pytest.raises(DatabaseUnavailableError, match="unable to open"):
        SqlEventStore.from_url(f"sqlite:///{tmp_path}/missing/dir/events.db")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (f"mysql://u:{SECRET}@h/db", "unsupported database driver 'mysql'"),
        ("not a url", "not a database URL"),
        (f"postgresql+nosuchdriver://u:{SECRET}@h/db", "unsupported database driver"),
        (f"postgresql+asyncpg://u:{SECRET}@h/db", "unsupported database driver"),
        (f"postgresql://u:{SECRET}@h:notaport/db", "not a database URL"),
        (f"postgresql://u@h/db?password={SECRET}&sslmode=disable", "cannot reach|connection"),
    ],
)
def test_bad_urls_are_configuration_errors(url: str, message: str):
    with pytest.raises(EskitError, match=message) as info:
        SqlEventStore.from_url(url, connect_args={"connect_timeout": 2})
    assert isinstance(info.value, ConfigurationError | DatabaseUnavailableError)
    assert SECRET not in str(info.value)
    assert SECRET not in repr(info.value)


def test_bare_postgresql_url_uses_psycopg(postgres_url: str):
    bare = make_url(postgres_url).set(drivername="postgresql")
    store = SqlEventStore.from_url(bare.render_as_string(hide_password=False))
    try:
        assert store.engine.dialect.driver == "psycopg"
        assert SECRET not in repr(store)
    finally:
        store.engine.dispose()


def test_repr_masks_password(postgres_url: str):
    url = make_url(postgres_url)
    store = SqlEventStore.from_url(url)
    try:
        fake = SqlEventStore(sa.create_engine(url.set(password=SECRET)), create_tables=False)
        assert SECRET not in repr(fake) and "***" in repr(fake)
        assert SECRET not in repr(SqlSnapshotStore(fake.engine, create_tables=False))
    finally:
        store.engine.dispose()


def test_tables_are_created_once_and_reused(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'e.db'}"
    first = SqlEventStore.from_url(url)
    first.append("account", "a-1", deposits(1, 2), expected_version=0)
    second = SqlEventStore.from_url(url)
    SqlSnapshotStore(second.engine)
    assert second.head_version("account", "a-1") == 2


def test_driver_errors_are_translated_never_raw(tmp_path: Path):
    store = SqlEventStore.from_url(f"sqlite:///{tmp_path / 'e.db'}")
    store.append("account", "a-1", deposits(1), expected_version=0)
    with store.engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE eskit_events")
    for call in (
        lambda: list(store.read("account", "a-1")),
        lambda: store.append("account", "a-1", deposits(2), expected_version=1),
        lambda: store.oldest_version_after("account", "a-1", store.now()),
    ):
        with pytest.raises(StoreError) as info:
            call()
        assert not isinstance(info.value, sa.exc.SQLAlchemyError)
        assert isinstance(info.value.__cause__, sa.exc.SQLAlchemyError | sqlite3.Error)


def test_store_survives_terminated_connections(postgres_url: str):
    store = SqlEventStore.from_url(postgres_url)
    try:
        store.append("account", "survivor", deposits(1), expected_version=0)
        name = make_url(postgres_url).database
        admin = make_url(postgres_url).set(drivername="postgresql", database="postgres")
        with psycopg.connect(admin.render_as_string(hide_password=False), autocommit=True) as c:
            killed = c.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            ).fetchone()
        assert killed is not None and killed[0] >= 1
        # The pooled connection is dead; pre-ping replaces it transparently.
        assert store.append("account", "survivor", deposits(2), expected_version=1) == 2
    finally:
        store.engine.dispose()


def test_connection_lost_mid_read_is_database_unavailable(postgres_url: str):
    store = SqlEventStore.from_url(postgres_url, page_size=10)
    try:
        store.append(
            "account", "long", [NewEvent("Deposited", {"amount": 1})] * 500, expected_version=0
        )
        it = store.read("account", "long")
        next(it)
        name = make_url(postgres_url).database
        admin = make_url(postgres_url).set(drivername="postgresql", database="postgres")
        with psycopg.connect(admin.render_as_string(hide_password=False), autocommit=True) as c:
            c.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
        with pytest.raises(EskitError) as info:
            list(it)
        assert isinstance(info.value, DatabaseUnavailableError), info.value
    finally:
        store.engine.dispose()


def test_bad_engine_options_are_configuration_errors(tmp_path: Path):
    with pytest.raises(ConfigurationError, match="cannot create a database engine"):
        SqlEventStore.from_url(f"sqlite:///{tmp_path / 'e.db'}", no_such_option=True)


def test_password_in_query_string_is_masked_everywhere(postgres_url: str):
    url = make_url(postgres_url)
    with_query = url.set(password=None).update_query_dict({"password": SECRET})
    store = SqlEventStore(sa.create_engine(with_query), create_tables=False)
    assert SECRET not in repr(store)


@pytest.mark.parametrize("bad_id", ["\ud800", "a\udfffb"])
def test_lone_surrogates_in_ids_are_configuration_errors(tmp_path: Path, bad_id: str):
    store = SqlEventStore.from_url(f"sqlite:///{tmp_path / 'e.db'}")
    for call in (
        lambda: store.append("account", bad_id, deposits(1), expected_version=0),
        lambda: store.head_version("account", bad_id),
        lambda: list(store.read("account", bad_id)),
    ):
        with pytest.raises(ConfigurationError, match="valid Unicode"):
            call()


def test_statement_errors_do_not_echo_parameters(tmp_path: Path):
    store = SqlEventStore.from_url(f"sqlite:///{tmp_path / 'e.db'}")
    store.append("account", "a-1", deposits(1), expected_version=0)
    with store.engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE eskit_events")
    payload = [NewEvent("Deposited", {"card": "4111-1111-1111-1111"})]
    with pytest.raises(StoreError) as info:
        store.append("account", "a-1", payload, expected_version=1)
    assert "4111" not in str(info.value)
    assert "[SQL" not in str(info.value)


def _open_store(url: str) -> str:
    try:
        SqlEventStore.from_url(url).engine.dispose()
        return "ok"
    except EskitError as exc:
        return f"{type(exc).__name__}: {exc}"


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_many_workers_creating_tables_at_once_all_succeed(kind, tmp_path: Path, postgres_url):
    import multiprocessing

    with contextlib.ExitStack() as stack:
        if kind == "sqlite":
            url = f"sqlite:///{tmp_path / 'fresh.db'}"
        else:  # a database without tables, not the session's
            url = stack.enter_context(scratch_database(postgres_url, "eskit_schema_race"))
        with multiprocessing.get_context("spawn").Pool(8) as pool:
            outcomes = pool.map(_open_store, [url] * 8)
    assert outcomes == ["ok"] * 8


@pytest.mark.parametrize(
    "stamp",
    [
        "2026-12-01 12:34:56.999999+00",
        "2026-12-01 12:34:57.000001+00",
        "1970-01-01 00:00:00.000001+00",
        "1969-12-31 23:59:59.999999+00",
        "2000-02-29 00:00:00+00",
        "2262-04-11 23:47:16.854775+00",
        "9999-12-31 23:59:59.999999+00",
    ],
)
def test_event_timestamps_read_back_to_the_microsecond(postgres_url: str, stamp: str):
    """The read path gets PostgreSQL's timestamps as microseconds since the epoch,
    computed in float8: the events carry exactly the instant PostgreSQL stored, near
    second boundaries, before the epoch and at the far end of its range too."""
    store = SqlEventStore.from_url(postgres_url)
    stream_id = f"ts-{uuid.uuid4().hex}"
    try:
        store.append("account", stream_id, deposits(1, 2), expected_version=0)
        with store.engine.begin() as conn:
            conn.exec_driver_sql(
                "UPDATE eskit_events SET recorded_at = %(t)s::timestamptz WHERE stream_pk = "
                "(SELECT pk FROM eskit_streams WHERE stream_id = %(s)s)",
                {"t": stamp, "s": stream_id},
            )
            stored = conn.exec_driver_sql("SELECT %(t)s::timestamptz", {"t": stamp}).scalar_one()
        read = [e.recorded_at for e in store.read("account", stream_id)]
        assert read == [stored, stored]
        assert all(t.utcoffset() is not None for t in read)
    finally:
        store.engine.dispose()


def test_the_fast_timestamp_expression_equals_the_exact_one(postgres_url: str):
    """The read path's float8 shortcut gives the same microsecond count as PostgreSQL's
    exact numeric extract(): for 300,000 random instants between 1902 and 2100, 100,000
    in the two centuries after (where float8 alone would be off), the instants next to
    each edge, and some far outside."""
    from eskit_tasks.stores.reads import _PG_MICROS

    fast = _PG_MICROS.replace("recorded_at", "ts")
    exact = "(extract(epoch FROM ts) * 1000000)::bigint"
    edges = [
        "1901-12-31 23:59:59.999999+00",
        "1902-01-01 00:00:00+00",
        "1902-01-01 00:00:00.000001+00",
        "2099-12-31 23:59:59.999999+00",
        "2100-01-01 00:00:00+00",
        "2100-01-01 00:00:00.000001+00",
        "2262-04-11 23:47:16.854775+00",
        "9999-12-31 23:59:59.999999+00",
        "1000-06-15 12:00:00.000001+00",
    ]
    libpq = make_url(postgres_url).set(drivername="postgresql")
    with psycopg.connect(libpq.render_as_string(hide_password=False)) as conn:
        differ = conn.execute(
            "WITH t AS ("
            "  SELECT timestamptz '1902-01-01 00:00:00+00'"
            "         + random() * (timestamptz '2100-01-01 00:00:00+00'"
            "                       - timestamptz '1902-01-01 00:00:00+00') AS ts"
            "  FROM generate_series(1, 300000)"
            "  UNION ALL SELECT timestamptz '2100-01-01 00:00:00+00'"
            "         + random() * (timestamptz '2300-01-01 00:00:00+00'"
            "                       - timestamptz '2100-01-01 00:00:00+00')"
            "  FROM generate_series(1, 100000)"
            "  UNION ALL SELECT unnest(%s::timestamptz[]))"
            f" SELECT count(*) FILTER (WHERE {fast} <> {exact}), count(*) FROM t",
            (edges,),
        ).fetchone()
    assert differ == (0, 400_000 + len(edges))
