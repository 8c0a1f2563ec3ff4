"""Scale-out with real worker processes on PostgreSQL and Redis: jobs spread over every worker,
a worker killed mid-run loses nothing, and workers receive only their own models' jobs."""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter

import pytest
import requests
from sqlalchemy import func, select

from shared.db import Database
from shared.models import Job, UsageRecord
from shared.registry import DEFAULT_MODEL_ID
from tests.e2e.conftest import StartStack
from tests.processes import wait_for_job

pytestmark = pytest.mark.e2e

FAST = {"GEMMA_JOBS_LEASE_S": "3", "GEMMA_JOBS_CONTROL_POLL_S": "0.2", "GEMMA_JOBS_REAPER_INTERVAL_S": "0.5"}
SHORT_MODEL = "gemma-3-270m-short"  # the same weights under another id (tests/e2e/conftest.py)


@pytest.fixture()
def cluster(start_stack: StartStack, tmp_path, postgres_admin_url):
    """A gateway on a fresh PostgreSQL database; the test starts workers by the models they serve."""
    with start_stack(tmp_path, postgres_admin_url, env_overrides=FAST, stop_workers_with=signal.SIGKILL) as started:
        headers = started.new_key()

        def submit(model: str, new_tokens: int) -> str:
            body = {"model": model, "prompt": "Count: 1, 2, 3,", "max_new_tokens": new_tokens, "temperature": 0}
            response = requests.post(f"{started.base_url}/v1/generations", json=body, headers=headers, timeout=10)
            assert response.status_code == 202, response.text
            return response.json()["id"]

        yield started.start_worker, submit, started.db, started.base_url, headers


def _rows(db: Database, ids: list[str]) -> dict[str, Job]:
    with db.session_scope() as session:
        return {job.id: job for job in session.scalars(select(Job).where(Job.id.in_(ids)))}


def test_thirty_jobs_spread_over_three_workers_and_survive_a_kill(cluster):
    start, submit, db, base_url, headers = cluster
    workers = [start(DEFAULT_MODEL_ID) for _ in range(3)]
    ids = [submit(DEFAULT_MODEL_ID, 4) for _ in range(30)]
    # Kill one worker once every worker has finished a job and some remain to be done.
    deadline = time.monotonic() + 120
    while True:
        rows = _rows(db, ids).values()
        done_by = Counter(job.worker_id.split(":")[1] for job in rows if job.status == "succeeded")
        if len(done_by) == 3:
            break
        assert time.monotonic() < deadline, done_by
        time.sleep(0.1)
    # Three CPU workers on one host split its cores instead of each claiming all of them.
    cores = len(os.sched_getaffinity(0))
    for worker in workers if cores > 1 else []:
        changes = [json.loads(line)["threads"] for line in worker.log().splitlines() if '"cpu_threads"' in line]
        assert max(1, cores // 3) in changes, worker.log()[-2000:]
    victim = workers[1]
    victim.stop(signal.SIGKILL)

    finished = [wait_for_job(base_url, headers, job_id, timeout_s=180) for job_id in ids]
    assert [job["status"] for job in finished] == ["succeeded"] * 30
    rows = _rows(db, ids)
    pids = Counter(int(job.worker_id.split(":")[1]) for job in rows.values())
    assert set(pids) == {worker.pid for worker in workers}, pids  # each job records its worker
    assert sum(count for pid, count in pids.items() if pid != victim.pid) > 0
    with db.session_scope() as session:
        charges = session.execute(
            select(UsageRecord.job_id, func.count()).where(UsageRecord.job_id.in_(ids)).group_by(UsageRecord.job_id)
        ).all()
    assert sorted(count for _, count in charges) == [1] * 30  # each charged exactly once


def test_workers_receive_only_the_models_they_serve(cluster):
    start, submit, db, base_url, headers = cluster
    long_worker = start(DEFAULT_MODEL_ID)
    short_worker = start(SHORT_MODEL)
    ids = {model: [submit(model, 4) for _ in range(6)] for model in (DEFAULT_MODEL_ID, SHORT_MODEL)}
    for job_ids in ids.values():
        assert {wait_for_job(base_url, headers, job_id)["status"] for job_id in job_ids} == {"succeeded"}
    expected = {DEFAULT_MODEL_ID: long_worker.pid, SHORT_MODEL: short_worker.pid}
    for model, job_ids in ids.items():
        pids = {int(job.worker_id.split(":")[1]) for job in _rows(db, job_ids).values()}
        assert pids == {expected[model]}, (model, pids)
