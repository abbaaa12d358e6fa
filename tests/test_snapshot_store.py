from tests.backends import MemoryBackend, PostgresBackend, SqliteBackend
from tests.contracts.snapshot_store import SnapshotStoreContract


class TestSnapshotStoreMemory(MemoryBackend, SnapshotStoreContract):
    pass


class TestSnapshotStoreSqlite(SqliteBackend, SnapshotStoreContract):
    pass


class TestSnapshotStorePostgres(PostgresBackend, SnapshotStoreContract):
    pass
