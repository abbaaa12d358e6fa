from eskit_tasks.testing.contracts import AdversarialContract
from tests.backends import MemoryBackend, PostgresBackend, SqliteBackend


class TestAdversarialMemory(MemoryBackend, AdversarialContract):
    pass


class TestAdversarialSqlite(SqliteBackend, AdversarialContract):
    pass


class TestAdversarialPostgres(PostgresBackend, AdversarialContract):
    pass
