"""Settings: defaults, and a bad value fails at start naming its variable."""

from __future__ import annotations

import subprocess
import sys

import pytest

from shared.settings import SettingsError, load_settings


def test_defaults_put_sqlite_under_the_data_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("GEMMA_JOBS_DATA_DIR", str(tmp_path))
    settings = load_settings()
    assert settings.database_url_or_default == f"sqlite:///{tmp_path / 'gemma-jobs.db'}"
    assert settings.model_cache_path == tmp_path / "models"


@pytest.mark.parametrize("name", ["q?mark", "pct%20dir", "sp ace ü", "h#sh"])
def test_the_default_sqlite_file_is_under_the_data_dir_whatever_its_name(monkeypatch, tmp_path, name):
    """A data dir named with "?" put the database in its parent, one with "%20" in "… dir"."""
    from sqlalchemy.engine import make_url

    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("GEMMA_JOBS_DATA_DIR", str(tmp_path / name))
    url = load_settings().database_url_or_default
    assert make_url(url).database == str(tmp_path / name / "gemma-jobs.db")


def test_a_database_where_earlier_releases_put_it_is_named_not_left_behind(monkeypatch, tmp_path):
    """Before the default URL was escaped, a data dir named "my%20data" kept its file in "my data":
    an upgrade silently started on a new, empty file."""
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("GEMMA_JOBS_DATA_DIR", str(tmp_path / "my%20data"))
    (tmp_path / "my data").mkdir()
    (tmp_path / "my data" / "gemma-jobs.db").write_bytes(b"")
    with pytest.raises(SettingsError, match="the database is at .*my data/gemma-jobs.db") as raised:
        load_settings().database_url_or_default
    from sqlalchemy.engine import make_url

    told = str(raised.value).rsplit("set DATABASE_URL to ", 1)[1]
    assert make_url(told).database == str(tmp_path / "my data" / "gemma-jobs.db")
    monkeypatch.setenv("DATABASE_URL", told)
    assert load_settings().database_url_or_default == told


def test_supported_database_and_redis_urls_are_taken(monkeypatch):
    for database_url in ("postgresql://h/db", "postgres://h/db", "postgresql+psycopg://u@h:5432/db", "sqlite:///x.db"):
        monkeypatch.setenv("DATABASE_URL", database_url)
        assert load_settings().database_url == database_url
    for redis_url in ("redis://h:6379/0", "rediss://u:p@h/1"):
        monkeypatch.setenv("REDIS_URL", redis_url)
        assert load_settings().redis_url == redis_url


def test_environment_names_are_read(monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "postgresql://db.example/jobs")
    monkeypatch.setenv("REDIS_URL", "redis://cache.example:6379/2")
    monkeypatch.setenv("GEMMA_JOBS_MAX_WAIT_S", "12.5")
    settings = load_settings()
    assert settings.database_url == "postgresql://db.example/jobs"
    assert settings.redis_url == "redis://cache.example:6379/2"
    assert settings.max_wait_s == 12.5


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("GEMMA_JOBS_MAX_WAIT_S", "soon"),
        ("GEMMA_JOBS_MAX_NEW_TOKENS", "0"),
        ("DATABASE_URL", "not a url"),
        # Each passed, then failed at the first connection with a traceback.
        ("DATABASE_URL", "mysql://user@host/db"),
        ("DATABASE_URL", "postgresql+asyncpg://host/db"),
        ("DATABASE_URL", "postgresql://user@host:abc/db"),
        ("DATABASE_URL", "http://host/db"),
        ("REDIS_URL", "localhost"),
        ("REDIS_URL", "http://foo"),
        ("REDIS_URL", "redis://host:abc/0"),
        ("REDIS_URL", "unix:///run/redis.sock"),  # the client takes it, Celery's transport does not
        ("DATABASE_URL", "postgresql://user@host:99999/db"),
        ("GEMMA_JOBS_LOG_FORMAT", "xml"),
    ],
)
def test_bad_values_name_the_variable(monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match=variable):
        load_settings()


@pytest.mark.parametrize(
    ("variables", "named"),
    [
        ({"GEMMA_JOBS_WORKER_DEAD_AFTER_S": "inf"}, "GEMMA_JOBS_WORKER_DEAD_AFTER_S"),
        ({"GEMMA_JOBS_REPUBLISH_AFTER_S": "1e309"}, "GEMMA_JOBS_REPUBLISH_AFTER_S"),
        ({"GEMMA_JOBS_MAX_TIMEOUT_S": "300"}, "DEFAULT_TIMEOUT_S (600) must be at most GEMMA_JOBS_MAX_TIMEOUT_S"),
        ({"GEMMA_JOBS_MAX_NEW_TOKENS": "100"}, "GEMMA_JOBS_DEFAULT_MAX_NEW_TOKENS (256) must be at most"),
        ({"GEMMA_JOBS_WORKER_HEARTBEAT_S": "30"}, "must be below GEMMA_JOBS_WORKER_DEAD_AFTER_S (30)"),
    ],
)
def test_values_that_break_later_are_refused_at_start(monkeypatch, variables, named):
    """Each was accepted, then made every submit a 422, workers flap dead and alive, or 500s."""
    for variable, value in variables.items():
        monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as raised:
        load_settings()
    assert named in str(raised.value)


def test_cli_exits_2_with_the_variable_named(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "migrate"],
        env={"PATH": "/usr/bin:/bin", "GEMMA_JOBS_MAX_BODY_BYTES": "tiny", "GEMMA_JOBS_DATA_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "GEMMA_JOBS_MAX_BODY_BYTES" in result.stderr
