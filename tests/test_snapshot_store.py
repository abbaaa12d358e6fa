from eskit_tasks.testing.contracts import SnapshotStoreContract
from tests.backends import MemoryBackend, PostgresBackend, SqliteBackend


class TestSnapshotStoreMemory(MemoryBackend, SnapshotStoreContract):
    pass


class TestSnapshotStoreSqlite(SqliteBackend, SnapshotStoreContract):
    pass


class TestSnapshotStorePostgres(PostgresBackend, SnapshotStoreContract):
    pass
