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
from shared.settings import Settings


# Prompts over this many UTF-8 bytes take milliseconds to tokenize (~0.5 ms per 1,000 bytes of
# plain text here; 200,000 characters ~0.1 s), worth a read of the key's limits first.
COSTLY_PROMPT_BYTES = 16_384


class TokenCounter:
    """Exact prompt token counts where the model's tokenizer.json is on this machine.

    Models converted by a worker keep it under the model cache; a gateway that shares the
    data dir (or volume) finds it there. Prompts rendered with a model's own chat template,
    or models whose files are not here, get None: the caller estimates instead.
    """

    def __init__(self, registry: ModelRegistry, cache_root: Path):
        self.registry = registry
        self.cache_root = cache_root
        self._tokenizers: dict[str, Tokenizer] = {}
        self._chat_templates: dict[str, bool] = {}
        self._lock = threading.Lock()

    def at_submit(self, request: GenerationRequest, settings: Settings, model_id: str | None = None) -> int | None:
        """Return the prompt count a submit checks and reserves with, or None to estimate
        (`model_id`: the model that runs it, when `request.model` is an adapter).

        `gateway_count_tokens`: True counts every prompt; False none; "auto" only prompts
        that might not fit the context (so the 422 stays exact), as a loaded tokenizer costs
        ~100 MB per process — and every prompt once one is loaded, as counting is then cheap.
        """
        if not self.counts(request, settings, model_id):
            return None
        return self.count(request, model_id)

    def counts(self, request: GenerationRequest, settings: Settings, model_id: str | None = None) -> bool:
        """Return whether `at_submit` tokenizes this request's prompt."""
        mode = settings.gateway_count_tokens
        entry = self.registry.get(model_id or request.model)
        if mode is False or entry is None:
            return False
        if mode == "auto" and not self.is_loaded(entry.id):
            max_new_tokens = request.max_new_tokens or settings.default_max_new_tokens
            return prompt_token_bound(request) + max_new_tokens > entry.context_length
        return True

    def costs_much(self, request: GenerationRequest, settings: Settings, model_id: str | None = None) -> bool:
        """Return whether `at_submit` tokenizes a prompt long enough to cost milliseconds of CPU."""
        return prompt_token_bound(request) > COSTLY_PROMPT_BYTES and self.counts(request, settings, model_id)

    def count(self, request: GenerationRequest, model_id: str | None = None) -> int | None:
        """Return the prompt's token count as the worker will see it (on `model_id`, else the
        request's model), or None if unknown."""
        entry = self.registry.get(model_id or request.model)
        folder = self._folder(entry) if entry is not None else None
        if folder is None or (request.prompt is None and self._has_chat_template(entry.id, folder)):
            return None
        tokenizer = self._load(entry.id, folder)
        if tokenizer is None:
            return None
        return len(tokenizer.encode(_prompt_text(request)).ids)

    def is_loaded(self, model_id: str) -> bool:
        """Return whether this process holds the model's tokenizer in memory."""
        return model_id in self._tokenizers

    def _folder(self, entry: ModelEntry) -> Path | None:
        if entry.path is not None:
            return entry.path
        if entry.needs_conversion:
            return self.cache_root / entry.id
        return None  # a hub id: its cache layout is the worker's business

    def _has_chat_template(self, model_id: str, folder: Path) -> bool:
        """Return whether the model renders messages with its own template (which we do not run)."""
        if model_id not in self._chat_templates:
            if not (folder / "tokenizer.json").is_file():
                return False  # not converted yet: nothing to count with anyway
            config_path = folder / "tokenizer_config.json"
            config = json.loads(config_path.read_text()) if config_path.is_file() else {}
            self._chat_templates[model_id] = (
                bool(config.get("chat_template")) or (folder / "chat_template.jinja").is_file()
            )
        return self._chat_templates[model_id]

    def _load(self, model_id: str, folder: Path) -> Tokenizer | None:
        with self._lock:
            if model_id not in self._tokenizers:
                # Not there yet (e.g. no worker has converted it): try again on a later request.
                if not (folder / "tokenizer.json").is_file():
                    return None
                self._tokenizers[model_id] = Tokenizer.from_file(str(folder / "tokenizer.json"))
                _return_freed_memory()
            return self._tokenizers[model_id]


def prompt_token_bound(request: GenerationRequest) -> int:
    """Return an upper bound on the prompt's tokens without a tokenizer.

    Every token covers at least one UTF-8 byte of the text (byte-fallback tokens exactly one),
    plus a BOS; so a prompt within this bound is known to fit without counting.
    """
    return len(_prompt_text(request).encode("utf-8", "surrogatepass")) + 1


def _prompt_text(request: GenerationRequest) -> str:
    """Return the text the worker tokenizes: the raw prompt, or messages in Gemma's turn format."""
    if request.prompt is not None:
        return request.prompt
    return gemma_turn_format([message.model_dump() for message in request.messages or []])


def _return_freed_memory() -> None:
    """Give the ~200 MB that parsing a 262k-token tokenizer.json leaves free back to the OS."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the memory is reused by the process, just not returned
