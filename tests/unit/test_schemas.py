"""Request schemas: what a valid generation request is."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shared.schemas import GenerationRequest


def test_prompt_request_defaults():
    request = GenerationRequest(model="gemma-3-270m", prompt="Hi")
    assert request.temperature == 1.0
    assert request.stop == []
    assert request.max_new_tokens is None


def test_a_single_stop_string_becomes_a_list():
    assert GenerationRequest(model="m", prompt="Hi", stop="\n").stop == ["\n"]


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m"},
        {"model": "m", "prompt": "Hi", "messages": [{"role": "user", "content": "Hi"}]},
        {"model": "m", "messages": []},
        {"model": "m", "messages": [{"role": "user", "content": ""}]},
        {"model": "m", "prompt": "Hi", "stop": ["a"] * 9},
        {"model": "m", "prompt": "Hi", "top_k": -1},
        {"model": "m", "prompt": "Hi", "unknown": 1},
        {"model": "m", "prompt": "Hi", "metadata": {"k": 1}},
        # A JSON "\\ud800" escape decodes to a lone surrogate: no UTF-8 answer could hold it.
        {"model": "m", "prompt": "Hi", "metadata": {"k": "\ud800"}},
        {"model": "m", "prompt": "Hi", "metadata": {"\udc00": "v"}},
        {"model": "m", "prompt": "Hi", "stop": ["\ud800"]},
        {"model": "m", "prompt": "Hi", "metadata": {"": "v"}},
        {"model": "m", "prompt": "Hi", "metadata": {"k" * 65: "v"}},
        {"model": "m", "prompt": "Hi", "metadata": {"k": "v" * 513}},
        {"model": "m", "prompt": "Hi", "stop": ["s" * 513]},
    ],
)
def test_invalid_requests(body):
    with pytest.raises(ValidationError):
        GenerationRequest.model_validate(body)
