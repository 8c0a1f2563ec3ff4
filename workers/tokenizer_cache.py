"""Gemma's tokenizer, loaded in ~0.85 s instead of ~5 s from a prepared form kept beside the weights.

transformers 5 builds the tokenizer by parsing the 33 MB tokenizer.json several times in
Python. The first load writes the finished Rust backend (`workers.tokenizer_backend`) and the
wrapper's arguments under `<model cache>/.tokenizers/<fingerprint>/`, checked to load back
identical; later loads read only those. Any problem falls back to transformers' own load.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import structlog
import tokenizers
import transformers
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.tokenization_utils_tokenizers import TokenizersBackend

from workers.cache_files import remove_scratch, share_and_flush
from workers.tokenizer_backend import load_backend, save_backend

log = structlog.get_logger(__name__)

# Bumped when what a prepared folder holds changes, so an older one is rebuilt rather than misread.
PREPARED_FORMAT = 2
# A prepared tokenizer no start used for this long is deleted once another of its source is written.
STALE_PREPARED_S = 7 * 86400
# A staging folder untouched this long was left by a preparation that was killed (one takes seconds).
ABANDONED_STAGING_S = 3600
# Attributes a wrapper class's __init__ sets only to build its default backend (GemmaTokenizer's),
# which a prepared load skips: transformers reads them nowhere else.
DEFAULT_BACKEND_INPUTS = {"_vocab", "_merges"}
# Files a tokenizer is never built from: left out of its fingerprint (hashing 500 MB would cost ~1 s).
WEIGHT_SUFFIXES = {".safetensors", ".bin", ".gguf", ".pt", ".pth", ".ckpt", ".h5", ".msgpack"}
# Texts a freshly prepared tokenizer must encode exactly as transformers' own load does.
TOKENIZER_PROBES = (
    "The capital of France is",
    "naïve café, Straße, 東京, Привет, مرحبا 🙂👍🏽",
    "<bos><start_of_turn>user\nHi!<end_of_turn>\n<start_of_turn>model\n",
    "  leading spaces,\ttabs\nand\r\nnewlines  ",
)


def load_tokenizer(folder: Path, cache_root: Path) -> PreTrainedTokenizerBase:
    """Load a folder's tokenizer, from its prepared form under cache_root when there is a valid one."""
    prepared = cache_root / ".tokenizers" / tokenizer_fingerprint(folder)
    if prepared.is_dir():
        try:
            tokenizer = _load_prepared(prepared)
            _mark_used(prepared)
            return tokenizer
        except Exception as exc:  # tokenizers raises a bare Exception for a broken file
            log.warning("prepared_tokenizer_unusable", folder=str(folder), error=str(exc))
            shutil.rmtree(prepared, ignore_errors=True)  # so the load below can publish a good one
    # transformers 5 parses the 33 MB tokenizer.json several times in Python here (~5 s); the
    # prepared form loads in ~0.85 s, so a worker pays this only on its first start.
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    _prepare_tokenizer(tokenizer, folder, prepared)
    return tokenizer


def tokenizer_fingerprint(folder: Path) -> str:
    """Hash what a tokenizer is built from: the folder, its non-weight files and the library versions."""
    digest = hashlib.sha256(
        f"{folder.resolve()}|{transformers.__version__}|{tokenizers.__version__}|{PREPARED_FORMAT}|"
        f"{sys.version_info[:2]}".encode()  # the Python version: the BPE tables are in its marshal format
    )
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix not in WEIGHT_SUFFIXES:
            digest.update(f"|{path.name}|".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:32]


def _load_prepared(prepared: Path) -> PreTrainedTokenizerBase:
    """Build the tokenizer from its final backend and the keyword arguments transformers built it with."""
    spec = json.loads((prepared / "wrapper.json").read_text())
    tokenizer_class = _tokenizer_class(spec["class"])
    kwargs = tokenizer_class.convert_added_tokens(spec["init_kwargs"], save=False)
    # The backend file holds every added token already. Passed in, Gemma's ~6,400 would be deep-
    # copied and added to the backend once more (~0.2 s of a start): they go back into the
    # arguments afterwards, so the wrapper is as transformers built it (`same_tokenizer` checks).
    added_tokens = kwargs.pop("added_tokens_decoder", None)
    # GemmaTokenizer's own __init__ only builds a default backend, then calls TokenizersBackend's,
    # which would deep-copy a backend passed in (~1.4 s: the copy goes through JSON) or parse a
    # file (~1.2 s). So the prepared backend is set first and TokenizersBackend's __init__ runs
    # on it with the arguments it got before. A class whose __init__ did more is caught by
    # `same_tokenizer` at preparation (its attributes differ) and is not prepared.
    tokenizer = tokenizer_class.__new__(tokenizer_class)
    tokenizer._tokenizer = load_backend(prepared)
    TokenizersBackend.__init__(tokenizer, **kwargs)
    if added_tokens is not None:  # JSON turned its integer keys into strings
        tokenizer.init_kwargs["added_tokens_decoder"] = {int(index): token for index, token in added_tokens.items()}
    return tokenizer


