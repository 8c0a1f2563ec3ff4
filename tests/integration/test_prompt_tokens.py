"""Prompt tokens at submit: counted exactly with the model's tokenizer (no torch in the
gateway), checked against the model's context, and reserved against the token budget."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from services.gateway import create_app
from shared.registry import DEFAULT_MODEL_ID
from tests.integration.helpers import assert_error, make_key


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

    from shared.schemas import GenerationRequest
    from workers.prompts import input_ids_for

    tokenizer = AutoTokenizer.from_pretrained(model_cache_dir / DEFAULT_MODEL_ID)
    counter = counting_app.extensions["gemma_jobs"].token_counter
    for body in (
        {"prompt": "The capital of France is"},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]},
    ):
        request = GenerationRequest(model=DEFAULT_MODEL_ID, **body)
        assert counter.count(request) == len(input_ids_for(tokenizer, request.model_dump()))


def test_a_prompt_over_the_context_is_422_with_the_limit_named(counting_app):
    client = counting_app.test_client()
    headers = {"Authorization": f"Bearer {make_key(counting_app)}"}
    body = {"model": "gemma-3-270m-short", "prompt": "word " * 80, "max_new_tokens": 8}
    error = assert_error(client.post("/v1/generations", json=body, headers=headers), 422, "invalid_field")
    assert "context of 64 tokens" in error["message"] and error["details"][0]["field"] == "prompt"
    fits = {"model": "gemma-3-270m-short", "prompt": "word " * 20, "max_new_tokens": 8}
    assert client.post("/v1/generations", json=fits, headers=headers).status_code == 202


def test_the_exact_count_is_what_the_token_budget_reserves(counting_app):
    client = counting_app.test_client()
    with counting_app.extensions["gemma_jobs"].db.session_scope() as session:
        from services.domain.keys import create_key

        _, key = create_key(session, role="user", tpm=1000)
    body = {"model": DEFAULT_MODEL_ID, "prompt": "The capital of France is", "max_new_tokens": 10}
    response = client.post("/v1/generations", json=body, headers={"Authorization": f"Bearer {key}"})
    # 6 prompt tokens (BOS included) + 10 new tokens reserved.
    assert re.search(r'"tokens";r=984;', response.headers["RateLimit"])


def test_the_gateway_still_does_not_import_torch():
    code = ("import sys; from services.gateway import create_app; from services.domain.token_counter import TokenCounter; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_with_counting_off_the_gateway_estimates_and_leaves_the_check_to_the_worker(counting_app):
    counting_app.extensions["gemma_jobs"].settings = counting_app.extensions["gemma_jobs"].settings.model_copy(
        update={"gateway_count_tokens": False}
    )
    client = counting_app.test_client()
    headers = {"Authorization": f"Bearer {make_key(counting_app)}"}
    body = {"model": "gemma-3-270m-short", "prompt": "word " * 80, "max_new_tokens": 8}
    assert client.post("/v1/generations", json=body, headers=headers).status_code == 202
