"""A model that cannot load is unavailable, not the end of the worker; what a killed conversion
or copy leaves behind is cleared before the next one."""

from __future__ import annotations

import json
import stat

import pytest
import torch

from shared.registry import DEFAULT_MODEL_ID, ModelEntry, ModelRegistry
from workers.cache_files import _umask, share_and_flush
from workers.model_cache import ModelCache
from workers.model_loader import SOURCE_FILE, ModelUnavailable, _save_float32_copy, weights_dir


def test_a_cache_that_cannot_be_written_makes_the_model_unavailable(tmp_path):
    """A read-only or full cache raised OSError out of the worker's preload: it exited."""
    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("")
    cache = ModelCache(ModelRegistry.load(None), not_a_folder, torch.device("cpu"))
    cache.preload([DEFAULT_MODEL_ID])  # logged, not raised
    assert cache.loaded_ids() == []
    with pytest.raises(ModelUnavailable, match=rf"model '{DEFAULT_MODEL_ID}': cannot load: (FileExists|NotADirectory)Error"):
        cache.get(DEFAULT_MODEL_ID)


def test_a_conversion_first_clears_a_half_deleted_cache_and_killed_conversions(tmp_path):
    entry = ModelEntry(id="my-gguf", gguf_file=tmp_path / "gone.gguf")
    killed = tmp_path / ".my-gguf-x1y2z3_4"  # the scratch folder of a conversion that was SIGKILLed
    (killed / "out").mkdir(parents=True)
    emptied = tmp_path / "my-gguf" / "float32"  # `rm my-gguf/*` leaves the float32 copy's folder
    emptied.mkdir(parents=True)
    other = tmp_path / ".my-gguf-short-a1b2c3d4"  # model my-gguf-short's: converted under its own lock
    other.mkdir()
    with pytest.raises(ModelUnavailable, match="gone.gguf not found"):
        weights_dir(entry, tmp_path)
    assert not killed.exists() and not (tmp_path / "my-gguf").exists() and other.exists()


def test_a_float32_copy_clears_the_scratch_of_a_copy_that_was_killed(tmp_path):
    copy = tmp_path / "my-gguf" / "float32"
    copy.mkdir(parents=True)
    (copy / "config.json").write_text("{}")
    killed = tmp_path / "my-gguf" / ".float32-k1l2m3n4"
    killed.mkdir()
    _save_float32_copy(None, copy)  # written already: nothing to save
    assert not killed.exists() and (copy / "config.json").is_file()


def test_a_published_folder_is_readable_by_every_user(tmp_path):
    """safetensors writes 0600 files, mkdtemp 0700 folders: another account's worker could not load them."""
    staged = tmp_path / "staged"
    (staged / "sub").mkdir(parents=True, mode=0o700)
    staged.chmod(0o700)
    for name in ("model.safetensors", "sub/tokenizer.json"):
        (staged / name).write_text("x")
        (staged / name).chmod(0o600)
    share_and_flush(staged)
    umask = _umask()
    assert stat.S_IMODE(staged.stat().st_mode) == stat.S_IMODE((staged / "sub").stat().st_mode) == 0o755 & ~umask
    assert stat.S_IMODE((staged / "sub/tokenizer.json").stat().st_mode) == 0o644 & ~umask
    assert umask & 0o044 == 0 and (staged / "model.safetensors").stat().st_mode & 0o044 == 0o044


def test_a_cache_converted_from_another_gguf_is_converted_again(tmp_path):
    """Kept by id alone, an id pointed at another GGUF went on serving the old weights."""
    gguf = tmp_path / "new.gguf"
    gguf.write_bytes(b"not a real GGUF")  # the conversion fails on it, after the stale cache went
    entry = ModelEntry(id="my-gguf", gguf_file=gguf)
    target = tmp_path / "cache" / "my-gguf"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    (target / SOURCE_FILE).write_text(json.dumps({"source": f"{tmp_path / 'old.gguf'}:1:1"}))
    with pytest.raises(Exception):  # noqa: B017 - whatever transformers raises on a broken file
        weights_dir(entry, tmp_path / "cache")
    assert not target.exists()


@pytest.mark.parametrize("recorded", [None, "this one"])
def test_a_cache_converted_from_this_source_or_before_sources_were_recorded_serves(tmp_path, recorded):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    entry = ModelEntry(id="my-gguf", gguf_file=gguf)
    target = tmp_path / "cache" / "my-gguf"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    if recorded:
        stat = gguf.stat()
        (target / SOURCE_FILE).write_text(json.dumps({"source": f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"}))
    assert weights_dir(entry, tmp_path / "cache") == target
