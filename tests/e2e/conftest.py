"""Fixtures that run the real stack: converted model weights, gateway and worker processes."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from services.domain.keys import create_key
from shared.db import Database
from shared.migrate import upgrade
from shared.registry import DEFAULT_MODEL_ID
from tests.conftest import fresh_postgres_database
from tests.processes import Service, start_gateway, start_worker


@pytest.fixture(scope="session")
def registry_file(model_cache_dir: Path, tmp_path_factory) -> Path:
    """Extra registry entries: the same weights by local path with a tiny context, and a broken model."""
    path = tmp_path_factory.mktemp("registry") / "models.json"
    path.write_text(
        json.dumps(
            {
                "models": [
                    {"id": "gemma-3-270m-short", "path": str(model_cache_dir / DEFAULT_MODEL_ID), "context_length": 64},
                    {"id": "broken-model", "path": "/nonexistent/gemma"},
                ]
            }
        )
    )
    return path


@dataclass
class RunningStack:
    """A gateway and a worker on one database backend."""

    backend: str
    database_url: str
    base_url: str
    gateway: Service
    worker: Service
    env: dict[str, str]

    def new_key(self, role: str = "user") -> dict[str, str]:
        db = Database(self.database_url)
        with db.session_scope() as session:
            _, plaintext = create_key(session, role=role)
        db.dispose()
        return {"Authorization": f"Bearer {plaintext}"}


def stack_env(database_url: str, redis_url: str, data_dir: Path, model_cache: Path, registry: Path) -> dict[str, str]:
    return {
        **os.environ,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "GEMMA_JOBS_DATA_DIR": str(data_dir),
        "GEMMA_JOBS_MODEL_CACHE_DIR": str(model_cache),
        "GEMMA_JOBS_MODEL_REGISTRY": str(registry),
        "GEMMA_JOBS_MAX_WAIT_S": "60",
    }


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def stack(request, redis_url, model_cache_dir, registry_file, tmp_path_factory) -> RunningStack:
    """Real gateway and worker processes against real Redis and a fresh database."""
    workdir = tmp_path_factory.mktemp(f"stack-{request.param}")
    drop = None
    if request.param == "sqlite":
        database_url = f"sqlite:///{workdir / 'gemma-jobs.db'}"
    else:
        database_url, drop = fresh_postgres_database(request.getfixturevalue("postgres_admin_url"))
    upgrade(database_url)
    redis.Redis.from_url(redis_url).flushdb()
    env = stack_env(database_url, redis_url, workdir / "var", model_cache_dir, registry_file)
    gateway, base_url = start_gateway(env, workdir)
    # The PostgreSQL stack batches (threads pool, batch engine) in bf16, so the same
    # reference outputs hold for both; test_batching.py covers fp32 batches.
    batching = ["--concurrency", "4"] if request.param == "postgresql" else []
    worker = start_worker(
        {**env, "GEMMA_JOBS_CPU_DTYPE": "bfloat16"},
        workdir,
        "gemma-3-270m,gemma-3-270m-short,broken-model",
        "worker",
        "all",
        *batching,
    )
    yield RunningStack(request.param, database_url, base_url, gateway, worker, env)
    worker.stop()
    gateway.stop()
    if drop:
        drop()
