"""Counting prompt tokens at the gateway with the model's own tokenizer (no torch)."""

from __future__ import annotations

import ctypes
import json
import threading
from pathlib import Path

from tokenizers import Tokenizer

from shared.prompts import gemma_turn_format
from shared.registry import ModelEntry, ModelRegistry
from shared.schemas import GenerationRequest


class TokenCounter:
    """Exact prompt token counts where the model's tokenizer.json is on this machine.

    Models converted by a worker keep it under the model cache; a gateway that shares the
    data dir (or volume) finds it there. Prompts rendered with a model's own chat template,
    or models whose files are not here, get None: the caller estimates instead.
    """

    def __init__(self, registry: ModelRegistry, cache_root: Path):
        self.registry = registry
        self.cache_root = cache_root
        self._tokenizers: dict[str, tuple[Tokenizer, bool]] = {}
        self._lock = threading.Lock()

    def count(self, request: GenerationRequest) -> int | None:
        """Return the prompt's token count as the worker will see it, or None if unknown."""
        entry = self.registry.get(request.model)
        loaded = self._load(entry) if entry is not None else None
        if loaded is None:
            return None
        tokenizer, has_chat_template = loaded
        if request.prompt is not None:
            return len(tokenizer.encode(request.prompt).ids)
        if has_chat_template:
            return None
        messages = [message.model_dump() for message in request.messages or []]
        return len(tokenizer.encode(gemma_turn_format(messages)).ids)

    def _folder(self, entry: ModelEntry) -> Path | None:
        if entry.path is not None:
            return entry.path
        if entry.needs_conversion:
            return self.cache_root / entry.id
        return None  # a hub id: its cache layout is the worker's business

    def _load(self, entry: ModelEntry) -> tuple[Tokenizer, bool] | None:
        with self._lock:
            if entry.id in self._tokenizers:
                return self._tokenizers[entry.id]
            folder = self._folder(entry)
            # Not there yet (e.g. no worker has converted it): try again on a later request.
            if folder is None or not (folder / "tokenizer.json").is_file():
                return None
            config_path = folder / "tokenizer_config.json"
            config = json.loads(config_path.read_text()) if config_path.is_file() else {}
            has_template = bool(config.get("chat_template")) or (folder / "chat_template.jinja").is_file()
            self._tokenizers[entry.id] = (Tokenizer.from_file(str(folder / "tokenizer.json")), has_template)
            _return_freed_memory()
            return self._tokenizers[entry.id]


def _return_freed_memory() -> None:
    """Give the ~200 MB that parsing a 262k-token tokenizer.json leaves free back to the OS."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the memory is reused by the process, just not returned
