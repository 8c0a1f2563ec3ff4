"""Fault injection: run N jobs across several workers while SIGKILLing workers at random,
then check the history: every accepted job in exactly one terminal state, one usage row per
succeeded job, nothing lost, nothing charged twice.

    .venv/bin/python bench/faults.py --jobs 60 --workers 3 --kill-every 6

Uses the real Redis at REDIS_URL (default redis://127.0.0.1:6379/11, flushed) and a fresh
SQLite file, or DATABASE_URL when set. Prints `jobs=N lost=0 duplicated=0 kills=K`.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import redis
import requests
from sqlalchemy import func, select

from services.domain.keys import create_key
from services.stack import free_port
from shared.db import Database
from shared.migrate import upgrade
from shared.models import Job, JobEvent, UsageRecord

CLI = [sys.executable, "-m", "services.cli"]
FAST = {
    "GEMMA_JOBS_LEASE_S": "3",
    "GEMMA_JOBS_CONTROL_POLL_S": "0.2",
    "GEMMA_JOBS_REAPER_INTERVAL_S": "0.5",
    "GEMMA_JOBS_REPUBLISH_AFTER_S": "3",
    "GEMMA_JOBS_MAX_ATTEMPTS": "10",
    "GEMMA_JOBS_LOG_LEVEL": "warning",
}


def spawn(args: list[str], env: dict[str, str], log_dir: Path, name: str) -> subprocess.Popen:
    log = open(log_dir / f"{name}.log", "ab")
    return subprocess.Popen([*CLI, *args], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(base_url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{base_url}/readyz", timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise SystemExit("gateway never became ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=60)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--kill-every", type=float, default=6.0, help="seconds between SIGKILLs")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    workdir = Path(tempfile.mkdtemp(prefix="gemma-jobs-faults-"))
    database_url = os.environ.get("DATABASE_URL") or f"sqlite:///{workdir / 'faults.db'}"
    redis_url = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/11"
    redis.Redis.from_url(redis_url).flushdb()
    upgrade(database_url)
    db = Database(database_url)
    with db.session_scope() as session:
        _, key = create_key(session, role="user", name="faults")
    env = {**os.environ, **FAST, "DATABASE_URL": database_url, "REDIS_URL": redis_url}
    port = free_port()
    gateway = spawn(["gateway", "--port", str(port)], env, workdir, "gateway")
    base_url = f"http://127.0.0.1:{port}"
    wait_ready(base_url)
    workers = [spawn(["worker", "--device", "cpu"], env, workdir, f"worker-{i}") for i in range(args.workers)]
    headers = {"Authorization": f"Bearer {key}"}
    accepted: list[str] = []
    kills = 0
    stop_killing = threading.Event()

    def killer() -> None:
        nonlocal kills
        while not stop_killing.wait(args.kill_every):
            index = rng.randrange(len(workers))
            workers[index].send_signal(signal.SIGKILL)
            workers[index].wait()
            kills += 1
            workers[index] = spawn(["worker", "--device", "cpu"], env, workdir, f"worker-{index}")

    threading.Thread(target=killer, daemon=True).start()
    started = time.monotonic()
    for _ in range(args.jobs):
        body = {"model": "gemma-3-270m", "prompt": "Count: 1, 2, 3,", "temperature": 0,
                "max_new_tokens": rng.randint(4, 48)}
        response = requests.post(f"{base_url}/v1/generations", json=body, headers=headers, timeout=30)
        if response.status_code == 202:
            accepted.append(response.json()["id"])
        time.sleep(rng.uniform(0, 0.5))
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        with db.session_scope() as session:
            open_jobs = session.scalar(
                select(func.count()).select_from(Job).where(Job.status.in_(["queued", "running"]))
            )
        if open_jobs == 0:
            break
        time.sleep(1)
    stop_killing.set()
    elapsed = time.monotonic() - started
    with db.session_scope() as session:
        rows = {job.id: job for job in session.scalars(select(Job))}
        usage = dict(
            session.execute(select(UsageRecord.job_id, func.count()).group_by(UsageRecord.job_id)).all()
        )
        terminal_events = dict(
            session.execute(
                select(JobEvent.job_id, func.count())
                .where(JobEvent.type == "status", JobEvent.data["status"].as_string().in_(["succeeded", "failed", "cancelled"]))
                .group_by(JobEvent.job_id)
            ).all()
        )
    lost = [job_id for job_id in accepted if job_id not in rows or rows[job_id].status in ("queued", "running")]
    duplicated = [
        job_id for job_id in accepted if usage.get(job_id, 0) > 1 or terminal_events.get(job_id, 0) > 1
    ]
    succeeded = [job_id for job_id in accepted if job_id in rows and rows[job_id].status == "succeeded"]
    uncharged = [job_id for job_id in succeeded if usage.get(job_id, 0) != 1]
    failed = {rows[j].error["code"] for j in accepted if j in rows and rows[j].status == "failed"}
    retried = sum(1 for job_id in accepted if job_id in rows and rows[job_id].attempts > 1)
    for process in [*workers, gateway]:
        process.send_signal(signal.SIGKILL)
    print(f"settings: {args.workers} workers, SIGKILL every {args.kill_every:g} s, {database_url.split(':')[0]}, "
          f"lease 3 s, {elapsed:.0f} s, logs in {workdir}")
    print(f"succeeded={len(succeeded)} retried={retried} failed_codes={sorted(failed)} uncharged={len(uncharged)}")
    print(f"jobs={len(accepted)} lost={len(lost)} duplicated={len(duplicated)} kills={kills}")
    sys.exit(1 if lost or duplicated or uncharged else 0)


if __name__ == "__main__":
    main()
