"""The float32 copy of a converted model: written by the first float32 load, loaded (without a
cast) by the next, equal to the bf16 weights upcast, and rewritten when it is broken."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shared.registry import DEFAULT_MODEL_ID, ModelRegistry
from workers.batch_engine import generate_alone
from workers.model_loader import load_model

pytestmark = pytest.mark.e2e

PARAMS = {"prompt": "The capital of France is", "max_new_tokens": 8, "temperature": 0}


@pytest.fixture()
def cache_root(model_cache_dir: Path, tmp_path: Path) -> Path:
    """A cache holding the session's converted (bf16) model, linked file by file, without its copy."""
    source = model_cache_dir / DEFAULT_MODEL_ID
    target = tmp_path / "models" / DEFAULT_MODEL_ID
    target.mkdir(parents=True)
    for path in source.iterdir():
        if path.is_file():
            (target / path.name).symlink_to(path)
    return tmp_path / "models"


def _load(cache_root: Path, dtype: torch.dtype):
    return load_model(ModelRegistry.load(None).get(DEFAULT_MODEL_ID), cache_root, torch.device("cpu"), dtype)


def test_the_first_float32_load_writes_a_copy_that_the_next_loads_with_the_same_weights(cache_root):
    copy = cache_root / DEFAULT_MODEL_ID / "float32"
    bf16 = _load(cache_root, torch.bfloat16)
    assert not copy.exists()  # bf16 workers load the converted weights as they are

    first = _load(cache_root, torch.float32)
    assert (copy / "model.safetensors").is_file()
    second = _load(cache_root, torch.float32)
    assert Path(second.model.config._name_or_path) == copy

    expected = {name: tensor.float() for name, tensor in bf16.model.state_dict().items()}
    for loaded in (first, second):
        weights = loaded.model.state_dict()
        assert weights.keys() == expected.keys()
        assert all(weights[name].dtype == torch.float32 for name in weights)
        assert all(torch.equal(weights[name], expected[name]) for name in expected)
    assert generate_alone(second, PARAMS).token_ids == generate_alone(first, PARAMS).token_ids


def test_a_broken_copy_is_replaced_and_the_model_still_loads(cache_root):
    first = _load(cache_root, torch.float32)
    copy = cache_root / DEFAULT_MODEL_ID / "float32"
    (copy / "model.safetensors").write_bytes(b"not safetensors")

    loaded = _load(cache_root, torch.float32)
    assert generate_alone(loaded, PARAMS).token_ids == generate_alone(first, PARAMS).token_ids
    assert (copy / "model.safetensors").stat().st_size > 1_000_000_000  # written again, whole
    assert Path(_load(cache_root, torch.float32).model.config._name_or_path) == copy
