"""Migrations are the schema, on SQLite and PostgreSQL; stale schemas are refused."""

from __future__ import annotations

import subprocess
import sys

import pytest
from sqlalchemy import inspect

from services.gateway import create_app
from shared.db import SCHEMA_HEAD, Database, SchemaOutOfDate
from shared.migrate import downgrade, head_revision, upgrade
from shared.models import Base
from shared.settings import load_settings


def test_upgrade_creates_every_model_table(database_url):
    db = Database(database_url)
    tables = set(inspect(db.engine).get_table_names())
    assert set(Base.metadata.tables) <= tables
    db.check_schema()
    db.dispose()


def test_down_to_base_and_up_again(database_url):
    downgrade(database_url, "base")
    db = Database(database_url)
    assert set(inspect(db.engine).get_table_names()) <= {"alembic_version"}
    db.dispose()
    upgrade(database_url)
    Database(database_url).check_schema()


def test_the_recorded_head_is_alembics():
    """The check at start-up compares with SCHEMA_HEAD: a new migration must move it."""
    assert SCHEMA_HEAD == head_revision()


def test_a_schema_one_migration_behind_is_refused(database_url):
    downgrade(database_url, "-1")
    db = Database(database_url)
    previous = db.schema_revision()
    assert previous is not None and previous != SCHEMA_HEAD
    with pytest.raises(SchemaOutOfDate, match=f"at {previous}, the code needs {SCHEMA_HEAD}"):
        db.check_schema()
    upgrade(database_url)
    db.check_schema()
    db.dispose()


