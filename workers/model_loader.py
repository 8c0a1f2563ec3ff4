"""Finding, converting and loading model weights; nothing is downloaded at run time."""

from __future__ import annotations

import ctypes
import fcntl
import importlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# Belt and braces: the registry never names a remote model, and the hub client must agree.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import structlog  # noqa: E402
import torch  # noqa: E402
from safetensors import SafetensorError  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase  # noqa: E402

from shared.registry import ModelEntry  # noqa: E402
from workers.cache_files import publish, remove_scratch  # noqa: E402
from workers.cpu_threads import cpu_has_bf16_dot  # noqa: E402
from workers.tokenizer_cache import load_tokenizer  # noqa: E402

log = structlog.get_logger(__name__)

GEMMA_END_OF_TURN = "<end_of_turn>"
# In a converted folder: which GGUF it was converted from (`_gguf_source_identity`).
SOURCE_FILE = "source.json"


class ModelUnavailable(RuntimeError):
    """A registered model cannot be loaded on this worker."""


@dataclass
class LoadedModel:
    """A model ready to generate, with what generation needs to know about it."""

    entry: ModelEntry
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype
    eos_token_ids: list[int]
    load_seconds: float
    tokenizer_seconds: float = 0.0  # the part of load_seconds spent loading the tokenizer


def dtype_for(device: torch.device) -> torch.dtype:
    """Pick the dtype per device: bf16 is ~2.5x faster than fp32 on this CPU, and native on GPUs."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def generation_dtype(
    device: torch.device, concurrency: int, cpu_dtype: str = "auto", bf16_dot: bool | None = None
) -> torch.dtype:
    """Pick the dtype a worker generates in; on the CPU it depends on the CPU and on batching."""
    if device.type == "cuda":
        return dtype_for(device)
    if cpu_dtype != "auto":
        return getattr(torch, cpu_dtype)
    bf16_dot = cpu_has_bf16_dot() if bf16_dot is None else bf16_dot
    # Measured: bf16 is ~2x faster for one sequence (half the bytes to read). At batch 16 a
    # CPU without bf16 dot products (AVX2) runs fp32 ~1.4x faster; one with them, bf16.
    return torch.float32 if concurrency > 1 and not bf16_dot else torch.bfloat16


def weights_dir(entry: ModelEntry, cache_root: Path) -> Path:
    """Return a local folder of safetensors weights for an entry, converting GGUF once."""
    if entry.path is not None:
        if not (entry.path / "config.json").is_file():
            raise ModelUnavailable(f"model {entry.id!r}: no config.json in {entry.path}")
        return entry.path
    if entry.hf_hub_id is not None:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return Path(snapshot_download(entry.hf_hub_id, local_files_only=True))
        except LocalEntryNotFoundError as exc:
            raise ModelUnavailable(
                f"model {entry.id!r}: {entry.hf_hub_id} is not in the local Hugging Face cache"
            ) from exc
    target = cache_root / entry.id
    source = _gguf_source_identity(entry)
    if _converted_from(target, source):
        return target
    cache_root.mkdir(parents=True, exist_ok=True)
    # Several workers may start at once: one converts, the others wait and reuse its output.
    with open(cache_root / f".{entry.id}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _converted_from(target, source):
            remove_scratch(cache_root, f".{entry.id}-")  # left by a conversion that was killed
            if target.exists():
                # Converted from another GGUF; or emptied by hand but for its float32 copy, which
                # made the rename below fail after every ~1 min conversion, at every start.
                shutil.rmtree(target)
            _convert_gguf(entry, target, source)
    return target


def _gguf_source_identity(entry: ModelEntry) -> str | None:
    """Say which GGUF an entry converts from: the file's path, size and time, or the package's
    version. None when it cannot be told (the file is gone, the package not installed)."""
    if entry.gguf_file is not None:
        try:
            stat = entry.gguf_file.stat()
        except OSError:
            return None
        return f"{entry.gguf_file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    try:
        return f"{entry.gguf_package}=={importlib.metadata.version(entry.gguf_package)}"
    except importlib.metadata.PackageNotFoundError:
        return None


def _converted_from(target: Path, source: str | None) -> bool:
    """Whether a converted folder is complete and was converted from this source.

    Kept by model id alone, an id pointed at another GGUF (or a newer package) went on serving
    the old weights. A folder converted before sources were recorded, or whose source cannot be
    told now, still serves.
    """
    if not (target / "config.json").is_file():
        return False
    if source is None:
        return True
    try:
        return json.loads((target / SOURCE_FILE).read_text())["source"] == source
    except FileNotFoundError:
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _gguf_source(entry: ModelEntry, scratch: Path) -> Path:
    if entry.gguf_file is not None:
        if not entry.gguf_file.is_file():
            raise ModelUnavailable(f"model {entry.id!r}: GGUF file {entry.gguf_file} not found")
        return entry.gguf_file
    try:
        package = importlib.import_module(entry.gguf_package)
    except ImportError as exc:
        raise ModelUnavailable(
            f"model {entry.id!r}: Python package {entry.gguf_package!r} is not installed"
        ) from exc
    # The package ships the file in chunks; assemble() joins them and checks the sha256.
    return Path(package.assemble(scratch / package.MODEL_NAME))


def _convert_gguf(entry: ModelEntry, target: Path, source: str | None) -> None:
    """Dequantize a GGUF checkpoint once and cache it as bf16 safetensors (~40 s, then ~2 s loads)."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{entry.id}-") as scratch:
        gguf_path = _gguf_source(entry, Path(scratch))
        folder, name = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        # Loading packed GGUF weights is fastest in fp32; we cast once before saving.
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        # The loaded tensors are dense, but the model still carries the GGUF quantizer
        # marker, which would make save_pretrained refuse or write a bogus config.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.to(torch.bfloat16)
        staging = Path(scratch) / "out"
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if source is not None:
            (staging / SOURCE_FILE).write_text(json.dumps({"source": source}))
        publish(staging, target)
    log.info("model_converted", model=entry.id, seconds=round(time.monotonic() - started, 1))


