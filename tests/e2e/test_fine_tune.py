"""LoRA fine-tuning through the real stack: upload, train on the CPU, serve the adapter by id,
cancel and kill mid-training. PostgreSQL, Redis, gateway and worker processes are all real."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import redis
import requests
from sqlalchemy import select

from shared.models import Adapter, Job, UsageRecord
from shared.registry import DEFAULT_MODEL_ID
from tests.e2e.conftest import StartedStack, StartStack
from tests.processes import Service, wait_for_job

pytestmark = pytest.mark.e2e

DATA = Path(__file__).parent.parent / "data"
FAST = {
    # Short enough for a kill to resolve in seconds, long enough for the GIL stalls of a
    # training set-up on 2 busy cores (loading a model copy, the first tokenizer load).
    "GEMMA_JOBS_LEASE_S": "8",
    "GEMMA_JOBS_CONTROL_POLL_S": "0.2",
    "GEMMA_JOBS_REAPER_INTERVAL_S": "0.5",
    "GEMMA_JOBS_LOG_FORMAT": "console",
}
# A few steps at a high rate: enough on 2 CPU cores to teach the rows' made-up facts.
HYPERPARAMETERS = {"max_steps": 8, "learning_rate": 2e-3, "batch_size": 3, "max_seq_length": 64, "lora_r": 8}
# A prompt from the training data: the adapter learned to answer "The secret word is zorblax."
SECRET = [{"role": "user", "content": "Tell me the secret word."}]


class FineTuneStack:
    """A gateway and workers on a fresh PostgreSQL database, with helpers for the HTTP API."""

    def __init__(self, started: StartedStack):
        self.started = started
        self.base_url = started.base_url
        self.db = started.db
        self.storage = Path(started.env["GEMMA_JOBS_DATA_DIR"])
        self.workers = started.workers  # the stack stops those still listed

    def start_worker(self, role: str = "all") -> Service:
        return self.started.start_worker(DEFAULT_MODEL_ID, role=role)

    def new_key(self) -> dict[str, str]:
        return self.started.new_key()

    def upload(self, headers: dict[str, str], name: str) -> str:
        with open(DATA / name, "rb") as handle:
            response = requests.post(
                f"{self.base_url}/v1/files",
                files={"file": (name, handle)},
                data={"purpose": "fine-tune"},
                headers=headers,
                timeout=30,
            )
        assert response.status_code == 201, response.text
        return response.json()["id"]

    def fine_tune(self, headers: dict[str, str], expect: int = 202, **body) -> dict:
        response = requests.post(f"{self.base_url}/v1/fine-tunes", json=body, headers=headers, timeout=30)
        assert response.status_code == expect, response.text
        return response.json()

    def generate(self, headers: dict[str, str], model: str, messages=SECRET) -> dict:
        body = {"model": model, "messages": messages, "max_new_tokens": 12, "temperature": 0}
        response = requests.post(f"{self.base_url}/v1/generations", json=body, headers=headers, timeout=30)
        assert response.status_code == 202, response.text
        return wait_for_job(self.base_url, headers, response.json()["id"], timeout_s=120)

    def events(self, headers: dict[str, str], job_id: str) -> list[dict]:
        response = requests.get(f"{self.base_url}/v1/jobs/{job_id}/events", headers=headers, timeout=10)
        assert response.status_code == 200, response.text
        return response.json()["data"]

    def wait_for_step(self, headers: dict[str, str], job_id: str, step: int, timeout_s: float = 180) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            job = requests.get(f"{self.base_url}/v1/jobs/{job_id}", headers=headers, timeout=10).json()
            assert job["status"] in ("queued", "running"), job
            if (job["progress"] or {}).get("step", 0) >= step:
                return job
            time.sleep(0.2)
        raise AssertionError(f"{job_id} never reached step {step}")

    def rows(self, model, job_id: str) -> list:
        with self.db.session_scope() as session:
            return list(session.scalars(select(model).where(model.job_id == job_id)))


@pytest.fixture(scope="module")
def ft(start_stack: StartStack, tmp_path_factory, postgres_admin_url):
    """A gateway and one worker on a fresh PostgreSQL database, for fine-tuning."""
    with start_stack(tmp_path_factory.mktemp("fine-tune"), postgres_admin_url, env_overrides=FAST) as started:
        stack = FineTuneStack(started)
        stack.start_worker()
        yield stack


def test_fine_tune_trains_registers_and_serves_an_adapter(ft):
    owner, other = ft.new_key(), ft.new_key()
    training, validation = ft.upload(owner, "fine_tune_train.jsonl"), ft.upload(owner, "fine_tune_validation.jsonl")
    base_before = ft.generate(owner, DEFAULT_MODEL_ID)
    assert base_before["status"] == "succeeded", base_before

    job = ft.fine_tune(
        owner,
        base_model=DEFAULT_MODEL_ID,
        training_file=training,
        validation_file=validation,
        hyperparameters=HYPERPARAMETERS,
        suffix="zorb",
    )
    assert job["kind"] == "fine_tune" and job["status"] == "queued"
    assert job["adapter_id"] is None  # carried on success (DESIGN.md)
    done = wait_for_job(ft.base_url, owner, job["id"], timeout_s=300)
    assert done["status"] == "succeeded", done
    adapter_id = done["adapter_id"]
    assert adapter_id.startswith("ft-zorb-")
    result = done["result"]
    assert result["adapter_id"] == adapter_id and result["steps"] == 8
    assert done["progress"]["step"] == done["progress"]["total_steps"] == 8

    # Every logging step is an event: the loss curve goes down, and validation loss is there.
    points = [event["data"] for event in ft.events(owner, job["id"]) if event["type"] == "progress"]
    losses = [point["loss"] for point in points if "loss" in point]
    assert len(losses) == 8
    assert losses[-1] < losses[0] / 2, losses
    assert any("eval_loss" in point for point in points)

    # Stored as adapter files under the data dir, registered once, charged once.
    (adapter,) = ft.rows(Adapter, job["id"])
    folder = ft.storage / adapter.path
    assert sorted(path.name for path in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    (usage,) = ft.rows(UsageRecord, job["id"])
    assert usage.train_tokens == result["train_tokens"] > 0 and usage.gpu_seconds > 0

    models = requests.get(f"{ft.base_url}/v1/models", headers=owner, timeout=10).json()["data"]
    listed = next(model for model in models if model["id"] == adapter_id)
    assert listed["kind"] == "adapter" and listed["base_model"] == DEFAULT_MODEL_ID
    assert adapter_id not in [m["id"] for m in requests.get(f"{ft.base_url}/v1/models", headers=other).json()["data"]]

    # The adapter really applies: greedy output on a training prompt changes to what it learned,
    # while the base model on the same worker still answers as before.
    tuned = ft.generate(owner, adapter_id)
    assert tuned["status"] == "succeeded", tuned
    assert tuned["result"]["text"] != base_before["result"]["text"]
    assert "zorblax" in tuned["result"]["text"].lower(), tuned["result"]["text"]
    assert tuned["adapter_id"] == adapter_id
    assert ft.generate(owner, DEFAULT_MODEL_ID)["result"]["text"] == base_before["result"]["text"]

    # Another key can neither use the adapter nor train on the owner's files.
    body = {"model": adapter_id, "messages": SECRET, "max_new_tokens": 4}
    response = requests.post(f"{ft.base_url}/v1/generations", json=body, headers=other, timeout=10)
    assert response.status_code == 404, response.text
    refused = ft.fine_tune(other, expect=422, base_model=DEFAULT_MODEL_ID, training_file=training)
    assert "training_file" in refused["error"]["message"]

    # Deleting the adapter: a job already queued for it fails clearly, later submits are 404.
    busy = requests.post(
        f"{ft.base_url}/v1/generations",
        json={"model": DEFAULT_MODEL_ID, "prompt": "Count: 1, 2, 3,", "max_new_tokens": 60, "temperature": 0},
        headers=owner,
        timeout=10,
    ).json()
    queued = requests.post(f"{ft.base_url}/v1/generations", json=body, headers=owner, timeout=10).json()
    deleted = requests.delete(f"{ft.base_url}/v1/models/{adapter_id}", headers=owner, timeout=10)
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    assert wait_for_job(ft.base_url, owner, busy["id"])["status"] == "succeeded"
    failed = wait_for_job(ft.base_url, owner, queued["id"])
    assert failed["status"] == "failed" and failed["error"]["code"] == "adapter_not_found", failed
    response = requests.post(f"{ft.base_url}/v1/generations", json=body, headers=owner, timeout=10)
    assert response.status_code == 404
    assert not folder.exists()
    assert requests.delete(f"{ft.base_url}/v1/models/{adapter_id}", headers=owner, timeout=10).status_code == 404


def test_qlora_on_a_cpu_worker_fails_clearly_and_the_worker_goes_on(ft):
    owner = ft.new_key()
    training = ft.upload(owner, "fine_tune_train.jsonl")
    job = ft.fine_tune(owner, base_model=DEFAULT_MODEL_ID, training_file=training, quantization="4bit")
    done = wait_for_job(ft.base_url, owner, job["id"])
    assert done["status"] == "failed"
    assert done["error"]["code"] == "quantization_unavailable"
    assert "CUDA" in done["error"]["message"]
    assert ft.rows(UsageRecord, job["id"]) == [] and ft.rows(Adapter, job["id"]) == []
    assert ft.generate(owner, DEFAULT_MODEL_ID)["status"] == "succeeded"


def test_cancel_stops_training_within_a_step_and_leaves_no_adapter(ft):
    owner = ft.new_key()
    training = ft.upload(owner, "fine_tune_train.jsonl")
    long_run = {**HYPERPARAMETERS, "max_steps": 500}
    job = ft.fine_tune(owner, base_model=DEFAULT_MODEL_ID, training_file=training, hyperparameters=long_run)
    ft.wait_for_step(owner, job["id"], 1)
    asked = time.monotonic()
    response = requests.post(f"{ft.base_url}/v1/jobs/{job['id']}/cancel", headers=owner, timeout=10)
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    # The worker notices within a poll interval and stops at the end of the current step.
    deadline = time.monotonic() + 60
    while not ft.rows(UsageRecord, job["id"]):
        assert time.monotonic() < deadline, "the cancelled run never stopped"
        time.sleep(0.2)
    stopped_s = time.monotonic() - asked
    assert stopped_s < 30, stopped_s
    (usage,) = ft.rows(UsageRecord, job["id"])
    assert usage.status == "cancelled" and usage.train_tokens > 0
    assert ft.rows(Adapter, job["id"]) == []
    with ft.db.session_scope() as session:
        adapter_id = session.get(Job, job["id"]).adapter_id
    assert not (ft.storage / "adapters" / adapter_id).exists()  # no attempt folder, nor an empty adapter folder
    assert requests.get(f"{ft.base_url}/v1/jobs/{job['id']}", headers=owner).json()["status"] == "cancelled"


def test_worker_killed_mid_training_retries_cleanly_elsewhere(ft):
    owner = ft.new_key()
    training = ft.upload(owner, "fine_tune_train.jsonl")
    ft.start_worker()  # a second worker to take the job over
    job = ft.fine_tune(
        owner, base_model=DEFAULT_MODEL_ID, training_file=training, hyperparameters={**HYPERPARAMETERS, "max_steps": 6}
    )
    ft.wait_for_step(owner, job["id"], 1)
    with ft.db.session_scope() as session:
        holder, adapter_id = session.get(Job, job["id"]).worker_id, session.get(Job, job["id"]).adapter_id
    victim = next(worker for worker in ft.workers if worker.pid == int(holder.split(":")[1]))
    victim.stop(signal.SIGKILL)
    ft.workers.remove(victim)
    partial = ft.storage / "adapters" / adapter_id / "attempt-1"

    done = wait_for_job(ft.base_url, owner, job["id"], timeout_s=300)
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 2
    (adapter,) = ft.rows(Adapter, job["id"])
    assert adapter.path.endswith("attempt-2")
    assert not partial.exists()
    (usage,) = ft.rows(UsageRecord, job["id"])
    assert usage.train_tokens == done["result"]["train_tokens"]
    events = ft.events(owner, job["id"])
    statuses = [e["data"].get("status") for e in events if e["type"] == "status"]
    assert statuses == ["running", "queued", "running", "succeeded"]
    # Each loss point names its attempt: the second attempt's curve starts again from its start.
    progress = [e["data"] for e in events if e["type"] == "progress"]
    assert {point["attempt"] for point in progress} <= {1, 2}
    second = [point["step"] for point in progress if point["attempt"] == 2]
    assert second and second == sorted(second)


def test_a_generate_only_worker_never_receives_fine_tunes(ft, redis_url):
    for worker in ft.workers:
        worker.stop()
    ft.workers.clear()
    ft.start_worker(role="generate")
    owner = ft.new_key()
    training = ft.upload(owner, "fine_tune_train.jsonl")
    job = ft.fine_tune(owner, base_model=DEFAULT_MODEL_ID, training_file=training, hyperparameters=HYPERPARAMETERS)
    # Generation is served at once, not stuck behind the fine-tune...
    assert ft.generate(owner, DEFAULT_MODEL_ID)["status"] == "succeeded"
    # ...and the fine-tune waits on its own queue for a worker that trains.
    time.sleep(1)
    assert requests.get(f"{ft.base_url}/v1/jobs/{job['id']}", headers=owner).json()["status"] == "queued"
    assert redis.Redis.from_url(redis_url).llen(f"fine_tune.{DEFAULT_MODEL_ID}") == 1


def test_a_fine_tune_waiting_for_the_training_slot_holds_no_thread(ft):
    """Two pool threads, one training: a second fine-tune waited for the slot in the other thread
    (holding its message, which the reaper then sent again), and generations found no thread."""
    for worker in list(ft.workers):
        worker.stop(signal.SIGTERM)
        ft.workers.remove(worker)
    ft.started.start_worker(DEFAULT_MODEL_ID, "--concurrency", "2", role="all")
    owner = ft.new_key()
    training = ft.upload(owner, "fine_tune_train.jsonl")
    long_run = {**HYPERPARAMETERS, "max_steps": 500}
    first = ft.fine_tune(owner, base_model=DEFAULT_MODEL_ID, training_file=training, hyperparameters=long_run)
    ft.wait_for_step(owner, first["id"], 1)
    second = ft.fine_tune(owner, base_model=DEFAULT_MODEL_ID, training_file=training, hyperparameters=HYPERPARAMETERS)
    time.sleep(2)  # its message reaches the worker while the first one trains
    generated = ft.generate(owner, DEFAULT_MODEL_ID)
    assert generated["status"] == "succeeded", generated
    assert requests.get(f"{ft.base_url}/v1/jobs/{first['id']}", headers=owner).json()["status"] == "running"
    assert requests.get(f"{ft.base_url}/v1/jobs/{second['id']}", headers=owner).json()["status"] == "queued"
    requests.post(f"{ft.base_url}/v1/jobs/{first['id']}/cancel", headers=owner, timeout=10)
    done = wait_for_job(ft.base_url, owner, second["id"], timeout_s=300)
    assert done["status"] == "succeeded" and done["attempts"] == 1, done
