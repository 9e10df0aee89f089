"""The state database: what the platform remembers, in one place that every node reaches.

The label inbox, the loop's rollout records and configuration, the event log, pipeline records,
job events, drift reports and the serving ledger's totals live in one SQL database named by
`FLOWOPS_STATE_URL` (a SQLAlchemy URL): SQLite in the home folder by default, so the embedded
stack needs no setup, and PostgreSQL for a cluster (`postgresql+psycopg://user:pw@host/flowops`),
so a Serve replica, a Ray job and the CLI on any node read and write the same state.

Concurrency comes from the database, never from file locks across nodes: every change is one
transaction. SQLite (WAL, full fsync) queues writers with `BEGIN IMMEDIATE` and a busy timeout;
PostgreSQL serialises what must not interleave with transaction-scoped advisory locks (`lock`,
`exclusive`), which the server releases when the holder's connection dies.

The schema belongs to the Alembic migrations in `flowops/migrations` (run in code, no alembic.ini).
`flowops up` migrates; so does the first use of the database in any process (idempotent, under a
lock, one transaction: a failed migration leaves the previous schema as it was).

The stores import this module inside their functions, so the CLI starts without SQLAlchemy.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa

from flowops.durable import file_lock
from flowops.errors import ClusterUnavailable, Conflict, FlowOpsError
from flowops.settings import Settings

MIGRATIONS = Path(__file__).with_name("migrations")
BUSY_TIMEOUT_S = 30  # how long a SQLite writer waits for another one before giving up
CONNECT_TIMEOUT_S = 10

METADATA = sa.MetaData()

labels = sa.Table(
    "labels", METADATA,
    sa.Column("task_id", sa.String, primary_key=True),
    sa.Column("image_id", sa.String, nullable=False),
    sa.Column("label", sa.String, nullable=False),
    sa.Column("source", sa.String, nullable=False),
    sa.Column("annotator", sa.String, nullable=False, server_default=""),
    sa.Column("received_at", sa.Float, nullable=False),
    sa.Column("used_in", sa.String),  # the data version that consumed the label; NULL while new
    sa.Index("labels_unused", "used_in", "received_at"),
)
events = sa.Table(
    "events", METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("key", sa.String, unique=True),  # an event with a key is written at most once
    sa.Column("ts", sa.Float, nullable=False),
    sa.Column("event", sa.String, nullable=False),
    sa.Column("rollout", sa.String, index=True),
    sa.Column("record", sa.JSON, nullable=False),
)
rollouts = sa.Table(
    "rollouts", METADATA,
    sa.Column("id", sa.String, primary_key=True),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("record", sa.JSON, nullable=False),
)
documents = sa.Table(  # small named JSON documents: the loop's config and controller heartbeat
    "documents", METADATA,
    sa.Column("name", sa.String, primary_key=True),
    sa.Column("body", sa.JSON, nullable=False),
)
pipelines = sa.Table(
    "pipelines", METADATA,
    sa.Column("id", sa.String, primary_key=True),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("record", sa.JSON, nullable=False),
)
job_events = sa.Table(
    "job_events", METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("ts", sa.Float, nullable=False),
    sa.Column("event", sa.String, nullable=False),
    sa.Column("workload", sa.String, nullable=False),
    sa.Column("duration_s", sa.Float),
)
drift_reports = sa.Table(
    "drift_reports", METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("ts", sa.Float, nullable=False),
    sa.Column("model", sa.String, nullable=False),
    sa.Column("drifted", sa.Boolean, nullable=False),
    sa.Column("report", sa.JSON, nullable=False),
)
ledger_totals = sa.Table(
    "ledger_totals", METADATA,
    sa.Column("app", sa.String, primary_key=True),
    sa.Column("version", sa.String, primary_key=True),
    sa.Column("totals", sa.JSON, nullable=False),
    sa.Column("updated", sa.Float, nullable=False),
)

_ENGINES: dict[tuple[int, str], sa.Engine] = {}  # one engine per URL (and process: never forked)
_MIGRATED: set[tuple[int, str]] = set()
_GUARD = threading.Lock()


def state_url(settings: Settings) -> str:
    """The configured state URL, or SQLite in the home folder."""
    return settings.state_url or f"sqlite:///{settings.home / 'state.db'}"


def masked(url: str) -> str:
    """The URL as it may be printed: the password replaced by ***."""
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def _parse(url: str) -> sa.URL:
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError:
        raise ClusterUnavailable(
            f"state database {masked(url)!r} (FLOWOPS_STATE_URL) is not a database URL; expected "
            "sqlite:///PATH or postgresql+psycopg://USER:PASSWORD@HOST:PORT/DATABASE") from None
    if parsed.drivername in ("postgres", "postgresql"):  # psycopg 3 is the driver FlowOps ships
        parsed = parsed.set(drivername="postgresql+psycopg")
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise ClusterUnavailable(f"state database {masked(url)}: backend {backend!r} is not "
                                 "supported; use sqlite:///PATH or postgresql+psycopg://...")
    if backend == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise ClusterUnavailable(f"state database {masked(url)}: SQLite needs a file "
                                 "(sqlite:///PATH), shared by every process of the platform")
    return parsed


def _tried(url: str) -> str:
    """What connecting to `url` means, for an error message."""
    try:
        parsed = _parse(url)
    except ClusterUnavailable:
        return "parsing the URL"
    if parsed.get_backend_name() == "sqlite":
        return f"opening the SQLite file {parsed.database}"
    return (f"connecting to {parsed.host or 'the local socket'}:{parsed.port or 5432} as "
            f"{parsed.username or 'the current user'}, database {parsed.database}")


@contextlib.contextmanager
def _reaching(url: str) -> Iterator[None]:
    """Turn "cannot reach / open the database" into one line naming the (masked) URL."""
    try:
        yield
    except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
        reason = " ".join(str(exc.orig or exc).split())[:300]
        raise ClusterUnavailable(f"state database {masked(url)} is unreachable ({_tried(url)}): "
                                 f"{reason}; check FLOWOPS_STATE_URL") from None


def _json(value) -> str:
    return json.dumps(value, default=str)


def _create(url: str) -> sa.Engine:
    parsed = _parse(url)
    if parsed.get_backend_name() == "postgresql":
        return sa.create_engine(parsed, json_serializer=_json, pool_pre_ping=True,
                                connect_args={"connect_timeout": CONNECT_TIMEOUT_S})
    try:
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ClusterUnavailable(f"state database {masked(url)}: {_tried(url)} failed: "
                                 f"{exc.strerror or exc}") from None
    engine = sa.create_engine(parsed, json_serializer=_json,
                              connect_args={"timeout": BUSY_TIMEOUT_S})

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        # FlowOps begins transactions itself (below): pysqlite's own BEGIN handling skips DDL
        # and takes the write lock late, so two writers could fail instead of queueing.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
        cursor.execute("PRAGMA synchronous=FULL")  # a committed label survives a power cut
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_S * 1000}")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(connection) -> None:
        reading = connection.get_execution_options().get("flowops_read")
        connection.exec_driver_sql("BEGIN" if reading else "BEGIN IMMEDIATE")

    return engine


def _engine(url: str) -> sa.Engine:
    key = (os.getpid(), url)
    with _GUARD:
        if key not in _ENGINES:
            _ENGINES[key] = _create(url)
        return _ENGINES[key]


def engine(settings: Settings) -> sa.Engine:
    """The engine of the state database, its schema migrated to this FlowOps's head."""
    url = state_url(settings)
    key = (os.getpid(), url)
    found = _engine(url)
    if key not in _MIGRATED:
        _upgrade(found, url, settings.home)
        _MIGRATED.add(key)
    return found