def test_models_match_the_migrations(database_url):
    """Autogenerate finds nothing to do: the models and the migrations agree."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    db = Database(database_url)
    with db.engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    db.dispose()
    assert diff == []


def test_the_gateway_refuses_an_unmigrated_database(empty_database_url, redis_url, tmp_path):
    settings = load_settings(database_url=empty_database_url, redis_url=redis_url, data_dir=tmp_path)
    with pytest.raises(SchemaOutOfDate, match="gemma-jobs migrate"):
        create_app(settings)
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "gateway", "--port", "0"],
        env={"PATH": "/usr/bin:/bin", "DATABASE_URL": empty_database_url, "REDIS_URL": redis_url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "run `gemma-jobs migrate`" in result.stderr
    assert head_revision() in result.stderr


def test_migrate_command_brings_the_schema_to_head(empty_database_url):
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "migrate"],
        env={"PATH": "/usr/bin:/bin", "DATABASE_URL": empty_database_url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    Database(empty_database_url).check_schema()


def test_sqlite_runs_in_wal_mode_with_a_busy_timeout(tmp_path):
    url = f"sqlite:///{tmp_path / 'wal.db'}"
    upgrade(url)
    db = Database(url)
    with db.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    db.dispose()


def test_the_schema_check_does_not_wait_for_sqlite_s_write_lock(tmp_path):
    """It took the write lock as a writer does: /readyz waited out every long write (5 s here),
    and past the 30 s busy timeout it would have answered 503."""
    import sqlite3
    import time

    url = f"sqlite:///{tmp_path / 'busy.db'}"
    upgrade(url)
    db = Database(url)
    writer = sqlite3.connect(tmp_path / "busy.db", isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        db.check_schema()
        assert time.monotonic() - started < 1.0
    finally:
        writer.execute("ROLLBACK")
        writer.close()
        db.dispose()


def test_0007_counts_the_jobs_that_ended_before_it(database_url):
    from sqlalchemy import JSON, column, insert, table

    from shared import job_store
    from shared.ids import new_id
    from services.domain.keys import create_key
    from shared.models import utcnow

    downgrade(database_url, "0006")
    db = Database(database_url)
    with db.session_scope() as session:
        key, _ = create_key(session, role="user")
        # The jobs table as 0006 has it: the model's later columns are not there yet.
        jobs = table("jobs", *(column(name) for name in (
            "id", "owner_key_id", "kind", "model", "queue", "status", "attempts", "created_at", "reserved_tokens")),
            column("params", JSON))
        # An adapter's generation names the adapter as its model; its queue, the base model's.
        for status, model in (("succeeded", "gemma-3-270m"), ("succeeded", "ft-a1"), ("failed", "gemma-3-270m"),
                              ("queued", "gemma-3-270m")):
            session.execute(insert(jobs).values(
                id=new_id("job"), owner_key_id=key.id, kind="generation", model=model,
                queue="generation.gemma-3-270m", status=status, params={"prompt": "x"}, attempts=0,
                created_at=utcnow(), reserved_tokens=0,
            ))
    upgrade(database_url, "0007")
    with db.session_scope() as session:
        # Under the base model, as jobs are counted live: no series per adapter on /metrics.
        assert job_store.ended_counts(session) == [
            ("generation", "gemma-3-270m", "failed", 1),
            ("generation", "gemma-3-270m", "succeeded", 2),
        ]
    db.dispose()


def test_0009_moves_counts_made_under_an_adapter_s_id_to_its_base_model(database_url):
    """0007 counted an adapter's ended jobs under the adapter's id (a label per adapter)."""
    from sqlalchemy import text

    from shared import job_store
    from tests.integration.helpers import queued_job

    downgrade(database_url, "0008")
    db = Database(database_url)
    job_id = queued_job(db)
    with db.session_scope() as session:
        session.execute(text("UPDATE jobs SET model = 'ft-a1', status = 'succeeded' WHERE id = :id"), {"id": job_id})
        session.execute(text("DELETE FROM job_outcome_counts"))
        session.execute(text(
            "INSERT INTO job_outcome_counts (kind, model, status, shard, jobs) VALUES "
            "('generation', 'gemma-3-270m', 'succeeded', 0, 5), ('generation', 'ft-a1', 'succeeded', 0, 2), "
            "('generation', 'ft-a1', 'failed', 3, 1), ('generation', 'ft-unknown', 'failed', 0, 4)"))
    upgrade(database_url)
    with db.session_scope() as session:
        assert job_store.ended_counts(session) == [
            ("generation", "ft-unknown", "failed", 4),  # no job names it: left as it was
            ("generation", "gemma-3-270m", "failed", 1),
            ("generation", "gemma-3-270m", "succeeded", 7),
        ]
    db.dispose()


def _job_with_event_and_charge(db: Database) -> str:
    """A finished job, its events and its usage row: rows that point at the jobs table."""
    from shared import job_store
    from tests.integration.helpers import RESULT, USAGE, claim, queued_job

    job_id = queued_job(db)
    held = claim(db, job_id, "worker-a")
    with db.session_scope() as session:
        assert job_store.finish(session, held, "worker-a", result=RESULT, usage=USAGE)
    return job_id


def _rows_of(db: Database, job_id: str) -> tuple[int, int]:
    from sqlalchemy import text

    with db.engine.connect() as connection:
        return tuple(connection.execute(text(f"SELECT count(*) FROM {name} WHERE job_id = :id"), {"id": job_id}).scalar()
                     for name in ("job_events", "usage_records"))


def test_downgrading_past_a_dropped_jobs_column_keeps_the_rows_that_point_at_jobs(database_url):
    """SQLite rebuilds a table to drop a column (copy, DROP, rename): with foreign keys on, the
    DROP deleted the job events first, or failed on the usage rows."""
    db = Database(database_url)
    job_id = _job_with_event_and_charge(db)
    before = _rows_of(db, job_id)
    assert before[0] >= 2 and before[1] == 1
    downgrade(database_url, "0001")  # every later revision's downgrade, the jobs columns included
    assert _rows_of(db, job_id) == before
    upgrade(database_url)
    assert _rows_of(db, job_id) == before
    db.dispose()


def test_two_migrates_at_once_take_turns(empty_database_url):
    """Init containers of several replicas: the second one crashed on Alembic's version table."""
    command = [sys.executable, "-m", "services.cli", "migrate"]
    env = {"PATH": "/usr/bin:/bin", "DATABASE_URL": empty_database_url}
    runs = [subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outcomes = [(run.wait(timeout=120), run.stderr.read()) for run in runs]
    assert all(code == 0 for code, _ in outcomes), outcomes
    Database(empty_database_url).check_schema()


def test_a_database_migrated_by_a_newer_release_is_used_and_not_migrated(database_url, redis_url, tmp_path):
    """A rolling upgrade migrates first: the older gateways and workers go on serving (readyz
    200), and the older `migrate` says why it stops instead of Alembic's traceback."""
    from sqlalchemy import text

    newer = f"{int(SCHEMA_HEAD) + 1:04d}"
    db = Database(database_url)
    with db.engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = :newer"), {"newer": newer})
    db.check_schema()  # runs on, with one warning
    client = create_app(load_settings(database_url=database_url, redis_url=redis_url, data_dir=tmp_path)).test_client()
    assert client.get("/readyz").status_code == 200
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "migrate"],
        env={"PATH": "/usr/bin:/bin", "DATABASE_URL": database_url}, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert f"at {newer}, newer than this code's {SCHEMA_HEAD}" in result.stderr and "Traceback" not in result.stderr
    with db.engine.connect() as connection:
        assert connection.execute(text("SELECT version_num FROM alembic_version")).scalar() == newer
    db.dispose()


