from eskit_tasks.testing.contracts import EventStoreContract
from tests.backends import MemoryBackend, PostgresBackend, SqliteBackend


class TestEventStoreMemory(MemoryBackend, EventStoreContract):
    pass


class TestEventStoreSqlite(SqliteBackend, EventStoreContract):
    pass


class TestEventStorePostgres(PostgresBackend, EventStoreContract):
    pass
