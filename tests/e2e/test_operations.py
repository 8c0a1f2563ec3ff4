"""What an operator sees, from real worker processes: the worker registry, queue depths, the
waiting_for hint of a job no live worker can take, and `gemma-jobs status`."""

from __future__ import annotations

import io
import signal
import subprocess
import time

import pytest
import redis
import requests

from services.domain.keys import create_key
from shared.db import Database
from shared.migrate import upgrade
from shared.registry import DEFAULT_MODEL_ID
from tests.conftest import fresh_postgres_database
from tests.e2e.conftest import stack_env
from tests.processes import CLI, start_gateway, start_worker, wait_for_job

pytestmark = pytest.mark.e2e

FAST = {"GEMMA_JOBS_WORKER_HEARTBEAT_S": "0.5", "GEMMA_JOBS_WORKER_DEAD_AFTER_S": "3"}
SHORT = {"model": DEFAULT_MODEL_ID, "prompt": "Hello", "max_new_tokens": 2, "temperature": 0}


@pytest.fixture()
def ops(redis_url, model_cache_dir, registry_file, tmp_path, postgres_admin_url):
    database_url, drop = fresh_postgres_database(postgres_admin_url)
    upgrade(database_url)
    redis.Redis.from_url(redis_url).flushdb()
    env = {**stack_env(database_url, redis_url, tmp_path / "var", model_cache_dir, registry_file), **FAST}
    gateway, base_url = start_gateway(env, tmp_path)
    db = Database(database_url)
    with db.session_scope() as session:
        _, admin = create_key(session, role="admin")
        _, user = create_key(session, role="user")
    started = []

    class Ops:
        """The running gateway, its keys, and workers started by the test."""

        def __init__(self):
            self.env, self.base_url, self.tmp_path = env, base_url, tmp_path
            self.admin = {"Authorization": f"Bearer {admin}"}
            self.user = {"Authorization": f"Bearer {user}"}

        def worker(self, models: str, role: str = "all"):
            service = start_worker(env, tmp_path, models=models, name=f"worker-{len(started) + 1}", role=role)
            started.append(service)
            return service

        def get(self, path: str, headers=None) -> dict:
            response = requests.get(f"{base_url}{path}", headers=headers or self.admin, timeout=10)
            assert response.status_code == 200, response.text
            return response.json()

        def submit(self, body: dict) -> str:
            response = requests.post(f"{base_url}/v1/generations", json=body, headers=self.user, timeout=10)
            assert response.status_code == 202, response.text
            return response.json()["id"]

        def wait_worker(self, pid: int, **expected) -> dict:
            deadline = time.monotonic() + 15
            while True:
                worker = next(w for w in self.get("/v1/admin/workers")["data"] if w["pid"] == pid)
                if all(worker[key] == value for key, value in expected.items()):
                    return worker
                assert time.monotonic() < deadline, (expected, worker)
                time.sleep(0.2)

    yield Ops()
    for service in started:
        service.stop(signal.SIGKILL)
    gateway.stop()
    db.dispose()
    drop()


def test_registry_queues_waiting_hint_and_status(ops):
    worker = ops.worker(f"{DEFAULT_MODEL_ID},broken-model", role="generate")
    listed = ops.wait_worker(worker.pid, state="ready", alive=True)
    assert listed["role"] == "generate" and listed["device"] == "cpu"
    assert listed["models"] == [DEFAULT_MODEL_ID]  # broken-model failed to load
    assert sorted(listed["queues"]) == ["generation.broken-model", f"generation.{DEFAULT_MODEL_ID}"]
    assert requests.get(f"{ops.base_url}/v1/admin/workers", headers=ops.user).status_code == 403

    assert wait_for_job(ops.base_url, ops.user, ops.submit(SHORT))["status"] == "succeeded"
    failed = wait_for_job(ops.base_url, ops.user, ops.submit({**SHORT, "model": "broken-model"}))
    assert failed["error"]["code"] == "model_unavailable"
    ops.wait_worker(worker.pid, jobs_done=2, jobs_in_flight=0)

    # No live worker takes fine-tunes: the job stays queued and says what it waits for.
    upload = requests.post(
        f"{ops.base_url}/v1/files",
        files={"file": ("t.jsonl", io.BytesIO(b'{"prompt": "a", "completion": "b"}\n'))},
        data={"purpose": "fine-tune"},
        headers=ops.user,
        timeout=10,
    ).json()
    response = requests.post(
        f"{ops.base_url}/v1/fine-tunes",
        json={"base_model": DEFAULT_MODEL_ID, "training_file": upload["id"]},
        headers=ops.user,
        timeout=10,
    )
    fine_tune = response.json()
    assert fine_tune["status"] == "queued" and fine_tune["queue_position"] == 0
    assert f"fine_tune jobs for {DEFAULT_MODEL_ID}" in fine_tune["waiting_for"]
    queues = {queue["name"]: queue for queue in ops.get("/v1/admin/queues")["data"]}
    assert queues[f"fine_tune.{DEFAULT_MODEL_ID}"]["queued"] == 1
    assert queues[f"fine_tune.{DEFAULT_MODEL_ID}"]["live_workers"] == 0
    assert queues[f"fine_tune.{DEFAULT_MODEL_ID}"]["oldest_wait_s"] >= 0
    generation = queues[f"generation.{DEFAULT_MODEL_ID}"]
    assert generation["queued"] == 0 and generation["live_workers"] == 1

    status = subprocess.run([*CLI, "status"], env=ops.env, capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    assert "WORKERS (1 live)" in status.stdout and f"{worker.pid}" in status.stdout
    assert f"fine_tune.{DEFAULT_MODEL_ID}" in status.stdout
    assert failed["id"] in status.stdout and "model_unavailable" in status.stdout

    # SIGTERM: the worker drains and records itself stopped; SIGKILL: it goes silent and is shown dead.
    worker.stop(signal.SIGTERM)
    ops.wait_worker(worker.pid, state="stopped", alive=False)
    killed = ops.worker(DEFAULT_MODEL_ID, role="generate")
    ops.wait_worker(killed.pid, state="ready", alive=True)
    killed.stop(signal.SIGKILL)
    ops.wait_worker(killed.pid, state="ready", alive=False)
    waiting = requests.get(f"{ops.base_url}/v1/jobs/{ops.submit(SHORT)}", headers=ops.user, timeout=10).json()
    assert f"generation jobs for {DEFAULT_MODEL_ID}" in waiting["waiting_for"]
