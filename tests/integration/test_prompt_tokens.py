"""Prompt tokens at submit: counted exactly with the model's tokenizer (no torch in the
gateway), checked against the model's context, and reserved against the token budget.

By default ("auto") the ~100 MB tokenizer is loaded only for a prompt that might not fit the
context; shorter prompts reserve an estimate, which the worker settles to the real count."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from services.domain.keys import create_key
from services.domain.token_counter import TokenCounter, prompt_token_bound
from services.gateway import create_app
from shared.ids import new_id
from shared.jobs import JobKind
from shared.models import Adapter, Job, utcnow
from shared.registry import DEFAULT_MODEL_ID, ModelRegistry
from shared.schemas import GenerationRequest
from shared.settings import load_settings
from tests.integration.helpers import assert_error, make_key

OVER_64 = "word " * 80  # 82 tokens with BOS


def set_counting(app, mode) -> None:
    """Switch the app's GEMMA_JOBS_GATEWAY_COUNT_TOKENS."""
    context = app.extensions["gemma_jobs"]
    context.settings = context.settings.model_copy(update={"gateway_count_tokens": mode})


def post_with_tpm(app, body: dict, tpm: int = 1000):
    """Submit with a fresh key that has a token budget; return the response."""
    with app.extensions["gemma_jobs"].db.session_scope() as session:
        _, key = create_key(session, role="user", tpm=tpm)
    return app.test_client().post("/v1/generations", json=body, headers={"Authorization": f"Bearer {key}"})


@pytest.fixture()
def counting_app(settings, redis_client, model_cache_dir, tmp_path):
    registry = tmp_path / "models.json"
    registry.write_text(json.dumps({"models": [
        {"id": "gemma-3-270m-short", "path": str(model_cache_dir / DEFAULT_MODEL_ID), "context_length": 64},
    ]}))
    app = create_app(settings.model_copy(update={"model_cache_dir": model_cache_dir, "model_registry": registry}))
    yield app
    app.extensions["gemma_jobs"].db.dispose()


def test_counts_match_the_worker_s_tokenization(counting_app, model_cache_dir):
    from transformers import AutoTokenizer

    from workers.prompts import input_ids_for

    tokenizer = AutoTokenizer.from_pretrained(model_cache_dir / DEFAULT_MODEL_ID)
    counter = counting_app.extensions["gemma_jobs"].token_counter
    for body in (
        {"prompt": "The capital of France is"},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]},
    ):
        request = GenerationRequest(model=DEFAULT_MODEL_ID, **body)
        assert counter.count(request) == len(input_ids_for(tokenizer, request.model_dump()))


def test_the_bound_is_never_below_the_exact_count(model_cache_dir):
    counter = TokenCounter(ModelRegistry.load(None), model_cache_dir)
    texts = [" ", "\n\n\t  ", "The capital of France is", "日本語のテキスト", "🙂🤖" * 20, "\x01\x7f\u200b\ufeff",
             "<start_of_turn><end_of_turn><bos>", "1234567890" * 10, "ǅ\u0301 \U0010fffd", OVER_64]
    requests = [GenerationRequest(model=DEFAULT_MODEL_ID, prompt=text) for text in texts]
    requests += [GenerationRequest(model=DEFAULT_MODEL_ID, messages=[
        {"role": "system", "content": text}, {"role": "user", "content": text}]) for text in texts]
    for request in requests:
        assert counter.count(request) <= prompt_token_bound(request), request


