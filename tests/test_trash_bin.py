from eskit_tasks.testing.contracts import TrashBinContract
from tests.backends import MemoryBackend, PostgresBackend, SqliteBackend


class TestTrashBinMemory(MemoryBackend, TrashBinContract):
    pass


class TestTrashBinSqlite(SqliteBackend, TrashBinContract):
    pass


class TestTrashBinPostgres(PostgresBackend, TrashBinContract):
    pass
