"""Stop strings against Gemma's real tokenizer: the engine sees one the step it completes, also
when its characters are byte-fallback tokens (several tokens a character)."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from shared.registry import DEFAULT_MODEL_ID
from workers.stopping import stop_string_seen

pytestmark = pytest.mark.e2e

CASES = [
    ("Answer: ꙮ and more", "ꙮ"),  # three byte-fallback tokens for one character
    ("Answer: ꙮꙮ done", "ꙮꙮ"),
    ("The end.\n\nNext part", "\n\n"),
    ("Hello world. Bye", " world."),
    ("東京タワーは高い", "タワー"),
]


@pytest.fixture(scope="module")
def tokenizer(model_cache_dir: Path):
    return AutoTokenizer.from_pretrained(model_cache_dir / DEFAULT_MODEL_ID)


@pytest.mark.parametrize(("text", "stop"), CASES)
def test_a_stop_string_is_seen_the_step_it_completes(tokenizer, text, stop):
    ids = tokenizer.encode(text, add_special_tokens=False)
    completed = next(n for n in range(1, len(ids) + 1) if stop in tokenizer.decode(ids[:n]))
    assert not any(stop_string_seen(tokenizer, ids[:n], [stop]) for n in range(1, completed))
    assert stop_string_seen(tokenizer, ids[:completed], [stop])
    assert stop_string_seen(tokenizer, ids[:completed], ["x", stop])  # one of several