@pytest.mark.parametrize("mode", ["auto", True])
def test_a_prompt_over_the_context_is_422_with_the_limit_named(counting_app, mode):
    set_counting(counting_app, mode)
    client = counting_app.test_client()
    headers = {"Authorization": f"Bearer {make_key(counting_app)}"}
    body = {"model": "gemma-3-270m-short", "prompt": OVER_64, "max_new_tokens": 8}
    error = assert_error(client.post("/v1/generations", json=body, headers=headers), 422, "invalid_field")
    assert "the prompt is 82 tokens" in error["message"] and "context of 64 tokens" in error["message"]
    assert error["details"][0]["field"] == "prompt"
    messages = [{"role": "user", "content": "word " * 30}]
    chat = {"model": "gemma-3-270m-short", "messages": messages, "max_new_tokens": 30}
    error = assert_error(client.post("/v1/generations", json=chat, headers=headers), 422, "invalid_field")
    assert "the prompt is 40 tokens" in error["message"] and error["details"][0]["field"] == "messages"
    # 22 tokens + 8 fit, though the byte bound (101 + 8) did not: counted, not guessed.
    fits = {"model": "gemma-3-270m-short", "prompt": "word " * 20, "max_new_tokens": 8}
    assert client.post("/v1/generations", json=fits, headers=headers).status_code == 202


@pytest.mark.parametrize("limits", [{}, {"tpm": 1000}])  # a submit without limits, and one admitted
def test_an_adapters_prompt_over_its_base_models_context_is_422(counting_app, limits):
    """An adapter's prompt is counted on its base model: it was let through (202), and failed in the worker."""
    with counting_app.extensions["gemma_jobs"].db.session_scope() as session:
        key, plaintext = create_key(session, role="user", **limits)
        job = Job(id=new_id("job"), owner_key_id=key.id, kind=JobKind.FINE_TUNE, model="gemma-3-270m-short",
                  queue="fine_tune.gemma-3-270m-short", status="succeeded", params={}, enqueued_at=utcnow())
        session.add(job)
        session.flush()
        adapter_id = f"ft-short-{key.id[-8:]}"
        session.add(Adapter(id=adapter_id, owner_key_id=key.id, base_model="gemma-3-270m-short", job_id=job.id,
                            path=f"adapters/{adapter_id}", hyperparameters={}, metrics={}, size_bytes=10))
    headers = {"Authorization": f"Bearer {plaintext}"}
    body = {"model": adapter_id, "prompt": OVER_64, "max_new_tokens": 8}
    error = assert_error(counting_app.test_client().post("/v1/generations", json=body, headers=headers), 422,
                         "invalid_field")
    assert "the prompt is 82 tokens" in error["message"] and "context of 64 tokens" in error["message"]


def test_by_default_a_short_prompt_reserves_an_estimate_without_loading_the_tokenizer(counting_app):
    counter = counting_app.extensions["gemma_jobs"].token_counter
    body = {"model": DEFAULT_MODEL_ID, "prompt": "The capital of France is", "max_new_tokens": 10}
    response = post_with_tpm(counting_app, body)
    assert response.status_code == 202
    assert not counter.is_loaded(DEFAULT_MODEL_ID)
    # ceil(24 characters / 4) + 1 = 7 estimated prompt tokens + 10 new tokens reserved.
    assert re.search(r'"tokens";r=983;', response.headers["RateLimit"])


def test_by_default_once_a_long_prompt_loaded_the_tokenizer_every_prompt_is_counted(counting_app):
    counter = counting_app.extensions["gemma_jobs"].token_counter
    # 35,000 bytes might not fit a 32,768-token context; 7,001 tokens do.
    long = {"model": DEFAULT_MODEL_ID, "prompt": "word " * 7000, "max_new_tokens": 16}
    assert post_with_tpm(counting_app, long, tpm=100_000).status_code == 202
    assert counter.is_loaded(DEFAULT_MODEL_ID)
    body = {"model": DEFAULT_MODEL_ID, "prompt": "The capital of France is", "max_new_tokens": 10}
    assert re.search(r'"tokens";r=984;', post_with_tpm(counting_app, body).headers["RateLimit"])