def test_0002_gives_running_jobs_a_lease_lapsed_now_in_utc_whatever_the_session_time_zone(empty_database_url):
    """PostgreSQL's CURRENT_TIMESTAMP comes out in the session's time zone: in Tokyo the lease
    was 9 h ahead, and the reaper left the job alone that long."""
    from datetime import datetime, timedelta

    from sqlalchemy import text

    from shared.models import utcnow

    db = Database(empty_database_url)
    if db.engine.dialect.name == "postgresql":
        with db.engine.connect() as connection:
            name = connection.execute(text("SELECT current_database()")).scalar()
        with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(text(f'ALTER DATABASE "{name}" SET timezone TO \'Asia/Tokyo\''))
        db.dispose()
    upgrade(empty_database_url, "0001")
    with db.engine.begin() as connection:
        connection.execute(text(
            "INSERT INTO api_keys (id, key_hash, key_prefix, name, role, created_at) "
            "VALUES ('key_a', 'h', 'p', 'n', 'user', :now)"), {"now": utcnow().replace(tzinfo=None)})
        connection.execute(text(
            "INSERT INTO jobs (id, owner_key_id, kind, model, queue, status, params, created_at, attempts) "
            "VALUES ('job_a', 'key_a', 'generation', 'm', 'q', 'running', '{}', :now, 1)"),
            {"now": utcnow().replace(tzinfo=None)})
    upgrade(empty_database_url, "0002")
    with db.engine.connect() as connection:
        lease = connection.execute(text("SELECT lease_expires_at FROM jobs WHERE id = 'job_a'")).scalar()
    lease = datetime.fromisoformat(lease) if isinstance(lease, str) else lease  # SQLite: text
    assert abs(lease.replace(tzinfo=None) - utcnow().replace(tzinfo=None)) < timedelta(minutes=1)
    db.dispose()


def test_0006_builds_its_index_while_jobs_are_written(empty_database_url):
    """A plain CREATE INDEX waits for open transactions on jobs, and every write queues behind
    it: a migrate during traffic held all submits and claims for the whole build."""
    import threading

    import psycopg
    from sqlalchemy import text

    from shared.models import utcnow

    if not empty_database_url.startswith("postgresql"):
        pytest.skip("SQLite builds an index in a moment, under its single writer lock anyway")
    upgrade(empty_database_url, "0005")
    dsn = empty_database_url.replace("postgresql+psycopg://", "postgresql://")
    insert_job = ("INSERT INTO jobs (id, owner_key_id, kind, model, queue, status, params, created_at, attempts) "
                  "VALUES (%s, 'key_a', 'generation', 'm', 'q', 'queued', '{}', %s, 0)")
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute("INSERT INTO api_keys (id, key_hash, key_prefix, name, role, created_at) "
                           "VALUES ('key_a', 'h', 'p', 'n', 'user', now())")
    with psycopg.connect(dsn) as open_transaction, psycopg.connect(dsn) as writer:
        open_transaction.execute(insert_job, ("job_open", utcnow()))  # a submit in flight
        migrating = threading.Thread(target=upgrade, args=(empty_database_url, "0006"))
        migrating.start()
        try:
            _wait_for_index_build(open_transaction, dsn)
            writer.execute("SET lock_timeout = '3s'")
            writer.execute(insert_job, ("job_meanwhile", utcnow()))  # refused by the lock timeout before
            writer.commit()
        finally:
            open_transaction.commit()  # the build waits for it, then ends
            migrating.join(60)
    db = Database(empty_database_url)
    with db.engine.connect() as connection:
        assert connection.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0006"
        assert connection.execute(text(
            "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "WHERE c.relname = 'ix_jobs_owner_key_id_status_id'")).scalar() is True
        assert connection.execute(text("SELECT count(*) FROM jobs")).scalar() == 2
    db.dispose()


def _wait_for_index_build(connection, dsn: str) -> None:
    """Wait until a CREATE INDEX on this database is waiting for a lock or an older transaction."""
    import time

    import psycopg

    deadline = time.monotonic() + 30
    with psycopg.connect(dsn, autocommit=True) as watcher:
        while time.monotonic() < deadline:
            waiting = watcher.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND query ILIKE 'CREATE INDEX%%' AND wait_event_type = 'Lock'").fetchone()[0]
            if waiting:
                return
            time.sleep(0.05)
    raise AssertionError("the migration never started its index build")
