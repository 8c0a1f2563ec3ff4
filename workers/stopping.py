"""Stop strings, checked after every new token."""

from __future__ import annotations

import functools

from transformers import PreTrainedTokenizerBase

# A UTF-8 character has at most three continuation bytes after its lead byte.
MAX_CONTINUATION_BYTES = 3


def stop_string_seen(tokenizer: PreTrainedTokenizerBase, new_ids: list[int], stops: list[str]) -> bool:
    """Return whether a stop string appears at the end of the generated text.

    transformers' own `stop_strings` preprocesses the whole 262k-token vocabulary on every
    `generate` call (~1 s per job here); decoding a short window of the newest tokens each
    step costs microseconds. Every token but a special one (which decodes to nothing) decodes
    to at least one byte, so a stop string of k UTF-8 bytes that just completed lies within
    the last k+1 such tokens (`_window_start`).
    """
    longest = max(len(stop.encode("utf-8")) for stop in stops)
    start = _window_start(new_ids, longest + 1, *_token_kinds(tokenizer))
    text = tokenizer.decode(new_ids[start:], skip_special_tokens=True)
    return any(stop in text for stop in stops)


def _window_start(ids: list[int], tokens: int, continuation_ids: frozenset[int], special_ids: frozenset[int]) -> int:
    """Return where a window of the last `tokens` tokens that decode to something starts, moved
    back to a character's first byte.

    The byte-fallback decoder decodes a run of byte tokens as a whole and voids all of it if it
    is not valid UTF-8: a window starting inside a character's bytes hid the characters after
    it, a stop string among them.
    """
    start, counted = len(ids), 0
    while start > 0 and counted < tokens:
        start -= 1
        counted += ids[start] not in special_ids
    for _ in range(MAX_CONTINUATION_BYTES):
        if start == 0 or ids[start] not in continuation_ids:
            break
        start -= 1
    return start


@functools.lru_cache(maxsize=8)
def _token_kinds(tokenizer: PreTrainedTokenizerBase) -> tuple[frozenset[int], frozenset[int]]:
    """Return a tokenizer's byte-fallback tokens of UTF-8 continuation bytes, and its tokens that
    decode to nothing with special tokens skipped."""
    vocab = tokenizer.get_vocab()
    continuation = frozenset(vocab[name] for name in (f"<0x{byte:02X}>" for byte in range(0x80, 0xC0)) if name in vocab)
    special = frozenset(index for index, token in tokenizer.backend_tokenizer.get_added_tokens_decoder().items()
                        if token.special)
    return continuation, special