def load_model(
    entry: ModelEntry, cache_root: Path, device: torch.device, dtype: torch.dtype | None = None
) -> LoadedModel:
    """Load a registered model onto a device (in `dtype`, or the device's default), from safetensors only."""
    started = time.monotonic()
    if entry.quantization != "none" and device.type != "cuda":
        raise ModelUnavailable(
            f"model {entry.id!r}: quantization {entry.quantization} needs a CUDA worker "
            f"(bitsandbytes); this worker runs on {device.type}"
        )
    folder = weights_dir(entry, cache_root)
    dtype = dtype or dtype_for(device)
    kwargs: dict = {}
    if entry.quantization != "none":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype)
            if entry.quantization == "4bit"
            else BitsAndBytesConfig(load_in_8bit=True)
        )
        kwargs["device_map"] = {"": device.index or 0}
    try:
        tokenizer_started = time.monotonic()
        tokenizer = load_tokenizer(folder, cache_root)
        tokenizer_seconds = time.monotonic() - tokenizer_started
        copy = _float32_copy(entry, cache_root) if dtype == torch.float32 and not kwargs else None
        model = _load_float32_copy(copy) if copy is not None else None
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(
                folder,
                dtype=dtype,
                trust_remote_code=False,
                use_safetensors=True,
                local_files_only=True,
                **kwargs,
            )
            if copy is not None:
                _save_float32_copy(model, copy)
    except (OSError, ValueError, SafetensorError) as exc:  # a truncated weights file raises the last
        raise ModelUnavailable(f"model {entry.id!r}: cannot load from {folder}: {exc}") from exc
    _check_context_length(entry, model.config)
    if not kwargs:
        model.to(device)
    model.eval()
    _release_freed_heap()
    return LoadedModel(
        entry=entry,
        model=model,
        tokenizer=tokenizer,
        device=device,
        dtype=dtype,
        eos_token_ids=eos_token_ids(model, tokenizer),
        load_seconds=time.monotonic() - started,
        tokenizer_seconds=tokenizer_seconds,
    )


def _check_context_length(entry: ModelEntry, config) -> None:
    """Refuse a registry entry whose context_length is over what the model was built for.

    The gateway admits prompts by the registry's number; past the model's positions a job
    would fail deep in a forward pass (or generate from positions it never learned).
    """
    positions = getattr(config.get_text_config(), "max_position_embeddings", None)
    if isinstance(positions, int) and entry.context_length > positions:
        raise ModelUnavailable(
            f"model {entry.id!r}: context_length {entry.context_length} in the registry is over the model's "
            f"max_position_embeddings of {positions}; set context_length to {positions} or less"
        )


def _float32_copy(entry: ModelEntry, cache_root: Path) -> Path | None:
    """Return where a converted model keeps its float32 weights; None for models we did not convert.

    The conversion stores bf16. A float32 worker (a batching CPU worker) would cast all of it
    at every start (~1.3 s and a private 1 GB here); a float32 copy loads memory-mapped, with
    no cast, and its pages are shared by every worker on the host. Its values are the bf16
    ones exactly, so outputs do not change.
    """
    if entry.path is not None or entry.hf_hub_id is not None:
        return None
    return cache_root / entry.id / "float32"


def _load_float32_copy(copy: Path) -> torch.nn.Module | None:
    """Load the float32 copy if there is a readable one; a broken copy is removed, to be written again."""
    if not (copy / "config.json").is_file():
        return None
    try:
        return AutoModelForCausalLM.from_pretrained(copy, dtype=torch.float32, use_safetensors=True,
                                                    local_files_only=True)
    except (OSError, ValueError, SafetensorError) as exc:
        log.warning("float32_copy_unusable", folder=str(copy), error=str(exc))
        shutil.rmtree(copy, ignore_errors=True)
        return None


def _save_float32_copy(model: torch.nn.Module, copy: Path) -> None:
    """Write the float32 copy once (atomically); without room for it, workers just cast at start."""
    started = time.monotonic()
    try:
        with open(copy.parent.parent / f".{copy.parent.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another worker may be writing it right now
            remove_scratch(copy.parent, ".float32-")
            if (copy / "config.json").is_file():
                return
            with tempfile.TemporaryDirectory(dir=copy.parent, prefix=".float32-") as scratch:
                staging = Path(scratch) / "out"
                model.save_pretrained(staging, safe_serialization=True)
                publish(staging, copy)
    except OSError as exc:
        log.warning("float32_copy_not_saved", folder=str(copy), error=str(exc))
        return
    log.info("float32_copy_saved", folder=str(copy), seconds=round(time.monotonic() - started, 1))


def _release_freed_heap() -> None:
    """Give the heap that loading freed back to the OS; glibc keeps it otherwise (~300 MB of RSS here)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return  # not glibc (musl, macOS): nothing to trim
    trim(0)


def eos_token_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Return every token that ends a turn: the model's EOS ids plus Gemma's <end_of_turn>."""
    configured = model.generation_config.eos_token_id
    ids = list(configured) if isinstance(configured, list) else [configured]
    end_of_turn = tokenizer.convert_tokens_to_ids(GEMMA_END_OF_TURN)
    if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id:
        ids.append(end_of_turn)
    return sorted({token for token in ids if token is not None})
