"""Fixtures that run the real stack: converted model weights, gateway and worker processes."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
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
    """Extra registry entries: the same weights by local path with a tiny context, a model that
    is not there, and one whose weights file is cut short."""
    folder = tmp_path_factory.mktemp("registry")
    corrupt = folder / "corrupt-gemma"
    corrupt.mkdir()
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        (corrupt / name).symlink_to(model_cache_dir / DEFAULT_MODEL_ID / name)
    with open(model_cache_dir / DEFAULT_MODEL_ID / "model.safetensors", "rb") as weights:
        (corrupt / "model.safetensors").write_bytes(weights.read(1 << 20))
    path = folder / "models.json"
    path.write_text(
        json.dumps(
            {
                "models": [
                    {"id": "gemma-3-270m-short", "path": str(model_cache_dir / DEFAULT_MODEL_ID), "context_length": 64},
                    {"id": "broken-model", "path": "/nonexistent/gemma"},
                    {"id": "corrupt-model", "path": str(corrupt)},
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


@dataclass
class StartedStack:
    """A gateway on a fresh, migrated database, and the workers started against it."""

    env: dict[str, str]
    database_url: str
    base_url: str
    gateway: Service
    workdir: Path
    db: Database
    workers: list[Service] = field(default_factory=list)

    def start_worker(
        self,
        models: str,
        *flags: str,
        name: str | None = None,
        role: str = "all",
        env_overrides: dict[str, str] | None = None,
    ) -> Service:
        """Start a worker on the stack's env plus `env_overrides`; it is stopped with the stack."""
        name = name or f"worker-{len(self.workers) + 1}"
        worker = start_worker({**self.env, **(env_overrides or {})}, self.workdir, models, name, role, *flags)
        self.workers.append(worker)
        return worker

    def stop_workers(self, stop_signal: int) -> None:
        """Stop every worker still listed in `workers`."""
        for worker in self.workers:
            worker.stop(stop_signal)

    def new_key(self, role: str = "user") -> dict[str, str]:
        """Create an API key; return its Authorization header."""
        with self.db.session_scope() as session:
            _, plaintext = create_key(session, role=role)
        return {"Authorization": f"Bearer {plaintext}"}


StartStack = Callable[..., AbstractContextManager[StartedStack]]


@pytest.fixture(scope="session")
def start_stack(redis_url, model_cache_dir, registry_file) -> StartStack:
    """Return a context manager that starts a gateway on a fresh database and tears it all down."""

    @contextmanager
    def started_stack(
        workdir: Path,
        postgres_admin_url: str | None = None,
        env_overrides: dict[str, str] | None = None,
        stop_workers_with: int = signal.SIGTERM,
    ) -> Iterator[StartedStack]:
        """Migrate a new PostgreSQL database (a SQLite file without an admin URL), flush Redis, start a gateway."""
        with ExitStack() as teardown:
            if postgres_admin_url is None:
                database_url = f"sqlite:///{workdir / 'gemma-jobs.db'}"
            else:
                database_url, drop_database = fresh_postgres_database(postgres_admin_url)
                teardown.callback(drop_database)
            upgrade(database_url)
            redis.Redis.from_url(redis_url).flushdb()
            env = stack_env(database_url, redis_url, workdir / "var", model_cache_dir, registry_file)
            env.update(env_overrides or {})
            db = Database(database_url)
            teardown.callback(db.dispose)
            gateway, base_url = start_gateway(env, workdir)
            teardown.callback(gateway.stop)
            started = StartedStack(env, database_url, base_url, gateway, workdir, db)
            teardown.callback(started.stop_workers, stop_workers_with)
            yield started

    return started_stack


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def stack(request, start_stack: StartStack, tmp_path_factory) -> RunningStack:
    """Real gateway and worker processes against real Redis and a fresh database."""
    workdir = tmp_path_factory.mktemp(f"stack-{request.param}")
    postgres_admin_url = request.getfixturevalue("postgres_admin_url") if request.param == "postgresql" else None
    with start_stack(workdir, postgres_admin_url) as started:
        # The PostgreSQL stack batches (threads pool, batch engine) in bf16, so the same
        # reference outputs hold for both; test_batching.py covers fp32 batches.
        batching = ["--concurrency", "4"] if request.param == "postgresql" else []
        worker = started.start_worker(
            "gemma-3-270m,gemma-3-270m-short,broken-model",
            *batching,
            name="worker",
            env_overrides={"GEMMA_JOBS_CPU_DTYPE": "bfloat16"},
        )
        yield RunningStack(request.param, started.database_url, started.base_url, started.gateway, worker, started.env)
