"""Database engine, sessions and the schema-version check."""

from __future__ import annotations

import time
from collections import namedtuple
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import Connection, Engine, Executable, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

from shared import clock
from shared.direct_connections import DirectConnections
from shared.settings import SettingsError

log = structlog.get_logger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 30_000
# A host clock this far from the database server's is worth a warning (it is corrected for).
CLOCK_WARN_S = 1.0
# What a database that is down, restarting, overloaded or locked raises (a refused connection, a
# dropped one, a full pool, a statement timeout, a deadlock): the same request may succeed soon.
DATABASE_UNAVAILABLE = (OperationalError, InterfaceError, PoolTimeout)
# Seconds a new PostgreSQL connection may take before it counts as the database unavailable.
CONNECT_TIMEOUT_S = 5


def error_summary(exc: Exception) -> str:
    """Return the first line of a database error's driver message (it names host, port, database)."""
    cause = getattr(exc, "orig", None) or exc
    return (str(cause).strip().splitlines() or [type(cause).__name__])[0]
# The migrations' head revision, checked against Alembic's by a test (a new migration must move
# it): the schema check at start-up then needs neither Alembic nor its scan of the migration
# scripts (0.15-0.2 s of a worker's or gateway's start, docs/benchmarks.md).
SCHEMA_HEAD = "0009"
VERSION_TABLE = "alembic_version"


def get_by_id(session: Session, model: type, row_id: str, **options: Any) -> Any:
    """`session.get` by a client-given text id: one holding NUL names no row (PostgreSQL refuses
    NUL in text outright, a 500, where no id holds one)."""
    return session.get(model, row_id, **options) if "\x00" not in row_id else None


# Revisions newer than the code that this process has warned about (once each).
_newer_schemas_seen: set[str] = set()


class SchemaOutOfDate(RuntimeError):
    """The database schema is not at the migrations' head."""


def schema_is_newer(current: str | None, head: str = SCHEMA_HEAD) -> bool:
    """Whether a database at revision `current` was migrated by a newer release than this code."""
    return current is not None and current.isdigit() and current > head  # revisions: 0001, 0002, …


def schema_mismatch(current: str | None, head: str = SCHEMA_HEAD) -> str:
    """Say what to do about a database whose schema is at `current` where the code needs `head`."""
    if schema_is_newer(current, head):
        return (f"database schema is at {current}, newer than this code's {head}: "
                "run a gemma-jobs release at least as new as the database's migrations")
    return f"database schema is at {current or 'nothing'}, the code needs {head}: run `gemma-jobs migrate`"


def normalize_url(url: str) -> str:
    """Pick our drivers: psycopg 3 for PostgreSQL."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def make_folder(folder: Path, what: str) -> None:
    """Create a folder the settings name, or raise SettingsError saying which and why (a
    read-only or full disk was a traceback)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SettingsError(f"cannot create {what} {folder}: {exc.strerror or exc}") from None


def make_engine(url: str, *, ping_idle_after_s: float | None = None) -> Engine:
    """Create an engine; SQLite gets WAL, a busy timeout and foreign keys.

    A server database's connections are pinged at every checkout, or with `ping_idle_after_s`
    only after sitting idle that long (see `_ping_when_idle`).
    """
    url = normalize_url(url)
    if url.startswith("sqlite"):
        database = make_url(url).database
        if database and database != ":memory:":
            make_folder(Path(database).parent, "the SQLite database's folder (DATABASE_URL or GEMMA_JOBS_DATA_DIR)")
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
        event.listen(engine, "connect", _configure_sqlite)
        event.listen(engine, "begin", _begin_sqlite)
        return engine
    # A host that is gone (no refusal) held each new connection for the kernel's ~127 s of SYN
    # retries. In the URL, so that direct connections (`DirectConnections`) have it too; one the
    # URL gives wins.
    parsed = make_url(url)
    if "connect_timeout" not in parsed.query:
        parsed = parsed.update_query_dict({"connect_timeout": str(CONNECT_TIMEOUT_S)})
    engine = create_engine(parsed, pool_pre_ping=ping_idle_after_s is None, pool_size=10, max_overflow=20)
    if ping_idle_after_s is not None:
        _ping_when_idle(engine, ping_idle_after_s)
    return engine


