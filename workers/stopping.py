"""Stop strings, checked after every new token."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


def stop_string_seen(tokenizer: PreTrainedTokenizerBase, new_ids: list[int], stops: list[str]) -> bool:
    """Return whether a stop string appears at the end of the generated text.

    transformers' own `stop_strings` preprocesses the whole 262k-token vocabulary on every
    `generate` call (~1 s per job here); decoding a short window of the newest tokens each
    step costs microseconds. Every token decodes to at least one byte (or none, for special
    tokens; a byte-fallback token is one byte of a character), so a stop string of k UTF-8
    bytes that just completed lies within the last k+1 tokens.
    """
    window = max(len(stop.encode("utf-8")) for stop in stops) + 1
    text = tokenizer.decode(new_ids[-window:], skip_special_tokens=True)
    return any(stop in text for stop in stops)
