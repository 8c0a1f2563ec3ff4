"""What an operator sees, from real worker processes: the worker registry, queue depths, the
waiting_for hint of a job no live worker can take, and `gemma-jobs status`."""

from __future__ import annotations

import io
import signal
import socket
import subprocess
import time

import psutil
import pytest
import redis
import requests

from services.domain.keys import create_key
from services.stack import free_port
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
    # Two gunicorn processes: /metrics must merge both.
    gateway, base_url = start_gateway(env, tmp_path, workers=2)
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

        def worker(self, models: str, role: str = "all", *extra: str):
            service = start_worker(env, tmp_path, models, f"worker-{len(started) + 1}", role, *extra)
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
                worker = next(w for w in self.get("/v1/admin/workers?include_gone=true")["data"] if w["pid"] == pid)
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


def metric(text: str, name: str, **labels: str) -> float:
    """Return one sample's value from a Prometheus text page (0 when absent)."""
    wanted = ",".join(f'{key}="{value}"' for key, value in labels.items())
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        if series == (f"{name}{{{wanted}}}" if labels else name):
            return float(value)
    return 0.0


def test_registry_queues_waiting_hint_status_and_metrics(ops):
    # A worker that can load none of its models would take no job: it says why and exits.
    useless = subprocess.run([*CLI, "worker", "--device", "cpu", "--models", "broken-model"],
                             env=ops.env, capture_output=True, text=True, timeout=180)
    assert useless.returncode == 1, useless.stderr[-2000:]
    assert "no model of --models could be loaded (broken-model" in useless.stderr
    assert ops.get("/v1/admin/workers")["data"] == []  # live workers only
    (gone,) = ops.get("/v1/admin/workers?include_gone=true")["data"]
    assert (gone["state"], gone["alive"]) == ("stopped", False)
    # A weights file cut short is a model it cannot load too (it raised past the check, and the
    # worker hung for ever on its result writer, shown alive and starting).
    corrupt = subprocess.run([*CLI, "worker", "--device", "cpu", "--models", "corrupt-model"],
                             env=ops.env, capture_output=True, text=True, timeout=120)
    assert corrupt.returncode == 1 and "no model of --models could be loaded (corrupt-model" in corrupt.stderr
    # So does any other start-up failure: here its metrics port is taken.
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        blocked = subprocess.run([*CLI, "worker", "--device", "cpu", "--models", DEFAULT_MODEL_ID,
                                  "--metrics-port", str(port)], env=ops.env, capture_output=True, text=True,
                                 timeout=120)
    assert blocked.returncode == 1 and "Address already in use" in blocked.stderr
    assert f"--metrics-port {port}" in blocked.stderr and "Traceback" not in blocked.stderr
    assert ops.get("/v1/admin/workers")["data"] == []

    metrics_port = free_port()
    worker = ops.worker(f"{DEFAULT_MODEL_ID},broken-model", "generate", "--metrics-port", str(metrics_port))
    listed = ops.wait_worker(worker.pid, state="ready", alive=True)
    assert listed["role"] == "generate" and listed["device"] == "cpu"
    # broken-model failed to load: the worker leaves its queue to workers that can load it.
    assert listed["models"] == [DEFAULT_MODEL_ID]
    assert listed["queues"] == [f"generation.{DEFAULT_MODEL_ID}"]
    assert requests.get(f"{ops.base_url}/v1/admin/workers", headers=ops.user).status_code == 403

    assert wait_for_job(ops.base_url, ops.user, ops.submit(SHORT))["status"] == "succeeded"
    failed = wait_for_job(ops.base_url, ops.user, ops.submit({**SHORT, "max_new_tokens": 64, "timeout_s": 0.001}))
    assert failed["error"]["code"] == "timeout"
    ops.wait_worker(worker.pid, jobs_done=2, jobs_in_flight=0)
    unserved = ops.submit({**SHORT, "model": "broken-model"})
    shown = ops.get(f"/v1/jobs/{unserved}", headers=ops.user)
    assert shown["status"] == "queued" and "generation jobs for broken-model" in shown["waiting_for"]
    assert requests.post(f"{ops.base_url}/v1/jobs/{unserved}/cancel", headers=ops.user, timeout=10).ok

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
    assert failed["id"] in status.stdout and "timeout" in status.stdout

    # Metrics: the gateway's merged over its two processes, the worker's on its own port.
    for _ in range(10):
        assert requests.get(f"{ops.base_url}/healthz", timeout=5).status_code == 200
    page = requests.get(f"{ops.base_url}/metrics", timeout=10).text
    assert metric(page, "gemma_jobs_http_requests_total", method="GET", route="/healthz", status="200") == 10
    assert metric(page, "gemma_jobs_http_requests_total", method="POST", route="/v1/generations", status="202") == 3
    assert metric(page, "gemma_jobs_http_request_duration_seconds_count", method="POST", route="/v1/generations") == 3
    assert metric(page, "gemma_jobs_jobs_submitted_total", kind="generation", model=DEFAULT_MODEL_ID) == 2
    assert metric(page, "gemma_jobs_jobs_submitted_total", kind="generation", model="broken-model") == 1
    assert metric(page, "gemma_jobs_jobs_submitted_total", kind="fine_tune", model=DEFAULT_MODEL_ID) == 1
    assert metric(page, "gemma_jobs_queue_depth", queue=f"fine_tune.{DEFAULT_MODEL_ID}") == 1
    ended = {"kind": "generation", "model": DEFAULT_MODEL_ID}
    assert metric(page, "gemma_jobs_jobs_finished_total", **ended, status="succeeded") == 1
    assert metric(page, "gemma_jobs_jobs_finished_total", **ended, status="failed") == 1
    assert metric(page, "gemma_jobs_jobs_finished_total", **{**ended, "model": "broken-model"}, status="cancelled") == 1
    worker_page = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    # Loopback only, without --metrics-host (prometheus_client's default is every interface).
    listening = {(c.laddr.ip, c.laddr.port) for c in psutil.Process(worker.pid).net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN}
    assert ("127.0.0.1", metrics_port) in listening and ("0.0.0.0", metrics_port) not in listening
    assert metric(worker_page, "gemma_jobs_worker_job_duration_seconds_count", kind="generation") == 2
    assert metric(worker_page, "gemma_jobs_worker_tokens_generated_total", model=DEFAULT_MODEL_ID) > 0
    waits = metric(worker_page, "gemma_jobs_worker_queue_wait_seconds_count", kind="generation", model=DEFAULT_MODEL_ID)
    assert waits == 2
    assert metric(worker_page, "gemma_jobs_worker_model_load_seconds", model=DEFAULT_MODEL_ID) > 0

    # SIGTERM: the worker drains and records itself stopped; SIGKILL: it goes silent and is shown dead.
    worker.stop(signal.SIGTERM)
    ops.wait_worker(worker.pid, state="stopped", alive=False)
    killed = ops.worker(DEFAULT_MODEL_ID, role="generate")
    ops.wait_worker(killed.pid, state="ready", alive=True)
    killed.stop(signal.SIGKILL)
    ops.wait_worker(killed.pid, state="ready", alive=False)
    waiting = requests.get(f"{ops.base_url}/v1/jobs/{ops.submit(SHORT)}", headers=ops.user, timeout=10).json()
    assert f"generation jobs for {DEFAULT_MODEL_ID}" in waiting["waiting_for"]
