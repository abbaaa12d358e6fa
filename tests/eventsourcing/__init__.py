"""eskit-tasks on the store of a real pyeventsourcing application (SQLite, PostgreSQL)."""
