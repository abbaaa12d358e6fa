"""Tables shared by the SQL event store and snapshot store (one database, one metadata),
their creation and layout check, and the lookup of a stream's row.

Streams get a surrogate integer key: events, snapshots and the audit log refer to it,
which keeps their indexes small whatever the length of stream ids, and makes "this
stream's rows" one integer comparison — no LIKE, no prefix match, no id collision.
"""

from __future__ import annotations

import weakref
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Dialect, Engine

from eskit_tasks.domain.schema import UNRECORDED
from eskit_tasks.errors import TableLayoutError
from eskit_tasks.ports import StreamInfo
from eskit_tasks.stores.driver_errors import mask_url, translate_errors
from eskit_tasks.stores.positions import UNGIVEN_POSITION_DDL

metadata = sa.MetaData()

# SQLite only turns an INTEGER PRIMARY KEY into an auto-incrementing rowid alias;
# BIGINT there would be a plain column without defaults.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


class UtcDateTime(sa.TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend.

    PostgreSQL stores ``timestamptz``; SQLite has no timezone type, so values are
    stored as naive UTC and given back their timezone on the way out.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; eskit-tasks stores UTC-aware datetimes only")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


streams = sa.Table(
    "eskit_streams",
    metadata,
    sa.Column("pk", BigId, primary_key=True, autoincrement=True),
    sa.Column("stream_type", sa.Text, nullable=False),
    sa.Column("stream_id", sa.Text, nullable=False),
    # The head survives the deletion of every event: optimistic concurrency keeps working.
    sa.Column("head_version", sa.BigInteger, nullable=False),
    # Events at or below this version were deleted by a committed compaction.
    sa.Column("compacted_through", sa.BigInteger, nullable=False, server_default="0"),
    # Bumped by every compaction that starts; a delete under an older value is refused.
    sa.Column("fence_token", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.UniqueConstraint("stream_type", "stream_id", name="eskit_streams_type_id_key"),
)

events = sa.Table(
    "eskit_events",
    metadata,
    sa.Column("stream_pk", sa.BigInteger, primary_key=True),
    sa.Column("version", sa.BigInteger, primary_key=True),
    sa.Column("type", sa.Text, nullable=False),
    # JSON text: decoded with orjson, which is several times faster than a driver's
    # jsonb loader, and identical on PostgreSQL and SQLite.
    sa.Column("data", sa.Text, nullable=False),
    sa.Column("metadata", sa.Text, nullable=False),
    sa.Column("recorded_at", UtcDateTime, nullable=False),
    # The event's place in the whole store, strictly increasing in commit order
    # (:mod:`.positions`); what consumers' checkpoints count. An insert that gives none
    # (an older eskit-tasks during a rolling upgrade) gets one from the DDL below. NOT
    # NULL on PostgreSQL; nullable on SQLite, which cannot add NOT NULL without a rebuild.
    sa.Column("position", sa.BigInteger, nullable=True),
    sa.Index("eskit_events_position_key", "position", unique=True),
    # Range scans of one stream read a clustered b-tree on SQLite.
    sqlite_with_rowid=False,
)

#: PostgreSQL numbers events from this sequence (under the append lock, see
#: :mod:`.positions`); SQLite has no sequences and uses ``eskit_position_counter``.
position_sequence = sa.Sequence("eskit_events_position_seq", metadata=metadata)

position_counter = sa.Table(
    "eskit_position_counter",
    metadata,
    # SQLite only (PostgreSQL leaves it empty): one row, the last position handed out.
    # Not max(position): a compaction may delete the newest event, and its number must
    # never be handed out again behind a consumer's checkpoint.
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("last_position", sa.BigInteger, nullable=False),
)


# Inserts that give no position get one (see :mod:`.positions`); after every table, since
# the SQLite trigger uses the counter.
@sa.event.listens_for(metadata, "after_create")
def _give_ungiven_positions(target: sa.MetaData, connection: Connection, **kw: Any) -> None:
    if any(table.name == "eskit_events" for table in kw.get("tables", ())):
        for statement in UNGIVEN_POSITION_DDL.get(connection.dialect.name, ()):
            connection.exec_driver_sql(statement)


checkpoints = sa.Table(
    "eskit_checkpoints",
    metadata,
    sa.Column("consumer", sa.Text, primary_key=True),
    # The position of the last event the consumer has processed; never moves backwards.
    sa.Column("position", sa.BigInteger, nullable=False),
    # JSON list of the stream types it reads; NULL: every stream type.
    sa.Column("stream_types", sa.Text, nullable=True),
    sa.Column("updated_at", UtcDateTime, nullable=False),
)

snapshots = sa.Table(
    "eskit_snapshots",
    metadata,
    sa.Column("stream_pk", sa.BigInteger, primary_key=True),
    sa.Column("version", sa.BigInteger, primary_key=True),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("state_hash", sa.String(64), nullable=False),
    # Readers use verified snapshots only; a compaction marks its snapshot verified in
    # the same transaction that deletes the events it covers.
    sa.Column("verified", sa.Boolean, nullable=False),
    sa.Column("fence_token", sa.BigInteger, nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
    # Which state schema wrote the snapshot: a snapshot of another schema is decoded
    # only through the decider's upcasters ('unrecorded': written before markers).
    sa.Column("fingerprint", sa.String(64), nullable=False, server_default=UNRECORDED),
    sa.Column("state_version", sa.BigInteger, nullable=True),
    sqlite_with_rowid=False,
)

compaction_log = sa.Table(
    "eskit_compaction_log",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("compaction_id", sa.String(36), nullable=False, unique=True),
    sa.Column("stream_pk", sa.BigInteger, nullable=False, index=True),
    sa.Column("stream_type", sa.Text, nullable=False),
    sa.Column("stream_id", sa.Text, nullable=False),
    sa.Column("from_version", sa.BigInteger, nullable=False),
    sa.Column("through_version", sa.BigInteger, nullable=False),
    sa.Column("snapshot_version", sa.BigInteger, nullable=False),
    sa.Column("head_version", sa.BigInteger, nullable=False),
    sa.Column("state_hash", sa.String(64), nullable=False),
    sa.Column("events_deleted", sa.BigInteger, nullable=False),
    sa.Column("bytes_reclaimed", sa.BigInteger, nullable=False),
    sa.Column("fence_token", sa.BigInteger, nullable=False),
    sa.Column("compacted_at", UtcDateTime, nullable=False),
    # The trash bin's copy of the deleted events, confirmed before the delete committed.
    sa.Column("archive_uri", sa.Text, nullable=True),
    sa.Column("archive_sha256", sa.String(64), nullable=True),
    # Set when the archived events were put back (eskit-tasks restore).
    sa.Column("restored_at", UtcDateTime, nullable=True),
    # The run that made this compaction (None: a compaction outside any run).
    sa.Column("run_id", sa.String(32), nullable=True, index=True),
)

runs = sa.Table(
    "eskit_runs",
    metadata,
    sa.Column("run_id", sa.String(32), primary_key=True),
    # Who started it: beat, shell, cli, local (compact-all --local), plan.
    sa.Column("trigger", sa.Text, nullable=False),
    # JSON: the run's arguments (policy, min_events, stream_types, max_streams).
    sa.Column("policy", sa.Text, nullable=False),
    sa.Column("plan_id", sa.String(32), nullable=True),
    sa.Column("started_at", UtcDateTime, nullable=False),
    sa.Column("finished_at", UtcDateTime, nullable=True),
    sa.Column("candidates", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("done", sa.BigInteger, nullable=False, server_default="0"),
    # JSON: streams per outcome.
    sa.Column("outcomes", sa.Text, nullable=False, server_default="{}"),
    sa.Column("events_deleted", sa.BigInteger, nullable=False, server_default="0"),
    # JSON: what the run's end reclaimed, measured (see stores/reclaim.py).
    sa.Column("reclaim", sa.Text, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
)

quarantine = sa.Table(
    "eskit_quarantine",
    metadata,
    sa.Column("stream_type", sa.Text, primary_key=True),
    sa.Column("stream_id", sa.Text, primary_key=True),
    # Compactions in a row that ended failed or verification_failed.
    sa.Column("failures", sa.BigInteger, nullable=False),
    sa.Column("last_outcome", sa.Text, nullable=False),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("first_failed_at", UtcDateTime, nullable=False),
    sa.Column("last_failed_at", UtcDateTime, nullable=False),
    # Set once the failures reach the threshold: candidates skip the stream until
    # retry_after, when one more attempt is made (healed: the row goes).
    sa.Column("quarantined_at", UtcDateTime, nullable=True),
    sa.Column("retry_after", UtcDateTime, nullable=True),
)

plans = sa.Table(
    "eskit_plans",
    metadata,
    sa.Column("plan_id", sa.String(32), primary_key=True),
    # JSON: the policy and selection the plan was made with.
    sa.Column("policy", sa.Text, nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("expires_at", UtcDateTime, nullable=False),
    sa.Column("verified", sa.Boolean, nullable=False),
    sa.Column("streams", sa.BigInteger, nullable=False),
    sa.Column("events", sa.BigInteger, nullable=False),
    sa.Column("bytes", sa.BigInteger, nullable=False),
)

plan_streams = sa.Table(
    "eskit_plan_streams",
    metadata,
    sa.Column("plan_id", sa.String(32), primary_key=True),
    sa.Column("seq", sa.BigInteger, primary_key=True),
    sa.Column("stream_type", sa.Text, nullable=False),
    sa.Column("stream_id", sa.Text, nullable=False),
    sa.Column("head_version", sa.BigInteger, nullable=False),
    sa.Column("compacted_through", sa.BigInteger, nullable=False),
    # The cut C: apply deletes events up to here, never further.
    sa.Column("through_version", sa.BigInteger, nullable=False),
    sa.Column("events", sa.BigInteger, nullable=False),
    sa.Column("bytes", sa.BigInteger, nullable=False),
    # With --verify: the dry run's outcome and error.
    sa.Column("outcome", sa.Text, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    # A stream's cut, looked up by the fan-out for the streams of a stored page.
    sa.Index("eskit_plan_streams_stream_key", "plan_id", "stream_type", "stream_id", unique=True),
    sqlite_with_rowid=False,
)


def layout_differences(conn: sa.Connection) -> list[str]:
    """How the existing eskit tables in ``conn``'s database differ from this version's
    layout: missing tables and columns, and unknown columns this version could not fill
    (NOT NULL, no default)."""
    inspector = sa.inspect(conn)
    existing = set(inspector.get_table_names())
    found = []
    for table in metadata.sorted_tables:
        if table.name not in existing:
            found.append(f"{table.name} is missing")
            continue
        columns = {c["name"]: c for c in inspector.get_columns(table.name)}
        missing = [c.name for c in table.columns if c.name not in columns]
        if missing:
            found.append(
                f"{table.name} lacks column{'s' * (len(missing) > 1)} {', '.join(missing)}"
            )
        unknown = [
            name
            for name, col in columns.items()
            if name not in table.columns
            and not col.get("nullable", True)
            and col.get("default") is None
            and not col.get("autoincrement", False)
        ]
        if unknown:
            found.append(
                f"{table.name} has column{'s' * (len(unknown) > 1)} {', '.join(unknown)} that "
                "this version cannot fill (NOT NULL without a default; a newer eskit-tasks?)"
            )
    return found


# Engines whose tables were created or checked already (once per engine, not per store).
_checked_engines: weakref.WeakSet[Engine] = weakref.WeakSet()


def ensure_schema(engine: Engine) -> None:
    """Make the tables of an empty database, record the revision of tables made before
    migrations if they have this version's layout, and refuse anything else; once per
    engine, safe when many workers start at once on an empty database.

    Raises:
        DatabaseNotReadyError: the tables need an upgrade (``eskit-tasks init-db``).
        TableLayoutError: the tables exist with another layout, or were made by a newer
            eskit-tasks (nothing was changed).
    """
    from eskit_tasks.stores import migrate

    if engine in _checked_engines:
        return
    found = migrate.status(engine)
    if found.state in ("behind", "ahead"):
        migrate.require_current(engine)  # raises, saying what to do
    if found.state != "empty":
        with translate_errors(engine, "open the event store"), engine.connect() as conn:
            differences = layout_differences(conn)
        if found.state == "unversioned" and migrate.recognised(differences):
            migrate.require_current(engine)  # an older layout: init-db upgrades it
        if differences:
            raise TableLayoutError(
                f"the eskit tables in {mask_url(engine.url)} do not have the layout this "
                f"eskit-tasks expects: {'; '.join(differences)}. The tables were not "
                "changed; upgrade them as docs/upgrading.md describes, or use a database "
                "made by this version (eskit-tasks init-db)."
            )
    if found.state in ("empty", "unversioned"):
        migrate.upgrade(engine)  # create the tables, or record their revision
    _checked_engines.add(engine)


def stream_row(
    conn: Connection, stream_type: str, stream_id: str, *, lock: bool = False
) -> tuple[int, StreamInfo] | tuple[None, None]:
    """A stream's key and bookkeeping, ``(None, None)`` if there is no such stream;
    ``lock`` takes the row lock the writers serialise on (``FOR UPDATE``; on SQLite the
    write transaction holds the database's lock already)."""
    s = streams.c
    query = sa.select(s.pk, s.head_version, s.compacted_through, s.fence_token).where(
        s.stream_type == stream_type, s.stream_id == stream_id
    )
    if lock:
        query = query.with_for_update()
    row = conn.execute(query).one_or_none()
    if row is None:
        return None, None
    return int(row[0]), StreamInfo(row[1], row[2], row[3])