def migrate(settings: Settings) -> dict[str, str | None]:
    """Bring the schema to this FlowOps's head (idempotent): `flowops up` calls it.

    Returns the masked URL and the revision before and after."""
    url = state_url(settings)
    before, after = _upgrade(_engine(url), url, settings.home)
    _MIGRATED.add((os.getpid(), url))
    return {"url": masked(url), "before": before, "revision": after}


def _alembic_config(home: Path):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["home"] = home  # where files from before the state database are imported from
    return config


def _upgrade(engine_: sa.Engine, url: str, home: Path) -> tuple[str | None, str]:
    from alembic import command
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    config = _alembic_config(home)
    script = ScriptDirectory.from_config(config)
    head = script.get_current_head()
    with _reaching(url), engine_.connect() as conn:
        conn.execution_options(flowops_read=True)
        current = MigrationContext.configure(conn).get_current_revision()
    if current == head:
        return current, head
    if current is not None and current not in {s.revision for s in script.walk_revisions()}:
        raise Conflict(f"state database {masked(url)} has schema revision {current}, which this "
                       f"FlowOps does not know (its newest is {head}): upgrade FlowOps")
    try:
        with _reaching(url), engine_.begin() as conn:
            lock(conn, "flowops-migrate")  # a second migrator waits, then finds nothing to do
            config.attributes["connection"] = conn
            command.upgrade(config, "head")
    except FlowOpsError:
        raise
    except Exception as exc:  # noqa: BLE001 - the migration's own error, in one line
        reason = " ".join(str(getattr(exc, "orig", None) or exc).split())[:300]
        raise FlowOpsError(f"migrating the state database {masked(url)} from {current or 'empty'} "
                           f"to {head} failed, nothing was changed: {reason}") from None
    return current, head


