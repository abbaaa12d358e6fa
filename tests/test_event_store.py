from tests.backends import MemoryBackend, PostgresBackend, SqliteBackend
from tests.contracts.event_store import EventStoreContract


class TestEventStoreMemory(MemoryBackend, EventStoreContract):
    pass


class TestEventStoreSqlite(SqliteBackend, EventStoreContract):
    pass


class TestEventStorePostgres(PostgresBackend, EventStoreContract):
    pass
