"""Starting a throwaway stack for a benchmark: SQLite, Redis, one gateway, N workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import redis
import requests
from sqlalchemy import func, select

from services.domain.keys import create_key
from services.stack import free_port
from shared.db import Database
from shared.migrate import upgrade
from shared.models import WorkerRecord

CLI = [sys.executable, "-m", "services.cli"]


@dataclass
class BenchStack:
    """A running gateway and its workers, with a user key."""

    base_url: str
    headers: dict[str, str]
    db: Database

    def submit(self, body: dict) -> str:
        """Submit a generation job; return its id."""
        response = requests.post(f"{self.base_url}/v1/generations", json=body, headers=self.headers, timeout=30)
        response.raise_for_status()
        return response.json()["id"]

    def job(self, job_id: str) -> dict:
        """Return a job as the API shows it."""
        return requests.get(f"{self.base_url}/v1/jobs/{job_id}", headers=self.headers, timeout=10).json()

    def wait_all(self, ids: list[str], timeout_s: float = 1800) -> list[dict]:
        """Wait until every job has ended; return them (a failed job stops the benchmark)."""
        jobs = []
        for job_id in ids:
            wait(lambda: self.job(job_id)["status"] not in ("queued", "running"), timeout_s, interval=0.05)
            job = self.job(job_id)
            if job["status"] != "succeeded":
                raise SystemExit(f"job {job_id} ended {job['status']}: {job.get('error')}")
            jobs.append(job)
        return jobs


@contextmanager
def bench_stack(
    workdir: Path, name: str, redis_url: str, worker_args: list[list[str]], env: dict[str, str] | None = None
) -> Iterator[BenchStack]:
    """Run a fresh SQLite database, a flushed Redis db, a gateway and one worker per entry of worker_args."""
    database_url = f"sqlite:///{workdir / f'{name}.db'}"
    upgrade(database_url)
    redis.Redis.from_url(redis_url).flushdb()
    full_env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "GEMMA_JOBS_DATA_DIR": str(workdir / "var"),
        "GEMMA_JOBS_LOG_LEVEL": "warning",
        "GEMMA_JOBS_WORKER_HEARTBEAT_S": "0.5",
        **(env or {}),
    }
    port = free_port()
    log = open(workdir / f"{name}.log", "ab")
    spawn = lambda *cli: subprocess.Popen(  # noqa: E731
        [*CLI, *cli], env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    processes = [spawn("gateway", "--port", str(port), "--workers", "1", "--threads", "32")]
    processes += [spawn("worker", "--device", "cpu", "--models", "gemma-3-270m", *args) for args in worker_args]
    db = Database(database_url)
    try:
        base_url = f"http://127.0.0.1:{port}"
        wait(lambda: _ready(base_url) and _ready_workers(db) == len(worker_args), 300)
        with db.session_scope() as session:
            _, key = create_key(session, role="user")
        yield BenchStack(base_url, {"Authorization": f"Bearer {key}"}, db)
    finally:
        for process in processes:
            os.killpg(process.pid, signal.SIGKILL)
        db.dispose()
        log.close()


def _ready(base_url: str) -> bool:
    try:
        return requests.get(f"{base_url}/readyz", timeout=1).status_code == 200
    except requests.RequestException:
        return False


def _ready_workers(db: Database) -> int:
    with db.session_scope(read_only=True) as session:
        return session.scalar(select(func.count()).select_from(WorkerRecord).where(WorkerRecord.state == "ready"))


def wait(condition, timeout_s: float, interval: float = 0.2) -> None:
    """Poll a condition until it holds; stop the benchmark if it never does."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit("timed out")
        time.sleep(interval)
