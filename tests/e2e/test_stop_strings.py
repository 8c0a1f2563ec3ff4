"""Stop strings and streamed text against Gemma's real tokenizer: the engine sees a stop the step
it completes, and streams the text the result holds, also around byte-fallback characters
(several tokens a character, decoded as a run)."""

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
    # Byte-fallback characters before the stop (and after): a window starting inside the bytes
    # of the character before voided the stop's characters too, and it was seen late or never.
    ("Answer: 𓀀ꙮ and more", "ꙮ"),
    ("x 𓀀ꙮꙮ y", "ꙮꙮ"),
    ("Answer: 𓀀ꙮ𓀀𓀀 and more", "ꙮ"),
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


def test_special_tokens_inside_a_stop_string_do_not_hide_it(tokenizer):
    """They decode to nothing but took places in the window: " END" split by five of them was missed."""
    turn = tokenizer.convert_tokens_to_ids("<start_of_turn>")
    ids = [*tokenizer.encode("Hello E", add_special_tokens=False), *[turn] * 5,
           *tokenizer.encode("ND", add_special_tokens=False)]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Hello END"
    assert stop_string_seen(tokenizer, ids, [" END"])
    assert not stop_string_seen(tokenizer, ids[:-1], [" END"])


class _Recorded:
    """Step writes that keep the text each would send (no Redis needed)."""

    def __init__(self):
        self.texts: list[str] = []
        self.token_ids: list[int] = []

    def append(self, _publisher, _attempt, text, token_ids, _start) -> None:
        self.texts.append(text or "")
        self.token_ids += token_ids


def test_a_stop_string_in_a_byte_run_the_result_voids_is_not_seen(tokenizer):
    """A stray byte before "é"'s bytes voids the whole run in the result's decode; the window
    started at "é" saw the stop, and the job stopped without its result holding it."""
    byte = lambda value: tokenizer.convert_tokens_to_ids(f"<0x{value:02X}>")  # noqa: E731
    ids = [byte(0xA9), byte(0xC3), byte(0xA9), *tokenizer.encode(" ok", add_special_tokens=False)]
    assert "é" not in tokenizer.decode(ids, skip_special_tokens=True)
    assert not stop_string_seen(tokenizer, ids, ["é"])
    assert stop_string_seen(tokenizer, [byte(0xC3), byte(0xA9)], ["é"])


@pytest.mark.parametrize("stray", [False, True, "special"])
def test_the_streamed_text_is_the_result_text_around_byte_fallback_characters(tokenizer, stray):
    """A stray byte after a byte-fallback character voids the whole run in the result's decode:
    streamed apart, the character went out whole, and the stream then repeated the text after it."""
    from workers.token_publisher import TokenPublisher

    byte = lambda value: tokenizer.convert_tokens_to_ids(f"<0x{value:02X}>")  # noqa: E731
    ids = [*tokenizer.encode("Hi ", add_special_tokens=False), byte(0xEA), byte(0x99), byte(0xAE),
           *([byte(0x80)] if stray is True else []), *tokenizer.encode(" ok", add_special_tokens=False)]
    if stray == "special":  # a special token inside a byte run: the decoder skips it and joins the run
        ids = [*tokenizer.encode(" ok", add_special_tokens=False), byte(0xE3), tokenizer.eos_token_id,
               byte(0xC3), byte(0x9F), *tokenizer.encode(" ok", add_special_tokens=False)]
    writes = _Recorded()
    publisher = TokenPublisher(None, tokenizer, "job_x", 1, [], step_writes=writes)
    for end in range(1, len(ids) + 1):
        publisher.update(ids[:end])
    final = tokenizer.decode(ids, skip_special_tokens=True)
    publisher.finish(final, ids, writes)
    assert "".join(writes.texts) == final


@pytest.mark.parametrize(("text", "stop", "last"), [
    ("The answer is four", [], "<eos>"),  # a last token that adds no text
    ("The answer is four", [], "<end_of_turn>"),
    ("The answer is four", ["."], "."),  # completes a one-character stop at the text already sent
])
def test_the_stream_carries_every_token_id_of_the_result(tokenizer, text, stop, last):
    """Ids went out only with new text: the stream's last ids (an end of turn, a stop's token)
    were never sent, and its token_ids came up short of the result's."""
    from workers.token_publisher import TokenPublisher

    ids = [*tokenizer.encode(text, add_special_tokens=False), tokenizer.convert_tokens_to_ids(last)]
    writes = _Recorded()
    publisher = TokenPublisher(None, tokenizer, "job_x", 1, stop, step_writes=writes)
    for end in range(1, len(ids) + 1):
        publisher.update(ids[:end])
    final = tokenizer.decode(ids, skip_special_tokens=True)
    final = final[: final.find(".")] if stop else final
    publisher.finish(final, ids, writes)
    assert "".join(writes.texts) == final == text and writes.token_ids == ids
