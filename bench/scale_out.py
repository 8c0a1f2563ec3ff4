"""Throughput of 1, 2 and 3 workers on one machine: jobs/s with a cheap generation setting.

    .venv/bin/python bench/scale_out.py --jobs 30 --new-tokens 8 --workers 1,2,3 [--split-cores]

For each worker count: a fresh SQLite database, Redis at REDIS_URL (default
redis://127.0.0.1:6379/11, flushed), one gateway, N `gemma-jobs worker --device cpu`
processes started and ready before the clock starts; then all jobs are submitted at once and
the clock stops when the last one has succeeded. Prints jobs/s per N and the ratio to N=1.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
import requests
from sqlalchemy import func, select

from services.domain.keys import create_key
from services.stack import free_port
from shared.db import Database
from shared.migrate import upgrade
from shared.models import WorkerRecord

CLI = [sys.executable, "-m", "services.cli"]


def run(workers: int, args, workdir: Path) -> float:
    """Return jobs/s for one worker count."""
    database_url = f"sqlite:///{workdir / f'bench-{workers}.db'}"
    upgrade(database_url)
    redis.Redis.from_url(args.redis_url).flushdb()
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "REDIS_URL": args.redis_url,
        "GEMMA_JOBS_DATA_DIR": str(workdir / "var"),
        "GEMMA_JOBS_LOG_LEVEL": "warning",
        "GEMMA_JOBS_WORKER_HEARTBEAT_S": "0.5",
    }
    if args.split_cores:
        # Each worker's torch gets its share of the cores instead of all of them.
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))
    port = free_port()
    log = open(workdir / f"bench-{workers}.log", "ab")
    spawn = lambda *cli: subprocess.Popen(  # noqa: E731
        [*CLI, *cli], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    processes = [spawn("gateway", "--port", str(port), "--workers", "1", "--threads", "16")]
    processes += [spawn("worker", "--device", "cpu", "--models", "gemma-3-270m") for _ in range(workers)]
    db = Database(database_url)
    try:
        base_url = f"http://127.0.0.1:{port}"
        _wait(lambda: _ready(base_url) and _ready_workers(db) == workers, 300)
        with db.session_scope() as session:
            _, key = create_key(session, role="user")
        headers = {"Authorization": f"Bearer {key}"}
        body = {"model": "gemma-3-270m", "prompt": "Count: 1, 2, 3,", "max_new_tokens": args.new_tokens,
                "temperature": 0}
        started = time.perf_counter()
        ids = [requests.post(f"{base_url}/v1/generations", json=body, headers=headers, timeout=30).json()["id"]
               for _ in range(args.jobs)]
        for job_id in ids:
            _wait(lambda: requests.get(f"{base_url}/v1/jobs/{job_id}", headers=headers, timeout=10)
                  .json()["status"] == "succeeded", 600, interval=0.05)
        return args.jobs / (time.perf_counter() - started)
    finally:
        for process in processes:
            os.killpg(process.pid, signal.SIGKILL)
        db.dispose()


def _ready(base_url: str) -> bool:
    try:
        return requests.get(f"{base_url}/readyz", timeout=1).status_code == 200
    except requests.RequestException:
        return False


def _ready_workers(db: Database) -> int:
    with db.session_scope(read_only=True) as session:
        return session.scalar(select(func.count()).select_from(WorkerRecord).where(WorkerRecord.state == "ready"))


def _wait(condition, timeout_s: float, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit("timed out")
        time.sleep(interval)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=30)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--workers", default="1,2,3")
    parser.add_argument("--split-cores", action="store_true", help="OMP_NUM_THREADS = cores / workers")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/11"))
    args = parser.parse_args()
    counts = [int(count) for count in args.workers.split(",")]
    with tempfile.TemporaryDirectory() as folder:
        workdir = Path(folder)
        rates = {count: run(count, args, workdir) for count in counts}
    print(f"settings: jobs={args.jobs} new_tokens={args.new_tokens} device=cpu cores={os.cpu_count()} "
          f"model=gemma-3-270m database=sqlite split_cores={args.split_cores}")
    baseline = rates[counts[0]]
    for count, rate in rates.items():
        print(f"workers={count}: {rate:.2f} jobs/s  ratio vs {counts[0]} worker(s): {rate / baseline:.2f}")


if __name__ == "__main__":
    main()
