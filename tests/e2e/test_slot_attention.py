"""The slot cache's two attention paths on the real model, on any CPU: in bf16 with fixed rows a
batch gives each job's tokens alone, and the batched attention a GPU runs gives the same greedy
tokens as the exact per-row attention (float32)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from shared.registry import DEFAULT_MODEL_ID, ModelRegistry
from tests.e2e.test_batching import MIXED_JOBS
from workers.batch_engine import BatchEngine
from workers.model_loader import load_model

pytestmark = pytest.mark.e2e


def _load(model_cache_dir: Path, dtype: torch.dtype):
    return load_model(ModelRegistry.load(None).get(DEFAULT_MODEL_ID), model_cache_dir, torch.device("cpu"), dtype)


def _run(loaded, jobs: list[dict], max_batch: int, exact_attention: bool | None = None) -> list[list[int]]:
    engine = BatchEngine(loaded, max_batch=max_batch, exact_attention=exact_attention)
    sequences = [engine.submit(dict(params)) for params in jobs]
    while not all(sequence.done.is_set() for sequence in sequences):
        engine.step()
    return [sequence.result().token_ids for sequence in sequences]


def test_a_bf16_batch_with_fixed_rows_gives_each_job_its_tokens_alone(model_cache_dir):
    loaded = _load(model_cache_dir, torch.bfloat16)
    batched = _run(loaded, MIXED_JOBS, max_batch=8)
    assert BatchEngine(loaded, max_batch=8).batch.fixed_rows
    for params, tokens in zip(MIXED_JOBS, batched):
        assert _run(loaded, [params], max_batch=8)[0] == tokens, params


def test_a_float32_job_alone_runs_the_numbers_it_runs_batched(model_cache_dir):
    """A step of one row decoded otherwise than the same row among several (a one-row float32
    product takes other kernels on the CPU): a job alone and batched could part at a near-tie."""
    loaded = _load(model_cache_dir, torch.float32)
    first, second = ({"prompt": prompt, "max_new_tokens": 5, "temperature": 0}
                     for prompt in ("The history of Rome", "Dear John,"))
    seen: list[torch.Tensor] = []
    hook = loaded.model.lm_head.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0][0].clone()))
    try:
        alone = _run(loaded, [first], max_batch=1)
        alone_rows, seen[:] = list(seen), []
        batched = _run(loaded, [first, second], max_batch=4)
    finally:
        hook.remove()
    # The output layer's input for the first job (row 0) at its prefill and every decode step.
    assert len(alone_rows) == len(seen) == 5 and alone[0] == batched[0]
    assert all(torch.equal(a, b) for a, b in zip(alone_rows, seen))


def test_batched_attention_gives_the_exact_attentions_greedy_tokens(model_cache_dir):
    loaded = _load(model_cache_dir, torch.float32)
    greedy = [params for params in MIXED_JOBS if "seed" not in params]
    exact = _run(loaded, greedy, max_batch=len(greedy), exact_attention=True)
    assert _run(loaded, greedy, max_batch=len(greedy), exact_attention=False) == exact
    assert all(len(tokens) > 0 for tokens in exact)


def test_the_packing_probe_runs_in_the_thread_that_steps_not_where_the_engine_is_made(model_cache_dir, monkeypatch):
    # Multi-threaded torch work in another thread (e.g. a task thread creating the engine) left
    # an OpenMP team there that slowed every engine step by ~20% on 2 cores.
    from workers import batch_engine, row_invariance

    threads = []

    def recording_probe(*args, **kwargs):
        threads.append(threading.current_thread())
        return row_invariance.invariant_rows(*args, **kwargs)

    monkeypatch.setattr(batch_engine, "invariant_rows", recording_probe)
    loaded = _load(model_cache_dir, torch.bfloat16)
    engine = BatchEngine(loaded, max_batch=2)
    assert threads == []
    output = engine.generate({"prompt": "Hello", "max_new_tokens": 2, "temperature": 0})
    assert len(output.token_ids) == 2
    assert [thread.name for thread in threads] == ["batch-engine"]
