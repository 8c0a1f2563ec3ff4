"""The tokenizers fine-tunes use, loaded once per process and kept by weights folder.

Kept apart from workers.fine_tuning so that a starting worker can load them without importing
peft and transformers' trainer (~0.5 s), which only a fine-tune's first run needs.
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerBase

from shared.registry import ModelEntry
from workers.model_loader import weights_dir
from workers.tokenizer_cache import load_tokenizer

# Parsing Gemma's 262k-token vocabulary holds the GIL for ~1 s (prepared form) to ~5 s, long
# enough to starve the lease-renewal thread: load it before taking fine-tunes, not during one.
_tokenizers: dict[Path, PreTrainedTokenizerBase] = {}


def preload_tokenizer(base: ModelEntry, cache_root: Path, loaded: PreTrainedTokenizerBase | None = None) -> None:
    """Have a base model's tokenizer ready before taking fine-tunes; reuse one already loaded."""
    folder = weights_dir(base, cache_root)
    if loaded is not None:
        _tokenizers.setdefault(folder, loaded)
    training_tokenizer(folder, cache_root)


def training_tokenizer(folder: Path, cache_root: Path) -> PreTrainedTokenizerBase:
    """Return the tokenizer of a weights folder, loading it (from its prepared form) the first time."""
    if folder not in _tokenizers:
        _tokenizers[folder] = load_tokenizer(folder, cache_root)
    return _tokenizers[folder]
