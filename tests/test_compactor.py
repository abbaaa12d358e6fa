from eskit_tasks.testing.contracts import CompactorContract
from tests.backends import MemoryBackend, PostgresBackend, SqliteBackend


class TestCompactorMemory(MemoryBackend, CompactorContract):
    pass


class TestCompactorSqlite(SqliteBackend, CompactorContract):
    pass


class TestCompactorPostgres(PostgresBackend, CompactorContract):
    pass
