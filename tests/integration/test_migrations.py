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
        for status in ("succeeded", "succeeded", "failed", "queued"):
            session.execute(insert(jobs).values(
                id=new_id("job"), owner_key_id=key.id, kind="generation", model="gemma-3-270m",
                queue="generation.gemma-3-270m", status=status, params={"prompt": "x"}, attempts=0,
                created_at=utcnow(), reserved_tokens=0,
            ))
    upgrade(database_url)
    with db.session_scope() as session:
        assert job_store.ended_counts(session) == [
            ("generation", "gemma-3-270m", "failed", 1),
            ("generation", "gemma-3-270m", "succeeded", 2),
        ]
    db.dispose()