def _ping_when_idle(engine: Engine, idle_s: float) -> None:
    """Ping a pooled connection at checkout only if it was idle for more than `idle_s`.

    A ping is a round trip: at every checkout it costs a busy server (the gateway) as much as
    the query it guards. A connection in use a moment ago is alive as far as a ping can tell;
    one idle for longer (a database restart) is pinged, and replaced if dead.
    """

    @event.listens_for(engine, "checkin")
    def mark_idle(_dbapi_connection, record) -> None:
        if record is not None:
            record.info[_CHECKED_IN_AT] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def ping_if_idle(dbapi_connection, record, _proxy) -> None:
        # `info` is emptied on reconnect: a fresh connection needs no ping.
        checked_in_at = record.info.get(_CHECKED_IN_AT)
        if checked_in_at is None or time.monotonic() - checked_in_at <= idle_s:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:
            if engine.dialect.is_disconnect(exc, dbapi_connection, None):
                raise DisconnectionError(str(exc)) from exc  # the pool connects anew and retries
            raise


_CHECKED_IN_AT = "gemma_jobs_checked_in_at"
# For busy processes (the gateway, workers): pooled connections used within this long are not
# pinged at checkout.
PING_IDLE_AFTER_S = 1.0


def _configure_sqlite(dbapi_connection, _record) -> None:
    dbapi_connection.isolation_level = None  # we issue BEGIN in the "begin" event
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _begin_sqlite(connection) -> None:
    # A deferred BEGIN that reads and then writes fails at once with "database is locked"
    # when another process wrote in between (SQLite cannot wait: it would deadlock). A
    # transaction that may write takes the write lock up front, and so waits its turn.
    read_only = connection.get_execution_options().get(READ_ONLY_OPTION, False)
    connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


READ_ONLY_OPTION = "gemma_jobs_read_only"


class CompiledSelect:
    """A SELECT (or a statement with RETURNING) compiled once for one engine, run on a DBAPI
    cursor; rows are named tuples.

    For the hottest statements: SQLAlchemy's per-execution work (cache key, execution context,
    result metadata) costs more than the statement itself, and a multi-row INSERT has no cache
    key at all (SQLAlchemy would compile it anew each time). What is kept is the types'
    processing of parameters and of values (e.g. UTC datetimes, JSON on SQLite).
    """

    def __init__(self, engine: Engine, statement: Executable):
        self.dialect = engine.dialect
        compiled = statement.compile(dialect=self.dialect)
        if any(bind.expanding for bind in compiled.binds.values()):
            raise ValueError("expanding (IN) parameters need SQLAlchemy's execution")
        self.sql = compiled.string
        self._defaults = {name: bind.effective_value for name, bind in compiled.binds.items() if not bind.required}
        self._order = compiled.positiontup if compiled.positional else None
        self._bind_processors = {
            name: process for name, bind in compiled.binds.items()
            if (process := bind.type.dialect_impl(self.dialect).bind_processor(self.dialect)) is not None
        }
        columns = list(statement.exported_columns)
        self._types = [column.type for column in columns]
        self._row = namedtuple("Row", [column.key or f"column_{index}" for index, column in enumerate(columns)])
        # Some processors depend on the column type the driver reports: set on the first run.
        self._result_processors: Sequence | None = None

    def first(self, cursor, params: dict[str, Any]) -> tuple | None:
        """Run with these parameters (the rest keep their built-in values); return the first row."""
        self._execute(cursor, params)
        return self.first_row(cursor)

    def first_row(self, cursor) -> tuple | None:
        """Return the first row of the cursor's last run (in a pipeline: once its results came)."""
        row = cursor.fetchone()
        return None if row is None else self._converted(row, cursor)

    def all(self, cursor, params: dict[str, Any]) -> list[tuple]:
        """Run with these parameters; return every row."""
        self._execute(cursor, params)
        return [self._converted(row, cursor) for row in cursor.fetchall()]

    def _execute(self, cursor, params: dict[str, Any]) -> None:
        values = {**self._defaults, **params}
        for name, process in self._bind_processors.items():
            values[name] = process(values[name])
        cursor.execute(self.sql, values if self._order is None else [values[name] for name in self._order])

    def _converted(self, row, cursor) -> tuple:
        processors = self._result_processors or self._processors_for(cursor.description)
        return self._row(*(value if process is None else process(value) for value, process in zip(row, processors)))

    def _processors_for(self, description) -> Sequence:
        processors = [
            type_.dialect_impl(self.dialect).result_processor(self.dialect, column[1])
            for type_, column in zip(self._types, description)
        ]
        self._result_processors = processors
        return processors


