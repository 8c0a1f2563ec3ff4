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
import sys
import tempfile
import threading
import time
from pathlib import Path

import redis
import requests

# A sibling script (bench/ is on sys.path when a script in it runs).
from bench_processes import CLI, Child, new_key, serving
from sqlalchemy import func, select

from shared.db import Database
from shared.migrate import upgrade
from shared.models import Job, JobEvent, UsageRecord

FAST = {
    "GEMMA_JOBS_LEASE_S": "3",
    "GEMMA_JOBS_CONTROL_POLL_S": "0.2",
    "GEMMA_JOBS_REAPER_INTERVAL_S": "0.5",
    "GEMMA_JOBS_REPUBLISH_AFTER_S": "3",
    "GEMMA_JOBS_MAX_ATTEMPTS": "10",
    "GEMMA_JOBS_LOG_LEVEL": "warning",
}


def open_jobs(db: Database) -> int:
    """Return how many jobs are still queued or running."""
    with db.session_scope(read_only=True) as session:
        return session.scalar(select(func.count()).select_from(Job).where(Job.status.in_(["queued", "running"])))


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
    _, key = new_key(database_url)
    env = {**os.environ, **FAST, "DATABASE_URL": database_url, "REDIS_URL": redis_url}
    spawns = 0

    def start_worker() -> Child:
        # A log per process started, so a killed worker's log survives its replacement.
        nonlocal spawns
        spawns += 1
        return Child([*CLI, "worker", "--device", "cpu"], env, workdir / f"worker-{spawns}.log")

    headers = {"Authorization": f"Bearer {key}"}
    accepted: list[str] = []
    kills = 0
    stop_killing = threading.Event()
    workers: list[Child] = []

    def killer() -> None:
        nonlocal kills
        while not stop_killing.wait(args.kill_every):
            index = rng.randrange(len(workers))
            workers[index].stop()
            kills += 1
            workers[index] = start_worker()

    killing = threading.Thread(target=killer, daemon=True)
    with serving([*CLI, "gateway"], "/readyz", workdir / "gateway.log", env) as base_url:
        try:
            workers += [start_worker() for _ in range(args.workers)]
            killing.start()
            started = time.monotonic()
            for _ in range(args.jobs):
                body = {"model": "gemma-3-270m", "prompt": "Count: 1, 2, 3,", "temperature": 0,
                        "max_new_tokens": rng.randint(4, 48)}
                response = requests.post(f"{base_url}/v1/generations", json=body, headers=headers, timeout=30)
                if response.status_code == 202:
                    accepted.append(response.json()["id"])
                time.sleep(rng.uniform(0, 0.5))
            # Not wait_until: on timeout the check below still runs and reports the jobs left open.
            deadline = time.monotonic() + args.timeout
            while time.monotonic() < deadline and open_jobs(db):
                time.sleep(1)
            elapsed = time.monotonic() - started
        finally:
            stop_killing.set()
            if killing.is_alive():  # let a kill and restart under way finish, so that no worker is left over
                killing.join()
            for worker in workers:
                worker.stop()
    with db.session_scope() as session:
        rows = {job.id: job for job in session.scalars(select(Job))}
        usage = dict(
            session.execute(select(UsageRecord.job_id, func.count()).group_by(UsageRecord.job_id)).all()
        )
        terminal_events = dict(
            session.execute(
                select(JobEvent.job_id, func.count())
                .where(JobEvent.type == "status",
                       JobEvent.data["status"].as_string().in_(["succeeded", "failed", "cancelled"]))
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
    print(f"settings: {args.workers} workers, SIGKILL every {args.kill_every:g} s, {database_url.split(':')[0]}, "
          f"lease 3 s, {elapsed:.0f} s, logs in {workdir}")
    print(f"succeeded={len(succeeded)} retried={retried} failed_codes={sorted(failed)} uncharged={len(uncharged)}")
    print(f"jobs={len(accepted)} lost={len(lost)} duplicated={len(duplicated)} kills={kills}")
    sys.exit(1 if lost or duplicated or uncharged else 0)


if __name__ == "__main__":
    main()
