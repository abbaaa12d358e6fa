from tests.backends import MemoryBackend, PostgresBackend, SqliteBackend
from tests.contracts.adversarial import AdversarialContract


class TestAdversarialMemory(MemoryBackend, AdversarialContract):
    pass


class TestAdversarialSqlite(SqliteBackend, AdversarialContract):
    pass


class TestAdversarialPostgres(PostgresBackend, AdversarialContract):
    pass
