"""LoRA adapters a worker keeps loaded beside one copy of each base model (a bounded LRU)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import structlog
import torch

from workers.model_loader import LoadedModel

if TYPE_CHECKING:
    from peft import PeftModel

log = structlog.get_logger(__name__)


class AdapterUnavailable(RuntimeError):
    """An adapter's files cannot be loaded."""

    @classmethod
    def files_missing(cls, adapter_id: str) -> "AdapterUnavailable":
        return cls(f"adapter {adapter_id!r} has no files in this worker's storage (deleted?)")


def has_adapter_files(path: Path | None) -> bool:
    """Whether an adapter's folder is there (a deleted adapter's files go at its delete); a
    storage that cannot be read (a stale NFS handle, EIO) says no: its jobs fail, and may be retried."""
    try:
        return path is not None and (path / "adapter_config.json").is_file()
    except OSError:
        return False


class AdapterCache:
    """Wraps each base model in peft once and swaps adapters in and out of it by name.

    The base weights are never copied or reloaded: every adapter of a base lives as extra
    LoRA layers on the same model, and only the active one takes part in a forward pass.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._wrapped: dict[str, PeftModel] = {}
        # (base id, adapter id) in least- to most-recently used order.
        self._lru: OrderedDict[tuple[str, str], None] = OrderedDict()
        # The books (the fields here); held while choosing or loading an adapter, never for a step.
        self._lock = threading.Lock()
        # Per base model, held while its batch steps: a step of one base's engine no longer waited
        # for another's whole step. Its LoRA layers change only with it held (`_drop`).
        self._steps: dict[str, threading.RLock] = {}
        # The adapter of each base model's last batch step (each base has its own engine), and
        # deleted adapters left loaded until the batch that runs them moves on (see `forget`).
        self._in_use: dict[str, str | None] = {}
        self._forgotten: set[str] = set()

    @contextmanager
    def applied(self, loaded: LoadedModel, adapter_id: str | None, path: Path | None = None) -> Iterator[LoadedModel]:
        """Yield the model to generate with: the base alone, or the base with one adapter active."""
        base = loaded.entry.id
        with self._steps.setdefault(base, threading.RLock()):
            with self._lock:
                self._in_use[base] = adapter_id
                for gone in self._forgotten - set(self._in_use.values()):
                    self._forget(gone)
                wrapped = self._wrapped.get(base)
                if adapter_id is not None:
                    wrapped = self._load(loaded, adapter_id, path)
                    wrapped.set_adapter(adapter_id)
            if adapter_id is not None:
                yield replace(loaded, model=wrapped)
            elif wrapped is None:
                yield loaded
            else:
                with wrapped.disable_adapter():  # the injected LoRA layers must not apply
                    yield loaded

    def loaded_ids(self) -> list[str]:
        """Return the adapters in memory, least recently used first."""
        return [adapter_id for _, adapter_id in self._lru]

    def _load(self, loaded: LoadedModel, adapter_id: str, path: Path | None) -> PeftModel:
        key = (loaded.entry.id, adapter_id)
        wrapped = self._wrapped.get(loaded.entry.id)
        if key in self._lru:
            self._lru.move_to_end(key)
            self._evict(keep=key)  # loads while other batches ran their adapters may have gone over
            return wrapped
        if not has_adapter_files(path):
            # The path stays in the worker's log: the job's error is shown to its client.
            log.error("adapter_files_missing", adapter=adapter_id, path=str(path))
            raise AdapterUnavailable.files_missing(adapter_id)
        from peft import PeftModel  # only workers that serve adapters pay for importing peft

        try:
            if wrapped is None:
                wrapped = PeftModel.from_pretrained(loaded.model, path, adapter_name=adapter_id, is_trainable=False)
                wrapped.eval()
                self._wrapped[loaded.entry.id] = wrapped
            else:
                wrapped.load_adapter(path, adapter_name=adapter_id, is_trainable=False)
        except Exception as exc:  # noqa: BLE001 - a bad file (peft and safetensors raise many kinds) fails its jobs only
            log.error("adapter_load_failed", adapter=adapter_id, path=str(path), error=str(exc))
            _undo_partial_load(loaded.model, wrapped, adapter_id)
            raise AdapterUnavailable(f"adapter {adapter_id!r} could not be loaded ({exc.__class__.__name__})") from exc
        self._lru[key] = None
        log.info("adapter_loaded", adapter=adapter_id, base=loaded.entry.id, cached=len(self._lru))
        self._evict(keep=key)
        return wrapped

    def _evict(self, keep: tuple[str, str]) -> None:
        """Drop least recently used adapters beyond capacity (never the one about to run, nor
        one of a base model whose batch is stepping now)."""
        in_use = set(self._in_use.items())  # another base's batch may be running on its adapter
        busy: set[tuple[str, str]] = set()
        while len(self._lru) > self.capacity:
            victim = next((key for key in self._lru if key != keep and key not in in_use and key not in busy), None)
            if victim is None:
                return  # every other adapter is in use: over capacity until a batch moves on
            if self._drop(*victim):
                log.info("adapter_evicted", adapter=victim[1], base=victim[0])
            else:
                busy.add(victim)

    def forget(self, adapter_id: str) -> None:
        """Unload an adapter that was deleted, so its memory goes: at once, or if the batch
        running now uses it, once the batch moves on (its files may be gone already, and its
        rows were admitted before the delete: they finish)."""
        with self._lock:
            if adapter_id in self._in_use.values():
                self._forgotten.add(adapter_id)
            else:
                self._forget(adapter_id)

    def _forget(self, adapter_id: str) -> None:
        dropped = [self._drop(*key) for key in [key for key in self._lru if key[1] == adapter_id]]
        if all(dropped):
            self._forgotten.discard(adapter_id)
        else:
            self._forgotten.add(adapter_id)  # a base model's batch was stepping: at a later step

    def _drop(self, base_id: str, adapter_id: str) -> bool:
        """Remove one adapter, unless its base model's batch is stepping now (in another thread);
        with the last one gone, take the LoRA layers out of the base. Returns whether it went."""
        step = self._steps[base_id]
        if not step.acquire(blocking=False):  # the thread stepping this base holds it: re-entered
            return False
        try:
            del self._lru[(base_id, adapter_id)]
            if any(base == base_id for base, _ in self._lru):
                self._wrapped[base_id].delete_adapter(adapter_id)
            else:
                # peft cannot delete a model's last adapter; unload() restores the base's own modules.
                self._wrapped.pop(base_id).unload()
        finally:
            step.release()
        return True


def _undo_partial_load(base: torch.nn.Module, wrapped: PeftModel | None, adapter_id: str) -> None:
    """Take out what a load that failed part way left on the shared base model.

    peft injects an adapter's LoRA layers before it reads their weights: a missing or corrupt
    weights file left them (and the adapter's config) on the base, so base jobs ran through them
    and every later wrapper carried them along.
    """
    if wrapped is not None:  # other adapters are loaded: remove this one's layers alone
        if adapter_id in wrapped.peft_config:
            wrapped.delete_adapter(adapter_id)
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    injected = [name for name, module in base.named_modules() if isinstance(module, BaseTunerLayer)]
    for name in injected:  # the base's own module back in each one's place, as peft's unload() does
        parent, _, child = name.rpartition(".")
        setattr(base.get_submodule(parent), child, base.get_submodule(name).get_base_layer())
    if hasattr(base, "peft_config"):
        del base.peft_config
