from eskit_tasks.testing.contracts import ConsumersContract
from tests.backends import MemoryBackend, PostgresBackend, SqliteBackend


class TestConsumersMemory(MemoryBackend, ConsumersContract):
    pass


class TestConsumersSqlite(SqliteBackend, ConsumersContract):
    pass


class TestConsumersPostgres(PostgresBackend, ConsumersContract):
    pass
