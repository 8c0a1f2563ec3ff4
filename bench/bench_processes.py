"""Child processes, throwaway databases, a running stack and polling, for benchmarks that start real processes."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
import psycopg
import redis
import requests
from sqlalchemy import func, select

from services.domain.keys import create_key
from services.stack import free_port
from shared.db import Database
from shared.migrate import upgrade
from shared.models import WorkerRecord

CLI = [sys.executable, "-m", "services.cli"]
POSTGRES_ADMIN_URL = os.environ.get("POSTGRES_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


# --- databases ---------------------------------------------------------------------------------


def connect(database_url: str, **options) -> psycopg.Connection:
    """Open a plain psycopg connection to a (SQLAlchemy-style) PostgreSQL URL."""
    return psycopg.connect(database_url.replace("+psycopg", ""), **options)


@contextmanager
def fresh_postgres() -> Iterator[str]:
    """Create an empty PostgreSQL database, migrate it to head, and drop it afterwards."""
    name = f"gemma_jobs_bench_{secrets.token_hex(4)}"
    with connect(POSTGRES_ADMIN_URL, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        upgrade(url)
        yield url
    finally:
        with connect(POSTGRES_ADMIN_URL, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def new_key(database_url: str) -> tuple[str, str]:
    """Create a user key with no limits; return its id and plaintext."""
    db = Database(database_url)
    with db.session_scope() as session:
        row, plaintext = create_key(session, role="user", name="bench")
    db.dispose()
    return row.id, plaintext


def ready_workers(db: Database) -> int:
    """Return how many workers the registry lists as ready."""
    with db.session_scope(read_only=True) as session:
        return session.scalar(select(func.count()).select_from(WorkerRecord).where(WorkerRecord.state == "ready"))


# --- processes ---------------------------------------------------------------------------------

def named_processes(prefix: str) -> list[psutil.Process]:
    """Return the processes whose name starts with `prefix` (postgres, redis-server)."""
    return [process for process in psutil.process_iter(["name"]) if (process.info["name"] or "").startswith(prefix)]


def postgres_and_redis() -> dict[str, list[psutil.Process]]:
    """Return this machine's PostgreSQL processes (each backend its own) and Redis server."""
    return {"postgres": named_processes("postgres"), "redis": named_processes("redis-server")}


def cpu_seconds(processes: list[psutil.Process]) -> dict[int, float]:
    """Return user + system CPU seconds of each process still alive, by pid."""
    seconds = {}
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        seconds[process.pid] = times.user + times.system
    return seconds


def cpu_since(before: dict[int, float], now: dict[int, float]) -> float:
    """Return the CPU seconds used between two `cpu_seconds` readings: a process started since
    `before` counts from its start."""
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in now.items())


class Child:
    """A process in its own session whose output goes to a log file; `stop` kills its whole group."""

    def __init__(self, command: list[str], env: dict[str, str], log_path: Path):
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.started = time.perf_counter()
        self.process = subprocess.Popen(command, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                        start_new_session=True)

    @property
    def pid(self) -> int:
        """Return the process id (also its process group's)."""
        return self.process.pid

    def log(self) -> str:
        """Return everything the process wrote so far."""
        return self.log_path.read_text(errors="replace")

    def check_alive(self) -> None:
        """Stop the benchmark with the child's log if it exited."""
        if self.process.poll() is not None:
            raise SystemExit(f"{self.process.args} exited ({self.process.returncode}):\n{self.log()[-3000:]}")

    def stop(self) -> None:
        """Kill the process group (if still running) and close the log."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self._log.close()


def wait_until(condition: Callable[[], bool], timeout_s: float, interval: float = 0.02,
               child: Child | None = None) -> None:
    """Poll a condition until it holds; stop the benchmark if it never does (or `child` dies)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if child is not None:
            child.check_alive()
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout_s} s")
        time.sleep(interval)


def child_env(**values: str) -> dict[str, str]:
    """Return this environment with product defaults (no GEMMA_JOBS_* inherited), plus these values."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("GEMMA_JOBS_")}
    return {**env, **values}


def answers(url: str) -> bool:
    """Return whether a GET on a URL answers 200 right now."""
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False


@contextmanager
def serving(command: list[str], ready_path: str, log_path: Path, env: dict[str, str] | None = None) -> Iterator[str]:
    """Run a server (`command` gets `--port N` appended) until the block ends; yield its base URL."""
    port = free_port()
    server = Child([*command, "--port", str(port)], env or dict(os.environ), log_path)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: answers(base_url + ready_path), 60, interval=0.2, child=server)
        yield base_url
    finally:
        server.stop()


# --- a whole stack -----------------------------------------------------------------------------


@dataclass
class BenchStack:
    """A running gateway and its workers, with a user key."""

    base_url: str
    headers: dict[str, str]

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
            wait_until(lambda: self.job(job_id)["status"] not in ("queued", "running"), timeout_s, interval=0.05)
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
    workers: list[Child] = []
    db = Database(database_url)

    def all_ready() -> bool:
        for worker in workers:
            worker.check_alive()
        return ready_workers(db) == len(workers)

    try:
        # Workers first: loading the model takes longest, and they need only the database and Redis.
        for index, args in enumerate(worker_args):
            command = [*CLI, "worker", "--device", "cpu", "--models", "gemma-3-270m", *args]
            workers.append(Child(command, full_env, workdir / f"{name}-worker-{index}.log"))
        gateway = [*CLI, "gateway", "--workers", "1", "--threads", "32"]
        with serving(gateway, "/readyz", workdir / f"{name}-gateway.log", full_env) as base_url:
            wait_until(all_ready, 300, interval=0.2)
            _, key = new_key(database_url)
            yield BenchStack(base_url, {"Authorization": f"Bearer {key}"})
    finally:
        for worker in workers:
            worker.stop()
        db.dispose()
