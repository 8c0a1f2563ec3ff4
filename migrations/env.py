"""Alembic environment: runs migrations against the URL passed in by shared.migrate."""

import time

from alembic import context
from sqlalchemy import event

from shared.db import make_engine
from shared.models import Base
from shared.settings import get_settings

config = context.config
target_metadata = Base.metadata


def database_url() -> str:
    """Use the URL the caller passed, else the one from settings."""
    return config.attributes.get("database_url") or get_settings().database_url_or_default


def run_migrations_offline() -> None:
    """Emit SQL to stdout without a database connection."""
    context.configure(
        url=database_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        context.run_migrations()


# Any fixed number: every `gemma-jobs migrate` on a PostgreSQL database takes this lock first.
MIGRATION_LOCK_ID = 7_302_119_001


def run_migrations_online() -> None:
    """Run migrations on a live connection, one transaction per migration."""
    engine = make_engine(database_url())
    sqlite = engine.dialect.name == "sqlite"
    if sqlite:
        # Batch mode rebuilds a table (copy, DROP, rename) to drop a column; with foreign keys on,
        # the DROP deletes its rows first, cascading to (or failing on) the rows that refer to them.
        event.listen(engine, "connect", _foreign_keys_off)
    try:
        with engine.connect() as connection:
            if not sqlite:
                # Two migrates at once (init containers of several replicas): the second waits
                # here, then finds the work done; it crashed on the version table before.
                _take_migration_lock(connection)
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                render_as_batch=True,  # SQLite needs batch mode to alter tables
                transaction_per_migration=True,
            )
            with context.begin_transaction():
                context.run_migrations()
            if sqlite:
                _check_foreign_keys(connection)
    finally:
        engine.dispose()  # closing the connection releases the advisory lock


# Pause between tries of the migration lock while another migrate holds it.
LOCK_RETRY_S = 0.2


def _take_migration_lock(connection) -> None:
    """Take the session's migration lock, trying again between pauses spent outside any transaction.

    A session waiting inside pg_advisory_lock holds a snapshot, and a concurrent index build
    (migrations.online_index) waits for every older snapshot: the holder's build and the
    waiter's lock waited on each other, and PostgreSQL ended them as a deadlock.
    """
    while not connection.exec_driver_sql(f"SELECT pg_try_advisory_lock({MIGRATION_LOCK_ID})").scalar():
        connection.commit()
        time.sleep(LOCK_RETRY_S)
    connection.commit()  # the lock is the session's; each migration has its own transaction


def _foreign_keys_off(dbapi_connection, _record) -> None:
    dbapi_connection.execute("PRAGMA foreign_keys=OFF")


def _check_foreign_keys(connection) -> None:
    """Fail loudly if the migrations left a row pointing at nothing (checks were off meanwhile)."""
    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
    connection.rollback()
    if broken:
        raise RuntimeError(f"the migrations left rows whose foreign keys point at nothing: {broken[:5]}")


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
