"""Per-process state of a worker, built once at start-up (after any fork)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import redis
import torch
from celery import Celery

from shared.celery_app import make_celery
from shared.db import Database
from shared.registry import ModelRegistry
from shared.settings import Settings
from shared.storage import Storage
from workers.adapter_cache import AdapterCache
from workers.model_cache import ModelCache


@dataclass
class WorkerRuntime:
    """The database, Redis, Celery app, model cache and identity of this worker process."""

    settings: Settings
    db: Database
    redis: redis.Redis
    celery: Celery
    models: ModelCache
    adapters: AdapterCache
    storage: Storage
    worker_id: str
    device: torch.device
    # Set (monotonic clock) when SIGTERM arrives: a running job may go on until then.
    shutdown_deadline: float | None = None
    # Reported by the heartbeat (solo pool: at most one job in flight).
    jobs_in_flight: int = 0
    jobs_done: int = 0

    @classmethod
    def create(cls, settings: Settings, device: torch.device) -> "WorkerRuntime":
        """Connect to the database and Redis and set up an empty model cache."""
        registry = ModelRegistry.load(settings.model_registry)
        return cls(
            settings=settings,
            db=Database(settings.database_url_or_default),
            # A timeout, so a half-open connection cannot wedge the worker or its reaper.
            redis=redis.Redis.from_url(settings.redis_url, socket_connect_timeout=3, socket_timeout=10),
            celery=make_celery(settings.redis_url, settings.visibility_timeout_s),
            models=ModelCache(registry, settings.model_cache_path, device),
            adapters=AdapterCache(settings.adapter_cache_size),
            storage=Storage(settings.storage_path),
            worker_id=f"{socket.gethostname()}:{os.getpid()}:{device}",
            device=device,
        )


_runtime: WorkerRuntime | None = None


def set_runtime(runtime: WorkerRuntime) -> None:
    """Install this process's runtime; tasks read it with `runtime()`."""
    global _runtime
    _runtime = runtime


def runtime() -> WorkerRuntime:
    """Return this process's runtime."""
    if _runtime is None:
        raise RuntimeError("worker runtime not initialised; start workers with `gemma-jobs worker`")
    return _runtime
