"""Token-stream writes batched per engine step, on the real model and a real Redis: each step's
new text reaches every job's stream in one round trip, before any job is handed back, and a
Redis failure stops only the streams (never the generations)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import redis
import torch

from shared import token_stream
from shared.ids import new_id
from shared.registry import DEFAULT_MODEL_ID, ModelRegistry
from workers.batch_engine import BatchEngine, generate_alone
from workers.model_loader import load_model
from workers.token_publisher import StepWrites, TokenPublisher

pytestmark = pytest.mark.e2e

PROMPTS = ["The capital of France is", "Write a list of fruits:", "Once upon a time"]


@pytest.fixture(scope="module")
def loaded(model_cache_dir: Path):
    # fp32, as CPU workers batch: a row's output is then the same as the job run alone.
    entry = ModelRegistry.load(None).get(DEFAULT_MODEL_ID)
    return load_model(entry, model_cache_dir, torch.device("cpu"), torch.float32)


def _streamed_text(client: redis.Redis, job_id: str) -> str:
    return "".join(e["text"] for e in token_stream.read_entries(client, job_id) if e["type"] == "token")


def _start(engine: BatchEngine, client: redis.Redis, prompt: str, max_new_tokens: int):
    job_id = new_id("job")
    publisher = TokenPublisher(client, engine.loaded.tokenizer, job_id, 1, [], step_writes=engine.step_writes)
    params = {"prompt": prompt, "max_new_tokens": max_new_tokens, "temperature": 0}
    return job_id, publisher, engine.submit(params, on_tokens=publisher.update)


def test_each_step_reaches_every_stream_and_a_job_is_handed_back_after_its_writes(loaded, redis_client):
    engine = BatchEngine(loaded, max_batch=4, step_writes=StepWrites(redis_client))
    jobs = [_start(engine, redis_client, prompt, n) for prompt, n in zip(PROMPTS, (3, 12, 12))]
    seen_at_handback = {}

    def wait_for(job_id, sequence, publisher):
        sequence.result()  # woken by the engine: what the job thread would write next is its final text
        seen_at_handback[job_id] = (_streamed_text(redis_client, job_id), publisher.text[: publisher.sent_chars])

    waiters = [threading.Thread(target=wait_for, args=(job_id, s, p)) for job_id, p, s in jobs]
    for waiter in waiters:
        waiter.start()
    while any(not sequence.done.is_set() for _, _, sequence in jobs):
        engine.step()
        assert engine.step_writes._pending == []  # nothing is left for a later step
        for job_id, publisher, _ in jobs:
            assert _streamed_text(redis_client, job_id) == publisher.text[: publisher.sent_chars]
    for waiter in waiters:
        waiter.join(timeout=30)

    for job_id, publisher, sequence in jobs:
        streamed, sent = seen_at_handback[job_id]
        assert streamed == sent and sent, "a job was handed back before its stream writes were sent"
        output = sequence.result()
        publisher.finish(output.text, output.token_ids)
        assert _streamed_text(redis_client, job_id) == output.text
        # The attempt's start went out once, with the first text, before it.
        types = [entry["type"] for entry in token_stream.read_entries(redis_client, job_id)]
        assert types[0] == "attempt" and types.count("attempt") == 1 and set(types[1:]) == {"token"}
        assert output.text == generate_alone(loaded, sequence.params).text  # streaming changes no token


def test_an_attempt_that_streamed_nothing_still_marks_its_start(redis_client):
    job_id = new_id("job")
    token_stream.append_tokens(redis_client, job_id, 1, "text of attempt 1", [1, 2])
    publisher = TokenPublisher(redis_client, None, job_id, 2, [])
    assert token_stream.read_entries(redis_client, job_id)[-1]["attempt"] == 1  # nothing written yet
    publisher.finish("", [])
    publisher.finish("", [])  # once only
    entries = token_stream.read_entries(redis_client, job_id)
    assert [(entry["type"], entry["attempt"]) for entry in entries] == [("token", 1), ("attempt", 2)]


def test_a_redis_failure_stops_the_streams_of_that_step_but_not_the_generations(loaded, redis_client):
    unreachable = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    engine = BatchEngine(loaded, max_batch=4, step_writes=StepWrites(unreachable))
    jobs = [_start(engine, redis_client, prompt, 6) for prompt in PROMPTS[:2]]
    while any(not sequence.done.is_set() for _, _, sequence in jobs):
        engine.step()
    for job_id, publisher, sequence in jobs:
        assert publisher.failed
        output = sequence.result()
        assert output.text == generate_alone(loaded, sequence.params).text
        publisher.finish(output.text, output.token_ids)  # a stopped stream takes no more text
        entries = token_stream.read_entries(redis_client, job_id)
        assert entries == []  # its start was to go with its first text, which never reached Redis
