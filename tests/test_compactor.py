from tests.backends import MemoryBackend, PostgresBackend, SqliteBackend
from tests.contracts.compactor import CompactorContract


class TestCompactorMemory(MemoryBackend, CompactorContract):
    pass


class TestCompactorSqlite(SqliteBackend, CompactorContract):
    pass


class TestCompactorPostgres(PostgresBackend, CompactorContract):
    pass