@pytest.mark.parametrize(("limits", "refused_by"), [
    ({"rpm": 1}, "1 requests per minute"),
    ({"max_concurrent": 1}, "1 concurrent jobs"),
    ({"tpm": 100}, "100 tokens per minute (17 reserved or used this minute, this request needs at least 90)"),
])
def test_a_key_over_its_limits_is_refused_before_its_long_prompt_is_counted(counting_app, limits, refused_by):
    """Counting a long prompt costs the gateway up to ~0.1 s of CPU: a key that its limits refuse
    anyway gets its 429 without it (here the prompt would have loaded the tokenizer too)."""
    counter = counting_app.extensions["gemma_jobs"].token_counter
    with counting_app.extensions["gemma_jobs"].db.session_scope() as session:
        _, plaintext = create_key(session, role="user", **limits)
    client = counting_app.test_client()
    headers = {"Authorization": f"Bearer {plaintext}"}
    short = {"model": DEFAULT_MODEL_ID, "prompt": "The capital of France is", "max_new_tokens": 10}
    assert client.post("/v1/generations", json=short, headers=headers).status_code == 202
    # 35,000 bytes: it might not fit the 32,768-token context, so it would be counted.
    long = {"model": DEFAULT_MODEL_ID, "prompt": "word " * 7000, "max_new_tokens": 90}
    error = assert_error(client.post("/v1/generations", json=long, headers=headers), 429, "rate_limited")
    assert refused_by in error["message"]
    assert not counter.is_loaded(DEFAULT_MODEL_ID)


def test_a_request_over_a_whole_minute_of_tokens_is_422_not_429_and_not_counted(counting_app):
    """No retry helps a request over the key's whole tokens per minute: a 422 names it, before
    its long prompt is counted, even for a key over its rpm (a 429 sent it to retry in vain)."""
    counter = counting_app.extensions["gemma_jobs"].token_counter
    with counting_app.extensions["gemma_jobs"].db.session_scope() as session:
        _, plaintext = create_key(session, role="user", tpm=150, rpm=1)
    client, headers = counting_app.test_client(), {"Authorization": f"Bearer {plaintext}"}
    short = {"model": DEFAULT_MODEL_ID, "prompt": "The capital of France is", "max_new_tokens": 10}
    assert client.post("/v1/generations", json=short, headers=headers).status_code == 202
    body = {"model": DEFAULT_MODEL_ID, "prompt": "word " * 7000, "max_new_tokens": 200}
    error = assert_error(client.post("/v1/generations", json=body, headers=headers), 422, "invalid_field")
    assert "this request reserves at least 200 tokens" in error["message"] and "150 tokens per minute" in error["message"]
    assert not counter.is_loaded(DEFAULT_MODEL_ID)


def test_with_counting_on_the_exact_count_is_what_the_token_budget_reserves(counting_app):
    set_counting(counting_app, True)
    body = {"model": DEFAULT_MODEL_ID, "prompt": "The capital of France is", "max_new_tokens": 10}
    response = post_with_tpm(counting_app, body)
    # 6 prompt tokens (BOS included) + 10 new tokens reserved.
    assert re.search(r'"tokens";r=984;', response.headers["RateLimit"])


def test_the_gateway_still_does_not_import_torch():
    code = ("import sys; from services.gateway import create_app; "
            "from services.domain.token_counter import TokenCounter; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_with_counting_off_the_gateway_estimates_and_leaves_the_check_to_the_worker(counting_app):
    set_counting(counting_app, False)
    client = counting_app.test_client()
    headers = {"Authorization": f"Bearer {make_key(counting_app)}"}
    body = {"model": "gemma-3-270m-short", "prompt": OVER_64, "max_new_tokens": 8}
    assert client.post("/v1/generations", json=body, headers=headers).status_code == 202
    assert not counting_app.extensions["gemma_jobs"].token_counter.is_loaded("gemma-3-270m-short")


@pytest.mark.parametrize(("value", "mode"), [("auto", "auto"), ("true", True), ("1", True), ("false", False)])
def test_the_setting_reads_auto_or_a_boolean(monkeypatch, value, mode):
    monkeypatch.setenv("GEMMA_JOBS_GATEWAY_COUNT_TOKENS", value)
    assert load_settings().gateway_count_tokens == mode
    monkeypatch.delenv("GEMMA_JOBS_GATEWAY_COUNT_TOKENS")
    assert load_settings().gateway_count_tokens == "auto"
