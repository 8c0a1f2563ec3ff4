"""The models one worker process holds: each loaded once, lazily, then reused."""

from __future__ import annotations

import threading
from pathlib import Path

import structlog
import torch

from shared.registry import ModelRegistry
from workers.metrics import MODEL_LOAD_SECONDS
from workers.model_loader import LoadedModel, ModelUnavailable, load_model

log = structlog.get_logger(__name__)


class ModelCache:
    """Loaded models by id; a failed load is remembered so every job gets the same clear error."""

    def __init__(
        self, registry: ModelRegistry, cache_root: Path, device: torch.device, dtype: torch.dtype | None = None
    ):
        self.registry = registry
        self.cache_root = cache_root
        self.device = device
        self.dtype = dtype
        self._loaded: dict[str, LoadedModel] = {}
        self._failed: dict[str, str] = {}
        self._lock = threading.Lock()

    def get(self, model_id: str) -> LoadedModel:
        """Return a loaded model, loading it on first use."""
        with self._lock:
            if model_id in self._loaded:
                return self._loaded[model_id]
            if model_id in self._failed:
                raise ModelUnavailable(self._failed[model_id])
            entry = self.registry.get(model_id)
            if entry is None:
                raise ModelUnavailable(f"model {model_id!r} is not registered on this worker")
            try:
                loaded = load_model(entry, self.cache_root, self.device, self.dtype)
            except Exception as exc:  # noqa: BLE001 - one model that cannot load must not end the worker
                # Any error, not only those load_model names: a read-only or full cache, a config
                # that does not fit its weights ended the whole worker, its other models with it.
                unavailable = exc if isinstance(exc, ModelUnavailable) else ModelUnavailable(
                    f"model {model_id!r}: cannot load: {exc.__class__.__name__}: {exc}")
                self._failed[model_id] = str(unavailable)
                log.error("model_unavailable", model=model_id, error=str(unavailable))
                raise unavailable from exc
            log.info(
                "model_loaded",
                model=model_id,
                device=str(self.device),
                dtype=str(loaded.dtype),
                seconds=round(loaded.load_seconds, 2),
                tokenizer_seconds=round(loaded.tokenizer_seconds, 2),
            )
            MODEL_LOAD_SECONDS.labels(model_id).set(loaded.load_seconds)
            self._loaded[model_id] = loaded
            return loaded

    def preload(self, model_ids: list[str]) -> None:
        """Load models before taking jobs; a model that fails is logged, not fatal."""
        for model_id in model_ids:
            try:
                self.get(model_id)
            except ModelUnavailable:
                pass  # already logged; its jobs will fail with the same message

    def loaded_ids(self) -> list[str]:
        """Return the ids of the models in memory."""
        return sorted(self._loaded)
