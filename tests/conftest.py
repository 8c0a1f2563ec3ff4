"""Fixtures on real services: Redis, PostgreSQL and SQLite files, and real processes.

Under CI=true a missing Redis or PostgreSQL fails the run; elsewhere those tests skip.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import psycopg
import pytest
import redis

from shared.migrate import upgrade
from shared.registry import DEFAULT_MODEL_ID, ModelRegistry
from shared.settings import Settings, load_settings

REDIS_BASE_URL = os.environ.get("GEMMA_JOBS_TEST_REDIS", "redis://127.0.0.1:6379")
# A db number of its own, flushed before each test that uses it.
REDIS_DB = int(os.environ.get("GEMMA_JOBS_TEST_REDIS_DB", "13"))
POSTGRES_ADMIN_URL = os.environ.get(
    "GEMMA_JOBS_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_service(name: str, reason: str) -> None:
    """Fail under CI, skip elsewhere: CI must never pass by skipping what it needs."""
    message = f"{name} is not reachable: {reason}"
    if IN_CI:
        pytest.fail(message + " (CI=true: a missing service is a failure)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def redis_url() -> str:
    """URL of the real Redis, on the test db number."""
    url = f"{REDIS_BASE_URL}/{REDIS_DB}"
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        require_service("Redis", f"{url}: {exc}")
    return url


@pytest.fixture()
def redis_client(redis_url: str) -> redis.Redis:
    """A client on an emptied test db."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    return client


@pytest.fixture(scope="session")
def postgres_admin_url() -> str:
    """URL of the real PostgreSQL server's maintenance database."""
    try:
        with psycopg.connect(POSTGRES_ADMIN_URL, connect_timeout=3):
            pass
    except psycopg.Error as exc:
        require_service("PostgreSQL", f"{POSTGRES_ADMIN_URL}: {exc}")
    return POSTGRES_ADMIN_URL


def fresh_postgres_database(admin_url: str) -> tuple[str, callable]:
    """Create an empty database; return its URL and a function that drops it."""
    name = f"gemma_jobs_test_{secrets.token_hex(6)}"
    with psycopg.connect(admin_url, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    url = admin_url.rsplit("/", 1)[0] + f"/{name}"

    def drop() -> None:
        with psycopg.connect(admin_url, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return url, drop


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database_url(request, tmp_path: Path) -> str:
    """An empty database on each backend: a SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'gemma-jobs.db'}"
        return
    url, drop = fresh_postgres_database(request.getfixturevalue("postgres_admin_url"))
    yield url
    drop()


@pytest.fixture()
def database_url(empty_database_url: str) -> str:
    """A database on each backend, migrated to head."""
    upgrade(empty_database_url)
    return empty_database_url


@pytest.fixture()
def settings(database_url: str, redis_url: str, tmp_path: Path) -> Settings:
    """Settings pointing at the test database and Redis."""
    return load_settings(
        database_url=database_url,
        redis_url=redis_url,
        data_dir=tmp_path / "var",
        log_format="console",
        max_wait_s=5,
    )


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory) -> Path:
    """Converted weights, shared by every process of the session (converted once, ~60 s).

    GEMMA_JOBS_TEST_MODEL_CACHE reuses a cache between local runs; CI converts afresh.
    """
    from workers.model_loader import weights_dir

    configured = os.environ.get("GEMMA_JOBS_TEST_MODEL_CACHE")
    cache = Path(configured) if configured else tmp_path_factory.mktemp("models")
    weights_dir(ModelRegistry.load(None).get(DEFAULT_MODEL_ID), cache)
    return cache
