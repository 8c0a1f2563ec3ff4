"""Training rows become the tokens generation sees, with the loss only on what the model says."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from shared.registry import DEFAULT_MODEL_ID
from shared.training_data import parse_row
from workers.prompts import input_ids_for
from workers.training_data import IGNORE_INDEX, tokenize_example

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tokenizer(model_cache_dir: Path):
    return AutoTokenizer.from_pretrained(model_cache_dir / DEFAULT_MODEL_ID)


def learned_text(tokenizer, row) -> str:
    return tokenizer.decode([label for label in row.labels if label != IGNORE_INDEX])


def test_chat_rows_learn_only_the_assistant_turns(tokenizer):
    example = parse_row(
        '{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},'
        ' {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name?"},'
        ' {"role": "assistant", "content": "Gemma."}]}'
    )
    row = tokenize_example(tokenizer, example, max_seq_length=512)
    assert learned_text(tokenizer, row) == "Hello.<end_of_turn>Gemma.<end_of_turn>"
    # The first turns are exactly the prompt generation would build for the same messages.
    prompt = input_ids_for(tokenizer, {"messages": [dict(role=r, content=c) for r, c in example.messages[:2]]})
    assert row.input_ids[: len(prompt)] == prompt
    assert all(label == IGNORE_INDEX for label in row.labels[: len(prompt)])


def test_prompt_completion_rows_learn_the_completion_and_eos(tokenizer):
    row = tokenize_example(tokenizer, parse_row('{"prompt": "Two plus two is", "completion": " four."}'), 512)
    assert learned_text(tokenizer, row) == " four.<eos>"
    prompt = input_ids_for(tokenizer, {"prompt": "Two plus two is"})
    assert row.input_ids[: len(prompt)] == prompt


def test_truncation_keeps_the_prefix(tokenizer):
    example = parse_row('{"prompt": "word ' + "word " * 50 + '", "completion": "end"}')
    row = tokenize_example(tokenizer, example, max_seq_length=16)
    assert len(row.input_ids) == len(row.labels) == 16
    assert row.learned_tokens == 0  # dropped by the trainer: nothing left to learn
