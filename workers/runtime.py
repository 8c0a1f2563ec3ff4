"""Per-process state of a worker, built once at start-up (after any fork)."""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field

import redis
import torch
from celery import Celery

from shared.celery_app import make_celery
from shared.db import Database
from shared.registry import ModelRegistry
from shared.settings import Settings
from shared.storage import Storage
from workers.adapter_cache import AdapterCache
from workers.batch_engine import BatchEngine
from workers.cpu_threads import CpuThreads, usable_cores
from workers.greedy_screen import greedy_screen_for
from workers.job_guard import LeaseKeeper
from workers.model_cache import ModelCache
from workers.model_loader import generation_dtype
from workers.connections import connect_database, connect_redis
from workers.result_process import ResultProcess
from workers.token_publisher import StepWrites


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
    # Renews the leases of every job this worker runs.
    leases: LeaseKeeper
    # Generation jobs batched together; each task thread hands its job to the model's engine.
    concurrency: int = 1
    # CPU workers only: the torch thread count their model threads use.
    cpu_threads: CpuThreads | None = None
    # Set (monotonic clock) when SIGTERM arrives: a running job may go on until then.
    shutdown_deadline: float | None = None
    # Writes finished generations' results behind their tasks, in a process of its own.
    results: ResultProcess | None = None
    # Reported by the heartbeat (with `jobs_in_flight`).
    jobs_done: int = 0
    # Task threads update the counters; fine-tunes take the training slot one at a time.
    counter_lock: threading.Lock = field(default_factory=threading.Lock)
    training_slot: threading.Lock = field(default_factory=threading.Lock)
    # One engine per model, created by whichever task thread needs it first.
    _engines: dict[str, BatchEngine] = field(default_factory=dict)
    _engines_lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def create(cls, settings: Settings, device: torch.device, concurrency: int = 1) -> "WorkerRuntime":
        """Connect to the database and Redis and set up an empty model cache."""
        registry = ModelRegistry.load(settings.model_registry)
        dtype = generation_dtype(device, concurrency, settings.cpu_dtype)
        db = connect_database(settings)
        redis_client = connect_redis(settings)
        # Host and pid alone can repeat: containers on the host network share the hostname and
        # may give their workers the same pid, and one would renew and store the other's leases.
        worker_id = f"{socket.gethostname()}:{os.getpid()}:{device}:{secrets.token_hex(3)}"
        return cls(
            settings=settings,
            db=db,
            redis=redis_client,
            celery=make_celery(settings.redis_url, settings.visibility_timeout_s),
            models=ModelCache(registry, settings.model_cache_path, device, dtype),
            adapters=AdapterCache(settings.adapter_cache_size),
            storage=Storage(settings.storage_path),
            worker_id=worker_id,
            device=device,
            leases=LeaseKeeper(db, redis_client, worker_id, settings.lease_s, settings.control_poll_s),
            concurrency=concurrency,
            cpu_threads=CpuThreads(settings.cpu_threads, usable_cores()) if device.type == "cpu" else None,
            results=ResultProcess(settings, worker_id),
        )

    @property
    def jobs_in_flight(self) -> int:
        """Jobs running now: the count the result writer process reads too."""
        return self.results.jobs_in_flight

    def start_shutdown(self, grace_s: float) -> None:
        """Let running jobs go on at most `grace_s` more, then stop and be handed back; a later
        call may shorten the grace, never lengthen it (SIGTERM repeated, then a cold shutdown)."""
        deadline = time.monotonic() + grace_s
        if self.shutdown_deadline is None or deadline < self.shutdown_deadline:
            self.shutdown_deadline = deadline

    def engine(self, model_id: str) -> BatchEngine:
        """Return the batching engine of a model, loading the model on first use."""
        loaded = self.models.get(model_id)
        with self._engines_lock:
            if model_id not in self._engines:
                static = self.settings.batching == "static"
                self._engines[model_id] = BatchEngine(
                    loaded,
                    self.concurrency,
                    self.adapters,
                    static,
                    cpu_threads=self.cpu_threads,
                    step_writes=StepWrites(self.redis),
                    greedy_screen=greedy_screen_for(loaded, self.settings.greedy_screen),
                )
            return self._engines[model_id]


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
