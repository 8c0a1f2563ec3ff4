"""Batching across jobs through the real stack: one worker with --concurrency 8 (bf16 on a
CPU with bf16 dot products, else fp32) on PostgreSQL and Redis. Jobs that share decode steps
give exactly what each gives alone, a short job leaves a batch before a long one, one job
cancels without disturbing the rest, and tokens stream live over SSE."""

from __future__ import annotations

import json
import signal
import time
from datetime import datetime

import pytest
import redis
import requests
from sqlalchemy import func, select

from shared import token_stream
from shared.models import UsageRecord
from shared.registry import DEFAULT_MODEL_ID
from tests.e2e.conftest import StartStack
from tests.processes import start_worker, wait_for_job

pytestmark = pytest.mark.e2e

# Leases short enough that a killed worker's batch is retried within seconds.
FAST_RECOVERY = {"GEMMA_JOBS_LEASE_S": "5", "GEMMA_JOBS_CONTROL_POLL_S": "0.5", "GEMMA_JOBS_REAPER_INTERVAL_S": "0.5"}

BASE = {"model": DEFAULT_MODEL_ID, "temperature": 0}
# Different lengths, samplers and stop conditions, so rows join and leave at different steps.
MIXED_JOBS = [
    {**BASE, "prompt": "The three laws of robotics are", "max_new_tokens": 20},
    {**BASE, "prompt": "Paris is the capital of", "max_new_tokens": 6},
    {**BASE, "prompt": "Once upon a time", "max_new_tokens": 16, "temperature": 0.9, "top_p": 0.9, "seed": 11},
    {**BASE, "prompt": "A list of fruits: apple,", "max_new_tokens": 14, "repetition_penalty": 1.4},
    {**BASE, "prompt": "Q: What is 2+2?\nA:", "max_new_tokens": 24, "stop": ["\n"]},
    {**BASE, "messages": [{"role": "user", "content": "Name a color."}], "max_new_tokens": 12},
    {**BASE, "prompt": "def fibonacci(n):", "max_new_tokens": 18, "temperature": 1.3, "top_k": 20, "seed": 5},
    {**BASE, "prompt": "The weather today", "max_new_tokens": 9},
]


@pytest.fixture(scope="module")
def batching_stack(start_stack: StartStack, tmp_path_factory, postgres_admin_url):
    """One worker batching 8 jobs, on a fresh PostgreSQL database."""
    workdir = tmp_path_factory.mktemp("batching")
    with start_stack(
        workdir, postgres_admin_url, env_overrides=FAST_RECOVERY, stop_workers_with=signal.SIGKILL
    ) as started:
        worker = started.start_worker(DEFAULT_MODEL_ID, "--concurrency", "8", name="worker", role="generate")
        yield started.base_url, started.new_key(), started.db, workdir, started.env, worker


def submit(base_url: str, headers: dict, body: dict) -> str:
    response = requests.post(f"{base_url}/v1/generations", json=body, headers=headers, timeout=30)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def run_alone(base_url: str, headers: dict, body: dict) -> dict:
    return wait_for_job(base_url, headers, submit(base_url, headers, body), timeout_s=180)


def at(value: str) -> datetime:
    return datetime.fromisoformat(value)


def test_jobs_in_one_batch_match_each_job_run_alone(batching_stack):
    base_url, headers, db, *_ = batching_stack
    ids = [submit(base_url, headers, body) for body in MIXED_JOBS]
    together = [wait_for_job(base_url, headers, job_id, timeout_s=240) for job_id in ids]
    assert {job["status"] for job in together} == {"succeeded"}, together
    # They really shared the model: every job started before the first one finished.
    assert max(at(job["started_at"]) for job in together) < min(at(job["finished_at"]) for job in together)
    alone = [run_alone(base_url, headers, body) for body in MIXED_JOBS]
    for body, batched, single in zip(MIXED_JOBS, together, alone):
        assert batched["result"]["token_ids"] == single["result"]["token_ids"], body
        assert batched["result"]["text"] == single["result"]["text"]
        assert batched["result"]["finish_reason"] == single["result"]["finish_reason"]
        assert batched["usage"]["completion_tokens"] == len(batched["result"]["token_ids"])
    assert together[4]["result"]["finish_reason"] == "stop" and "\n" not in together[4]["result"]["text"]
    with db.session_scope() as session:
        charged = session.scalar(select(func.count()).select_from(UsageRecord).where(UsageRecord.job_id.in_(ids)))
    assert charged == len(ids)  # each batched job charged exactly once


def test_a_short_job_leaves_the_batch_before_a_long_one(batching_stack):
    base_url, headers, *_ = batching_stack
    long_id = submit(base_url, headers, {**BASE, "prompt": "Write a long essay about rivers.", "max_new_tokens": 80})
    wait_until_running(base_url, headers, long_id)
    short = run_alone(base_url, headers, {**BASE, "prompt": "Hello", "max_new_tokens": 3})
    long_job = requests.get(f"{base_url}/v1/jobs/{long_id}", headers=headers, timeout=10).json()
    assert short["status"] == "succeeded"
    assert long_job["status"] == "running", "the short job joined the running batch and left it first"
    assert wait_for_job(base_url, headers, long_id, timeout_s=240)["usage"]["completion_tokens"] == 80


