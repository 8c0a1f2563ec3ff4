"""HTTP job in, Gemma output out: real gateway, Redis, worker and model, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import requests

from shared.registry import DEFAULT_MODEL_ID
from tests.processes import wait_for_job

pytestmark = pytest.mark.e2e

PROMPT = "The three most useful things to know about job queues are"
CHAT = [
    {"role": "system", "content": "Answer in one short sentence."},
    {"role": "user", "content": "What is a GPU?"},
]
# What the service renders CHAT to, written out independently of workers.prompts.
CHAT_TEXT = (
    "<start_of_turn>user\nAnswer in one short sentence.\n\nWhat is a GPU?<end_of_turn>\n"
    "<start_of_turn>model\n"
)
NEW_TOKENS = 24
END_OF_TURN_IDS = [1, 106]  # <eos> and <end_of_turn>: the service stops at either


@pytest.fixture(scope="session")
def reference(model_cache_dir: Path):
    """transformers `generate` called directly on the same cached weights, same dtype."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = model_cache_dir / DEFAULT_MODEL_ID
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()

    def greedy(text: str, max_new_tokens: int = NEW_TOKENS) -> tuple[list[int], list[int]]:
        input_ids = tokenizer(text, return_tensors="pt").input_ids
        with torch.inference_mode():
            output = model.generate(
                input_ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=END_OF_TURN_IDS
            )
        return input_ids[0].tolist(), output[0, input_ids.shape[1]:].tolist()

    greedy.tokenizer = tokenizer
    return greedy


def post(stack, headers, body, **extra_headers):
    return requests.post(f"{stack.base_url}/v1/generations", json=body, headers={**headers, **extra_headers}, timeout=90)


def test_greedy_prompt_is_token_identical_to_generate(stack, reference):
    headers = stack.new_key()
    body = {"model": DEFAULT_MODEL_ID, "prompt": PROMPT, "max_new_tokens": NEW_TOKENS, "temperature": 0}
    job = wait_for_job(stack.base_url, headers, post(stack, headers, body).json()["id"])
    assert job["status"] == "succeeded", job
    prompt_ids, expected = reference(PROMPT)
    assert job["result"]["token_ids"] == expected
    assert job["result"]["text"] == reference.tokenizer.decode(expected, skip_special_tokens=True)
    assert job["result"]["finish_reason"] == "length"
    assert job["usage"]["prompt_tokens"] == len(prompt_ids)
    assert job["usage"]["completion_tokens"] == NEW_TOKENS
    assert job["usage"]["gpu_seconds"] > 0
    assert job["attempts"] == 1
    assert job["started_at"] <= job["finished_at"]


def test_greedy_chat_uses_gemma_turns_and_matches_generate(stack, reference):
    headers = stack.new_key()
    body = {"model": DEFAULT_MODEL_ID, "messages": CHAT, "max_new_tokens": NEW_TOKENS, "temperature": 0}
    response = post(stack, headers, body, Prefer="wait=60")
    # Prefer: wait holds the request until the job finishes (woken by pub/sub).
    assert response.status_code == 200
    job = response.json()
    assert job["status"] == "succeeded", job
    prompt_ids, expected = reference(CHAT_TEXT)
    assert job["result"]["token_ids"] == expected
    assert job["usage"]["prompt_tokens"] == len(prompt_ids)


