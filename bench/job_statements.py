"""Database CPU per job: a worker's claim and its result writer's grouped finish, by themselves.

    .venv/bin/python bench/job_statements.py --jobs 2000 --group 16

`--jobs` generation jobs are created as the gateway creates them in a fresh PostgreSQL
database; then, from this one process on the worker's connection settings, each is claimed
(`job_store.claim`: one statement, the UPDATE to running and its status event), then
finished in groups (`job_store.finish_each`: one pipeline and one commit a group, as the result
writer stores them). Baseline: a one-row UPDATE … RETURNING id, by id, of a column no index
covers (a heap-only update, the cheapest write PostgreSQL makes), run the same way as the
claim. For each: the PostgreSQL server's CPU (all backends), this process's CPU and the wall
time, per job. The claim and the finish change `status`, which indexes cover, so neither can
be a heap-only update; the ratios show what a job's two writes cost beyond the cheapest one.
"""

from __future__ import annotations

import argparse
import os
import time

import redis
from bench_processes import cpu_seconds, cpu_since, fresh_postgres, postgres_and_redis
from queue_overhead import submit_jobs
from sqlalchemy import bindparam, select, update

from shared import job_store
from shared.db import PING_IDLE_AFTER_S, Database
from shared.models import Job

WORKER_ID = "bench:1:cpu"
TOUCH = (update(Job.__table__).where(Job.id == bindparam("p_job_id")).values(progress=bindparam("p_progress"))
         .returning(Job.id))


def per_job(run, count: int) -> dict[str, float]:
    """Run `run()`; return PostgreSQL CPU, this process's CPU and wall time, in ms per job."""
    postgres, cpu, wall = cpu_seconds(postgres_and_redis()["postgres"]), time.process_time(), time.perf_counter()
    run()
    return {"postgres": cpu_since(postgres, cpu_seconds(postgres_and_redis()["postgres"])) / count * 1e3,
            "client": (time.process_time() - cpu) / count * 1e3, "wall": (time.perf_counter() - wall) / count * 1e3}


def line(label: str, ms: dict[str, float], baseline: dict[str, float] | None = None) -> str:
    text = (f"{label}: PostgreSQL {ms['postgres']:.3f} ms/job, this process {ms['client']:.3f}, "
            f"wall {ms['wall']:.3f}")
    if baseline:
        text += (f"  (ratios to the baseline: PostgreSQL {ms['postgres'] / baseline['postgres']:.2f}, "
                 f"process {ms['client'] / baseline['client']:.2f})")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--group", type=int, default=16, help="jobs per finish_each call (the writer's group)")
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12"))
    args = parser.parse_args()
    print(f"settings: jobs={args.jobs} group={args.group} cores={os.cpu_count()} database=postgresql (fresh) "
          f"connections: the worker's (autocommit, claims without waiting for the WAL flush)")
    with fresh_postgres() as url:
        submit_jobs(url, args.redis_url, args.jobs)
        redis.Redis.from_url(args.redis_url).flushdb()  # only the rows are used
        db = Database(url, ping_idle_after_s=PING_IDLE_AFTER_S)
        with db.session_scope(read_only=True) as session:
            ids = list(session.scalars(select(Job.id).order_by(Job.id)))
        db.first(TOUCH, {"p_job_id": ids[0], "p_progress": {}}, durable=False)  # connect and warm up

        touched = per_job(lambda: [db.first(TOUCH, {"p_job_id": job_id, "p_progress": {"n": 1}}, durable=False)
                                   for job_id in ids], len(ids))
        claims = []
        claimed = per_job(lambda: claims.extend(
            job_store.claim(db, job_id, WORKER_ID, device="cpu", lease_s=60, max_attempts=3) for job_id in ids),
            len(ids))
        usage = {"prompt_tokens": 6, "completion_tokens": 1, "gpu_seconds": 0.0}
        result = {"text": " Paris", "finish_reason": "length", "usage": usage}
        stored = []
        finished = per_job(lambda: [stored.extend(job_store.finish_each(
            db, [(held, result, usage) for held in claims[start:start + args.group]], WORKER_ID))
            for start in range(0, len(claims), args.group)], len(ids))
        db.dispose()
    if not (all(claims) and all(stored) and len(stored) == len(ids)):
        raise SystemExit(f"{sum(map(bool, claims))} claimed and {sum(stored)} stored of {len(ids)}")
    print(line("baseline  one-row UPDATE of an unindexed column", touched))
    print(line("result    claim (one statement)                ", claimed, touched))
    print(line(f"result    finish, groups of {args.group:<3}                ", finished, touched))


if __name__ == "__main__":
    main()
