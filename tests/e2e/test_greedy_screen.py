"""The greedy screen on the real model: a mixed batch gives the same tokens with the screen as
with the full float32 output layer, each job alone gives what it gives in the batch, and the
worker turns the screen on only where it applies."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shared.registry import DEFAULT_MODEL_ID, ModelRegistry
from tests.e2e.test_batching import MIXED_JOBS
from workers.batch_engine import BatchEngine
from workers.cpu_threads import cpu_has_bf16_dot
from workers.greedy_screen import GreedyScreen, greedy_screen_for
from workers.model_loader import load_model

pytestmark = pytest.mark.e2e


def _load(model_cache_dir: Path, dtype: torch.dtype):
    return load_model(ModelRegistry.load(None).get(DEFAULT_MODEL_ID), model_cache_dir, torch.device("cpu"), dtype)


@pytest.fixture(scope="module")
def loaded(model_cache_dir: Path):
    return _load(model_cache_dir, torch.float32)


def _run(loaded, jobs: list[dict], screen: GreedyScreen | None) -> list[list[int]]:
    engine = BatchEngine(loaded, max_batch=len(jobs), greedy_screen=screen)
    sequences = [engine.submit(dict(params)) for params in jobs]
    while not all(sequence.done.is_set() for sequence in sequences):
        engine.step()
    return [sequence.result().token_ids for sequence in sequences]


def test_a_mixed_batch_gives_the_same_tokens_with_the_screen_and_each_job_alone_too(loaded):
    screen = GreedyScreen(loaded.model.lm_head.weight)
    full = _run(loaded, MIXED_JOBS, None)
    screened = _run(loaded, MIXED_JOBS, screen)
    assert screened == full
    assert [_run(loaded, [params], screen)[0] for params in MIXED_JOBS] == screened


def test_the_worker_screens_only_float32_cpu_models_and_auto_follows_the_cpu(loaded, model_cache_dir):
    assert greedy_screen_for(loaded, "off") is None
    assert isinstance(greedy_screen_for(loaded, "on"), GreedyScreen)
    assert (greedy_screen_for(loaded, "auto") is not None) == cpu_has_bf16_dot()
    assert greedy_screen_for(_load(model_cache_dir, torch.bfloat16), "on") is None  # nothing to screen in bf16
