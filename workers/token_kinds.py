"""The tokens decoding treats apart: byte-fallback bytes (a run of them decodes as a whole) and
special tokens (nothing, when skipped)."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the result writer process imports the token publisher, and this, without transformers
    from transformers import PreTrainedTokenizerBase


@functools.lru_cache(maxsize=8)
def byte_tokens(tokenizer: PreTrainedTokenizerBase) -> dict[int, int]:
    """Return a tokenizer's byte-fallback tokens (`<0x00>` … `<0xFF>`) as {token id: byte}."""
    vocab = tokenizer.get_vocab()
    return {vocab[f"<0x{byte:02X}>"]: byte for byte in range(256) if f"<0x{byte:02X}>" in vocab}


@functools.lru_cache(maxsize=8)
def continuation_byte_tokens(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """Return the byte-fallback tokens of UTF-8 continuation bytes (0x80-0xBF): never a character's first."""
    return frozenset(index for index, byte in byte_tokens(tokenizer).items() if 0x80 <= byte < 0xC0)


@functools.lru_cache(maxsize=8)
def special_tokens(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """Return the tokens that decode to nothing with special tokens skipped."""
    added = tokenizer.backend_tokenizer.get_added_tokens_decoder()
    return frozenset(index for index, token in added.items() if token.special)
