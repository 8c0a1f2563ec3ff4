"""Where bf16 batches lose token identity: a probe for a batch-invariant bf16 engine.

CPU workers batch in fp32 because in bf16 a job's greedy tokens change with its batch. This
runs the batching engine in bf16 on 16 prompts and counts the jobs whose 32 greedy tokens are
the same:
1. batched (prompts of different lengths, left-padded) vs each prompt alone (one row);
2. the same batch vs each prompt alone but repeated to 16 rows (same matrix shapes, no padding);
3. prompts of one length (no padding at all) batched vs each alone repeated to 16 rows.
If 3 is 16/16 while 1 and 2 are not, the linear layers are row-invariant at a fixed row count
and the padding is what changes the numbers. Run from the repo root:

    GEMMA_JOBS_MODEL_CACHE_DIR=var/models .venv/bin/python bench/bf16_invariance.py
"""

from __future__ import annotations

import torch

from shared.registry import DEFAULT_MODEL_ID, ModelRegistry
from shared.settings import load_settings
from workers.batch_engine import BatchEngine
from workers.model_loader import load_model

NEW_TOKENS = 32


def run(loaded, prompts: list[str]) -> list[list[int]]:
    """Return each prompt's greedy tokens, all run together in one engine."""
    engine = BatchEngine(loaded, max_batch=len(prompts))
    sequences = [engine.submit({"prompt": p, "max_new_tokens": NEW_TOKENS, "temperature": 0}) for p in prompts]
    while not all(sequence.done.is_set() for sequence in sequences):
        engine.step()
    return [sequence.result().token_ids for sequence in sequences]


def same(first: list, second: list) -> str:
    return f"{sum(a == b for a, b in zip(first, second))}/{len(first)}"


def main() -> None:
    entry = ModelRegistry.load(None).get(DEFAULT_MODEL_ID)
    loaded = load_model(entry, load_settings().model_cache_path, torch.device("cpu"), torch.bfloat16)
    mixed = [("The history of printing " * (1 + i % 4)) + f"chapter {i}:" for i in range(16)]
    even = [f"The history of printing, chapter {i}:" for i in range(10, 26)]
    batched = run(loaded, mixed)
    print(f"settings: {DEFAULT_MODEL_ID} bf16 CPU, {torch.get_num_threads()} threads, greedy, {NEW_TOKENS} tokens")
    print(f"1. mixed lengths, batched vs alone (1 row)              : "
          f"{same(batched, [run(loaded, [p])[0] for p in mixed])}")
    print(f"2. mixed lengths, batched vs alone repeated to 16 rows  : "
          f"{same(batched, [run(loaded, [p] * 16)[0] for p in mixed])}")
    print(f"3. one length (no padding), batched vs alone x16 rows  : "
          f"{same(run(loaded, even), [run(loaded, [p] * 16)[0] for p in even])}")


if __name__ == "__main__":
    main()