def test_stop_string_cuts_the_text(stack, reference):
    _, expected = reference(PROMPT)
    full_text = reference.tokenizer.decode(expected, skip_special_tokens=True)
    # A word from the middle of the greedy output, so the cut is known in advance.
    stop = full_text.split()[len(full_text.split()) // 2]
    headers = stack.new_key()
    body = {"model": DEFAULT_MODEL_ID, "prompt": PROMPT, "max_new_tokens": NEW_TOKENS, "temperature": 0, "stop": [stop]}
    job = post(stack, headers, body, Prefer="wait=60").json()
    assert job["status"] == "succeeded", job
    assert job["result"]["finish_reason"] == "stop"
    assert job["result"]["text"] == full_text[: full_text.index(stop)]
    assert job["usage"]["completion_tokens"] < NEW_TOKENS


def test_seeded_sampling_repeats_and_seeds_differ(stack):
    headers = stack.new_key()
    body = {"model": DEFAULT_MODEL_ID, "prompt": PROMPT, "max_new_tokens": 16, "temperature": 1.2, "top_k": 50, "top_p": 0.95}
    texts = [
        post(stack, headers, {**body, "seed": seed}, Prefer="wait=60").json()["result"]["token_ids"]
        for seed in (7, 7, 8)
    ]
    assert texts[0] == texts[1]
    assert texts[0] != texts[2]


def test_failing_jobs_record_a_clear_error_and_the_worker_keeps_serving(stack):
    headers = stack.new_key()
    # The worker could not load broken-model, so it does not take its jobs (a worker that can
    # may): the job waits and says what for, rather than fail on the first worker that has it.
    broken = post(stack, headers, {"model": "broken-model", "prompt": "hi"}).json()
    assert broken["status"] == "queued"
    assert "no live worker serves generation jobs for broken-model" in broken["waiting_for"]
    assert requests.post(f"{stack.base_url}/v1/jobs/{broken['id']}/cancel", headers=headers, timeout=10).ok
    # The gateway reads the model's tokenizer from the shared cache and refuses at submit.
    too_long = post(stack, headers, {"model": "gemma-3-270m-short", "prompt": "word " * 80, "max_new_tokens": 8})
    assert too_long.status_code == 422
    assert "context of 64 tokens" in too_long.json()["error"]["message"]
    after = post(stack, headers, {"model": DEFAULT_MODEL_ID, "prompt": "Hi", "max_new_tokens": 4}, Prefer="wait=60").json()
    assert after["status"] == "succeeded"


def test_concurrent_submissions_all_finish_once(stack):
    headers = stack.new_key()
    body = {"model": DEFAULT_MODEL_ID, "prompt": "Count: one, two,", "max_new_tokens": 4, "temperature": 0}
    ids = [post(stack, headers, body).json()["id"] for _ in range(6)]
    jobs = [wait_for_job(stack.base_url, headers, job_id) for job_id in ids]
    assert {job["status"] for job in jobs} == {"succeeded"}
    assert len({tuple(job["result"]["token_ids"]) for job in jobs}) == 1  # greedy: same output
    listed = requests.get(f"{stack.base_url}/v1/jobs?limit=100", headers=headers, timeout=10).json()
    assert [job["id"] for job in listed["data"]] == list(reversed(ids))
    assert all(job["attempts"] == 1 for job in listed["data"])


def test_every_log_line_is_json_and_a_worker_s_job_lines_name_it(stack):
    """transformers' progress bar and Python's warnings were bare text in the worker's log, and
    the lines of its task threads (`--concurrency` > 1) had no `worker_id`."""
    headers = stack.new_key()
    body = {"model": DEFAULT_MODEL_ID, "prompt": "Hi", "max_new_tokens": 2}
    assert post(stack, headers, body, Prefer="wait=60").json()["status"] == "succeeded"
    worker_lines = [json.loads(line) for line in stack.worker.log().splitlines()]
    gateway_lines = [json.loads(line) for line in stack.gateway.log().splitlines()]
    started = [line for line in worker_lines if line["event"] == "job_started"]
    assert started and all(line["process"] == "worker" and line["worker_id"] for line in started)
    assert all(line["process"] == "gateway" for line in gateway_lines)


def test_another_key_cannot_see_a_job(stack):
    owner, stranger = stack.new_key(), stack.new_key()
    job_id = post(stack, owner, {"model": DEFAULT_MODEL_ID, "prompt": "Hi", "max_new_tokens": 2}).json()["id"]
    response = requests.get(f"{stack.base_url}/v1/jobs/{job_id}", headers=stranger, timeout=10)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_gateway_processes_never_load_torch(stack):
    """Neither the gunicorn master nor its workers map any torch library."""
    import psutil

    master = psutil.Process(stack.gateway.pid)
    processes = [master, *master.children(recursive=True)]
    assert len(processes) >= 2
    for process in processes:
        maps = Path(f"/proc/{process.pid}/maps").read_text()
        assert "torch" not in maps, process.cmdline()
    # and the worker does (the check would catch it)
    assert "libtorch" in Path(f"/proc/{stack.worker.pid}/maps").read_text()


def test_prefer_wait_answers_as_soon_as_the_job_ends(stack):
    headers = stack.new_key()
    started = time.monotonic()
    response = post(stack, headers, {"model": DEFAULT_MODEL_ID, "prompt": "Hi", "max_new_tokens": 2}, Prefer="wait=60")
    assert response.status_code == 200
    assert response.headers["Preference-Applied"] == "wait=60"
    assert time.monotonic() - started < 30


def test_the_worker_checks_the_context_where_the_gateway_could_not(model_cache_dir):
    """The backstop for prompts the gateway could only estimate."""
    import torch

    from shared.registry import ModelEntry
    from workers.batch_engine import generate_alone
    from workers.generation import GenerationError
    from workers.model_loader import load_model

    entry = ModelEntry(id="short", path=model_cache_dir / DEFAULT_MODEL_ID, context_length=64)
    loaded = load_model(entry, model_cache_dir, torch.device("cpu"))
    with pytest.raises(GenerationError) as failure:
        generate_alone(loaded, {"prompt": "word " * 80, "max_new_tokens": 8, "temperature": 0})
    assert failure.value.code == "context_length_exceeded"
    assert "context of 64 tokens" in failure.value.message
    output = generate_alone(loaded, {"prompt": "word " * 20, "max_new_tokens": 2, "temperature": 0})
    assert output.completion_tokens == 2


def test_a_context_length_over_the_models_positions_is_refused_at_load(model_cache_dir):
    """The gateway admits prompts by the registry's context_length: it must fit the model."""
    import torch

    from shared.registry import ModelEntry
    from workers.model_loader import ModelUnavailable, load_model

    entry = ModelEntry(id="too-long", path=model_cache_dir / DEFAULT_MODEL_ID, context_length=65536)
    with pytest.raises(ModelUnavailable) as refused:
        load_model(entry, model_cache_dir, torch.device("cpu"))
    assert "context_length 65536" in str(refused.value) and "max_position_embeddings of 32768" in str(refused.value)
