"""Token identity of bf16 batches, the reason for the slot cache's design.

Runs the batching engine in bf16 on 16 prompts and counts the jobs whose 32 greedy tokens are
the same:
1. batched (prompts of different lengths) vs each prompt alone in a one-slot engine;
2. the same batch vs each prompt alone in a 16-slot engine (the same shapes: what a batching
   worker guarantees);
3. prompts of one length batched vs each alone in a 16-slot engine.
With the former left-padded cache these were 10/16, 8/16 and 16/16: padding changed the
numbers. With the slot cache (per-row attention over each row's own columns, fixed rows in
bf16) all three should be 16/16; 1 also needs the CPU's matrix products to give a row the
same result at 1 row as at 16 (true on the CPUs measured so far). Run from the repo root:

    GEMMA_JOBS_MODEL_CACHE_DIR=var/models .venv/bin/python bench/bf16_invariance.py
"""

from __future__ import annotations

import torch

from shared.registry import DEFAULT_MODEL_ID, ModelRegistry
from shared.settings import load_settings
from workers.batch_engine import BatchEngine
from workers.model_loader import load_model

NEW_TOKENS = 32


def run(loaded, prompts: list[str], slots: int = 16) -> list[list[int]]:
    """Return each prompt's greedy tokens, all run together in one engine of `slots` slots."""
    engine = BatchEngine(loaded, max_batch=slots)
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
    print(f"1. mixed lengths, batched vs alone (one-slot engine)  : "
          f"{same(batched, [run(loaded, [p], slots=1)[0] for p in mixed])}")
    print(f"2. mixed lengths, batched vs alone (16-slot engine)   : "
          f"{same(batched, [run(loaded, [p])[0] for p in mixed])}")
    print(f"3. one length, batched vs alone (16-slot engine)      : "
          f"{same(run(loaded, even), [run(loaded, [p])[0] for p in even])}")


if __name__ == "__main__":
    main()