def _lock_key(name: str) -> int:
    return int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "big", signed=True)


def lock(conn: sa.Connection, name: str) -> None:
    """Serialise the transactions that take lock `name`, until this one ends. On PostgreSQL an
    advisory lock; SQLite's write transaction (BEGIN IMMEDIATE) already excludes every other."""
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _lock_key(name)})


@contextlib.contextmanager
def transaction(settings: Settings) -> Iterator[sa.Connection]:
    """One write transaction: committed when the block ends, rolled back if it raises."""
    url = state_url(settings)
    found = engine(settings)
    with _reaching(url), found.begin() as conn:
        yield conn


@contextlib.contextmanager
def reading(settings: Settings) -> Iterator[sa.Connection]:
    """One read-only transaction (a consistent view; on SQLite it does not queue behind writers)."""
    url = state_url(settings)
    found = engine(settings)
    with _reaching(url), found.connect() as conn:
        conn.execution_options(flowops_read=True)
        with conn.begin():
            yield conn


@contextlib.contextmanager
def exclusive(settings: Settings, name: str) -> Iterator[None]:
    """Run a block in one process of the whole platform at a time (a data version cut).

    PostgreSQL: an advisory lock held by an open transaction, released by the server if the holder
    dies. SQLite lives on one machine by nature: a lock file beside the database file.
    """
    url = state_url(settings)
    found = engine(settings)
    if found.dialect.name == "sqlite":
        path = Path(found.url.database).expanduser()
        with file_lock(path.with_name(f"{path.name}.{name}.lock")):
            yield
        return
    with _reaching(url), found.begin() as conn:
        lock(conn, name)
        yield


def insert(conn: sa.Connection, table: sa.Table):
    """An INSERT that knows ON CONFLICT (upserts) in the connection's dialect."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    return dialect_insert(table)


def get_document(conn: sa.Connection, name: str):
    """The body of document `name`, or None."""
    return conn.execute(sa.select(documents.c.body).where(documents.c.name == name)).scalar()


def put_document(conn: sa.Connection, name: str, body) -> None:
    """Create or replace document `name`."""
    stmt = insert(conn, documents).values(name=name, body=body)
    conn.execute(stmt.on_conflict_do_update(index_elements=["name"], set_={"body": stmt.excluded.body}))