class Database:
    """One engine and its session factory, created once per process (after any fork)."""

    def __init__(self, url: str, *, ping_idle_after_s: float | None = None):
        self.url = url
        self.engine = make_engine(url, ping_idle_after_s=ping_idle_after_s)
        # `first`'s connections on PostgreSQL: each connects only when first used, and the second
        # for `first(..., durable=False)` only.
        if self.engine.dialect.name == "postgresql":
            # As the engine's own pool: without `ping_idle_after_s`, ping at every use.
            ping_s = 0.0 if ping_idle_after_s is None else ping_idle_after_s
            self._direct = DirectConnections(self.engine, ping_idle_after_s=ping_s)
            self._direct_lazy_commit = DirectConnections(
                self.engine, options="-c synchronous_commit=off", ping_idle_after_s=ping_s)
        else:
            self._direct = self._direct_lazy_commit = None
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        read_engine = self.engine.execution_options(**{READ_ONLY_OPTION: True})
        self._read_sessions = sessionmaker(read_engine, expire_on_commit=False)
        # On PostgreSQL a read, or a block whose one write is a single statement, needs no BEGIN
        # and COMMIT round trips: each statement is its own transaction. SQLite keeps its BEGIN
        # (local, and the write lock must be taken up front).
        self._reads = self._autocommit(read_engine)
        self._statement_sessions = sessionmaker(self._autocommit(self.engine), expire_on_commit=False)
        self._compiled: dict[Executable, CompiledSelect] = {}

    def _autocommit(self, engine: Engine) -> Engine:
        if self.engine.dialect.name == "sqlite":
            return engine
        return engine.execution_options(isolation_level="AUTOCOMMIT")

    @contextmanager
    def session_scope(self, *, read_only: bool = False, per_statement: bool = False) -> Iterator[Session]:
        """Yield a session that commits at the end of the block, or rolls back on error.

        `read_only` sessions do not take SQLite's write lock (they may not write).
        `per_statement` sessions commit each statement on its own on PostgreSQL: only for a
        block whose writes are one statement (nothing to roll back together).
        """
        factory = self._read_sessions if read_only else self._statement_sessions if per_statement else self._sessions
        session = factory()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    @contextmanager
    def read_connection(self) -> Iterator[Connection]:
        """Yield a Core connection for reads: cheaper than a session, one snapshot per statement."""
        with self._reads.connect() as connection:
            yield connection

    def first(
        self, statement: Executable, params: dict[str, Any], *, durable: bool = True, within: Connection | None = None
    ) -> tuple | None:
        """Return the first row of a prebuilt SELECT, or INSERT … RETURNING (a module constant or
        otherwise kept: it is compiled once), run on a pooled connection outside any transaction.

        On PostgreSQL the statement may write (data-modifying CTEs): it commits by itself (on
        SQLite a single statement outside a transaction commits by itself too). `durable=False`
        lets that commit return before its WAL is on disk: for a write that a database crash may
        lose without harm (it is visible to everyone at once all the same, and any later durable
        commit flushes it too). `within`: run in that connection's transaction instead.
        """
        return self._run(statement, params, CompiledSelect.first, durable, within)

    def all(self, statement: Executable, params: dict[str, Any]) -> list[tuple]:
        """Return every row of a prebuilt SELECT, run as `first` runs it (outside any transaction)."""
        return self._run(statement, params, CompiledSelect.all, True, None)

    def first_each(self, statement: Executable, params: Sequence[dict[str, Any]]) -> list[tuple | None]:
        """Run a prebuilt statement (as `first` runs it) once per parameter set, all in one
        transaction: the first row of each run, one durable commit for all of them.

        On PostgreSQL the runs go out in one pipeline that ends with one Sync: one round trip,
        and (the connection being in autocommit) one implicit transaction, committed at the Sync
        if every run succeeded and rolled back if any failed. A failure raises, as `first` does.
        """
        compiled = self._compiled_for(statement)
        try:
            with self._statement_connection(True) as connection:
                if self._direct is None:  # SQLite: a local file, no round trips to save
                    return self._each_in_transaction(connection, compiled, params)
                cursors = [connection.cursor() for _ in params]
                try:
                    with connection.pipeline():
                        for cursor, values in zip(cursors, params):
                            compiled._execute(cursor, values)
                    return [compiled.first_row(cursor) for cursor in cursors]  # all arrived at the Sync
                finally:
                    for cursor in cursors:
                        cursor.close()
        except self.engine.dialect.loaded_dbapi.Error as exc:
            raise DBAPIError.instance(compiled.sql, None, exc, self.engine.dialect.loaded_dbapi.Error,
                                      dialect=self.engine.dialect) from exc

    @staticmethod
    def _each_in_transaction(connection, compiled: CompiledSelect, params: Sequence[dict[str, Any]]) -> list:
        """Run `first_each`'s statements one by one on a DBAPI connection, in one transaction."""
        cursor = connection.cursor()
        try:
            cursor.execute("BEGIN IMMEDIATE")
            rows = [compiled.first(cursor, values) for values in params]
            cursor.execute("COMMIT")
            return rows
        except BaseException:
            connection.rollback()
            raise
        finally:
            cursor.close()

    def _compiled_for(self, statement: Executable) -> CompiledSelect:
        compiled = self._compiled.get(statement)
        if compiled is None:
            compiled = self._compiled[statement] = CompiledSelect(self.engine, statement)
        return compiled

    def _run(self, statement: Executable, params: dict[str, Any], fetch, durable: bool, within: Connection | None):
        compiled = self._compiled_for(statement)
        try:
            if within is not None:
                return self._fetch_on(within.connection.dbapi_connection, compiled, fetch, params)
            with self._statement_connection(durable) as connection:
                return self._fetch_on(connection, compiled, fetch, params)
        except self.engine.dialect.loaded_dbapi.Error as exc:
            # As SQLAlchemy raises it (IntegrityError, OperationalError, …), so callers catch one kind.
            raise DBAPIError.instance(compiled.sql, params, exc, self.engine.dialect.loaded_dbapi.Error,
                                      dialect=self.engine.dialect) from exc

    @staticmethod
    def _fetch_on(connection, compiled: CompiledSelect, fetch, params: dict[str, Any]):
        cursor = connection.cursor()
        try:
            return fetch(compiled, cursor, params)
        finally:
            cursor.close()

    def _statement_connection(self, durable: bool):
        """Return a context lending a DBAPI connection outside any transaction (PostgreSQL: in autocommit)."""
        if self._direct is not None:
            return (self._direct if durable else self._direct_lazy_commit).connection()
        return self._pooled_connection()

    @contextmanager
    def _pooled_connection(self):
        """Yield a DBAPI connection of the engine's pool (SQLite: each statement commits by itself)."""
        connection = self.engine.raw_connection()
        try:
            yield connection
        finally:
            connection.close()

    def check_schema(self) -> None:
        """Refuse to run against a schema behind the migrations' head (a newer one is logged once);
        then set this process's clock on the server's (every process checks it as it starts)."""
        current = self.schema_revision()
        if schema_is_newer(current):
            # A newer release migrated it, and its migrations only add (docs/operations.md):
            # this code runs on, so that a rolling upgrade keeps the old processes serving.
            if current not in _newer_schemas_seen:
                _newer_schemas_seen.add(current)
                log.warning("schema_newer_than_code", database=current, code=SCHEMA_HEAD)
        elif current != SCHEMA_HEAD:
            raise SchemaOutOfDate(schema_mismatch(current))
        self.sync_clock()

    def sync_clock(self) -> timedelta | None:
        """Measure how far PostgreSQL's clock is ahead of this host's, and have `utcnow()` add it
        from now on (shared/clock.py); return it. SQLite: None, nothing to do."""
        if self.engine.dialect.name != "postgresql":
            return None
        with self.engine.connect() as connection:
            # As seconds since the epoch: a timestamp's text depends on the server's DateStyle.
            lead, round_trip = clock.measure_offset(lambda: datetime.fromtimestamp(float(
                connection.exec_driver_sql("SELECT extract(epoch FROM clock_timestamp())").scalar_one()), timezone.utc))
        moved = abs((lead - clock.offset()).total_seconds())
        clock.set_offset(lead)
        if abs(lead.total_seconds()) >= CLOCK_WARN_S and moved >= CLOCK_WARN_S / 2:
            log.warning("clock_skew", database_clock_ahead_s=round(lead.total_seconds(), 3),
                        round_trip_ms=round(round_trip.total_seconds() * 1000, 2),
                        note="this process uses the database's clock; keep hosts on NTP")
        return lead

    def schema_revision(self) -> str | None:
        """Return the revision Alembic recorded in the database; None for an empty database."""
        # A read: on SQLite it must not queue for the write lock (a readiness probe waited out
        # every long write there).
        with self.read_connection() as connection:
            if not inspect(connection).has_table(VERSION_TABLE):
                return None
            rows = connection.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars().all()
        return ",".join(sorted(rows)) or None  # several rows: branches, never our head

    def dispose(self) -> None:
        """Close all pooled connections."""
        self.engine.dispose()
        if self._direct is not None:
            self._direct.dispose()
            self._direct_lazy_commit.dispose()