def test_cancelling_one_job_leaves_the_rest_of_the_batch_running(batching_stack):
    base_url, headers, _db, _workdir, env, _worker = batching_stack
    bodies = [{**BASE, "prompt": f"Story number {n}:", "max_new_tokens": 40} for n in range(3)]
    ids = [submit(base_url, headers, body) for body in bodies]
    for job_id in ids:
        wait_until_running(base_url, headers, job_id)
    # Running means claimed; a claimed job may not have joined the batch yet on a busy machine.
    wait_until_streamed(redis.Redis.from_url(env["REDIS_URL"]), ids[1])
    cancelled = requests.post(f"{base_url}/v1/jobs/{ids[1]}/cancel", headers=headers, timeout=10)
    assert cancelled.status_code == 200
    jobs = [wait_for_job(base_url, headers, job_id, timeout_s=240) for job_id in ids]
    assert [job["status"] for job in jobs] == ["succeeded", "cancelled", "succeeded"]
    assert jobs[0]["usage"]["completion_tokens"] == jobs[2]["usage"]["completion_tokens"] == 40
    assert 0 < jobs[1]["usage"]["completion_tokens"] < 40  # charged for what it generated


def test_tokens_stream_live_and_the_stream_ends_with_the_job(batching_stack):
    base_url, headers, *_ = batching_stack
    body = {**BASE, "prompt": "The history of printing", "max_new_tokens": 24, "stream": True}
    arrivals: list[tuple[float, str, dict]] = []
    with requests.post(
        f"{base_url}/v1/generations", json=body, headers=headers, stream=True, timeout=(10, 120)
    ) as response:
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        event = None
        for line in response.iter_lines(decode_unicode=True):
            if line.startswith("event: "):
                event = line[len("event: ") :]
            elif line.startswith("data: "):
                arrivals.append((time.monotonic(), event, json.loads(line[len("data: ") :])))
    names = [name for _, name, _ in arrivals]
    assert names[-1] == "done" and names.count("done") == 1
    job = arrivals[-1][2]
    assert job["status"] == "succeeded"
    tokens = [(when, data) for when, name, data in arrivals if name == "token"]
    assert "".join(data["text"] for _, data in tokens) == job["result"]["text"]
    assert [i for _, data in tokens for i in data["token_ids"]] == job["result"]["token_ids"]
    # Live, not replayed at the end: the tokens arrived spread over the generation.
    assert len(tokens) > 5 and tokens[-1][0] - tokens[0][0] > 0.5
    # A client that connects late gets the whole stream replayed first.
    late = requests.get(
        f"{base_url}/v1/jobs/{job['id']}/events", headers={**headers, "Accept": "text/event-stream"}, timeout=30
    )
    assert "".join(json.loads(line[6:])["text"] for line in _token_lines(late.text)) == job["result"]["text"]


def test_a_killed_batching_worker_loses_no_job_and_charges_each_once(batching_stack):
    """Runs last: it kills the module's worker. Every job of the lost batch is retried elsewhere."""
    base_url, headers, db, workdir, env, worker = batching_stack
    ids = [submit(base_url, headers, {**BASE, "prompt": f"Chapter {n}.", "max_new_tokens": 30}) for n in range(4)]
    for job_id in ids:
        wait_until_running(base_url, headers, job_id)
    time.sleep(1.0)  # some tokens into the batch
    worker.stop(signal.SIGKILL)
    replacement = start_worker(env, workdir, DEFAULT_MODEL_ID, "worker-2", "generate", "--concurrency", "8")
    try:
        jobs = [wait_for_job(base_url, headers, job_id, timeout_s=240) for job_id in ids]
    finally:
        replacement.stop()
    assert [job["status"] for job in jobs] == ["succeeded"] * 4, jobs
    assert all(job["attempts"] == 2 for job in jobs)
    assert all(job["usage"]["completion_tokens"] == 30 for job in jobs)
    with db.session_scope() as session:
        charged = session.scalar(select(func.count()).select_from(UsageRecord).where(UsageRecord.job_id.in_(ids)))
    assert charged == 4


def _token_lines(text: str) -> list[str]:
    lines = text.splitlines()
    return [lines[i + 1] for i, line in enumerate(lines) if line == "event: token"]


def wait_until_streamed(client: redis.Redis, job_id: str, timeout_s: float = 120) -> None:
    """Wait until a running job has streamed its first token."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(entry["type"] == "token" for entry in token_stream.read_entries(client, job_id)):
            return
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} streamed no token within {timeout_s}s")


def wait_until_running(base_url: str, headers: dict, job_id: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = requests.get(f"{base_url}/v1/jobs/{job_id}", headers=headers, timeout=10).json()
        if job["status"] == "running":
            return
        assert job["status"] == "queued", job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not start within {timeout_s}s")
