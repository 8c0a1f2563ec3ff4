"""Stop strings, checked after every new token."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from workers.token_kinds import continuation_byte_tokens, special_tokens

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
    start = _window_start(new_ids, longest + 1, continuation_byte_tokens(tokenizer), special_tokens(tokenizer))
    text = tokenizer.decode(new_ids[start:], skip_special_tokens=True)
    if not any(stop in text for stop in stops):
        return False
    # Confirmed on the whole text, as the result is cut: a stray byte before the window voids the
    # whole byte run there, and the job stopped for a stop string its result did not hold.
    text = tokenizer.decode(new_ids, skip_special_tokens=True)
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
