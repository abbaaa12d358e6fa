"""The one write a compaction commits without waiting for the disk (issue 15): the
unverified snapshot. Only that transaction is affected, and the connection goes back to
the pool with the durable setting it came with."""

from __future__ import annotations

from pathlib import Path

import pytest

from eskit_tasks import SqlEventStore
from eskit_tasks.stores.engine import write_transaction

SETTING = {
    "sqlite": ("PRAGMA synchronous", {True: 2, False: 1}),  # FULL / NORMAL
    "postgresql": ("SHOW synchronous_commit", {True: "on", False: "off"}),
}


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path):
    url = (
        f"sqlite:///{tmp_path / 'events.db'}"
        if request.param == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    store = SqlEventStore.from_url(url, pool_size=1, max_overflow=0)
    yield store
    store.engine.dispose()


def _setting(conn) -> object:
    driver = conn.connection.driver_connection
    query, _ = SETTING[conn.dialect.name]
    return driver.execute(query).fetchone()[0]


@pytest.mark.parametrize("durable", [True, False])
def test_only_a_non_durable_transaction_skips_the_flush_and_the_connection_comes_back_durable(
    store, durable
):
    _, values = SETTING[store.engine.dialect.name]
    with write_transaction(store.engine, durable=durable) as conn:
        assert _setting(conn) == values[durable]
    with store.engine.connect() as conn:  # the same pooled connection (pool of one)
        assert _setting(conn) == values[True]


def test_a_failed_non_durable_transaction_also_restores_the_setting(store):
    _, values = SETTING[store.engine.dialect.name]
    with pytest.raises(RuntimeError), write_transaction(store.engine, durable=False):
        raise RuntimeError("the snapshot could not be written")
    with store.engine.connect() as conn:
        assert _setting(conn) == values[True]