def _tokenizer_class(name: str) -> type[TokenizersBackend]:
    """Resolve a stored class name, accepting only transformers' own Rust-backed tokenizers."""
    module, _, qualname = name.partition(":")
    if module != "transformers" and not module.startswith("transformers."):
        raise ValueError(f"tokenizer class {name!r} is not from transformers")
    tokenizer_class = getattr(importlib.import_module(module), qualname)
    if not (isinstance(tokenizer_class, type) and issubclass(tokenizer_class, TokenizersBackend)):
        raise ValueError(f"tokenizer class {name!r} is not a TokenizersBackend")
    return tokenizer_class


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, folder: Path, prepared: Path) -> None:
    """Write the fast-loading form under the model cache, atomically, only if it loads back identical."""
    if not isinstance(tokenizer, TokenizersBackend):
        return  # a Python or sentencepiece tokenizer has no single backend file to reload from
    try:
        prepared.parent.mkdir(parents=True, exist_ok=True)
        # No lock is held here: another worker's staging, in use, is younger than this.
        remove_scratch(prepared.parent, ".staging-", older_than_s=ABANDONED_STAGING_S)
        staging = Path(tempfile.mkdtemp(dir=prepared.parent, prefix=".staging-"))
    except OSError as exc:  # a read-only cache: every start takes the full load
        log.warning("tokenizer_not_prepared", folder=str(folder), error=str(exc))
        return
    try:
        # The split BPE form loads fastest; the whole backend file is the form to fall back on.
        for split_bpe in (True, False):
            _write_prepared(tokenizer, folder, staging, split_bpe=split_bpe)
            if same_tokenizer(_load_prepared(staging), tokenizer):
                break
            for path in staging.iterdir():
                path.unlink()
        else:
            log.warning("tokenizer_not_prepared", folder=str(folder), reason="reloaded tokenizer differs")
            return
        share_and_flush(staging)
        _publish(staging, prepared)
        _remove_stale_prepared(prepared)
    # Only a speed-up: whatever goes wrong (tokenizers raises bare Exceptions), the loaded tokenizer stands.
    except Exception as exc:
        log.warning("tokenizer_not_prepared", folder=str(folder), error=str(exc))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_prepared(tokenizer: TokenizersBackend, folder: Path, staging: Path, *, split_bpe: bool) -> None:
    """Write the final Rust backend and the arguments the Python wrapper was built with."""
    save_backend(tokenizer.backend_tokenizer, staging, split_bpe=split_bpe)
    kwargs = tokenizer.convert_added_tokens(copy.deepcopy(tokenizer.init_kwargs), save=True)
    wrapper = {"class": f"{type(tokenizer).__module__}:{type(tokenizer).__qualname__}",
               "source": str(folder.resolve()), "init_kwargs": kwargs}
    (staging / "wrapper.json").write_text(json.dumps(wrapper))


def _publish(staging: Path, prepared: Path) -> None:
    """Rename a finished folder into place; readers never see it half-written."""
    try:
        os.rename(staging, prepared)
    except OSError:
        if not prepared.is_dir():
            raise
        # Another worker published the same fingerprint first; its copy serves as well.


def _mark_used(prepared: Path) -> None:
    """Note that a prepared tokenizer served a start (its folder's time): in use, it is not stale."""
    try:
        os.utime(prepared)
    except OSError:
        pass  # a read-only cache: it is not cleaned up by this process either


def _remove_stale_prepared(current: Path) -> None:
    """Delete prepared tokenizers of the same source folder (an earlier version of it, or of the
    libraries), or of a source that is gone, that no start used for STALE_PREPARED_S.

    Not at once: two releases sharing a cache in a rolling upgrade deleted each other's at every
    start, and each start took the ~5 s load.
    """
    source = json.loads((current / "wrapper.json").read_text())["source"]
    unused_since = time.time() - STALE_PREPARED_S
    for other in current.parent.iterdir():
        if other == current or other.name.startswith(".") or not (other / "wrapper.json").is_file():
            continue
        try:
            if other.stat().st_mtime > unused_since:
                continue
            other_source = json.loads((other / "wrapper.json").read_text()).get("source")
        except (OSError, ValueError):
            continue  # another worker is replacing it; leave it to them
        if other_source == source or not (other_source and Path(other_source).is_dir()):
            shutil.rmtree(other, ignore_errors=True)


def same_tokenizer(candidate: PreTrainedTokenizerBase, reference: PreTrainedTokenizerBase) -> bool:
    """Return whether two tokenizers have the same class, backend, settings and probe encodings."""
    return (
        type(candidate) is type(reference)
        and candidate.backend_tokenizer.to_str() == reference.backend_tokenizer.to_str()
        and _tokenizer_settings(candidate) == _tokenizer_settings(reference)
        and _plain_attributes(candidate) == _plain_attributes(reference)
        and all(candidate.encode(text) == reference.encode(text) for text in TOKENIZER_PROBES)
    )


def _tokenizer_settings(tokenizer: PreTrainedTokenizerBase) -> str:
    """Serialize what the Python side of a tokenizer decides: init arguments, special tokens, sides."""
    kwargs = tokenizer.convert_added_tokens(copy.deepcopy(tokenizer.init_kwargs), save=True)
    settings = [kwargs, repr(tokenizer), tokenizer.chat_template, tokenizer.all_special_ids, len(tokenizer)]
    return json.dumps(settings, sort_keys=True, default=str)


def _plain_attributes(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """Return a wrapper's own attributes (those not building its default backend), containers
    and objects by type name only: what a subclass's skipped __init__ would have set shows here."""
    plain = (str, int, float, bool, type(None))
    return {name: value if isinstance(value, plain) else type(value).__name__
            for name, value in vars(tokenizer).items() if name not in DEFAULT_BACKEND_INPUTS}
