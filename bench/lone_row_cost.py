"""What row invariance costs a lone float32 job on the CPU: its decode steps and output layer
run two rows (itself and a dummy), so that its bits are those it gets batched.

    .venv/bin/python bench/lone_row_cost.py --rounds 5 --new-tokens 48

Baseline: the same engine running one row (as before b5ccb58: `min_rows` 1). Result: two rows
(the engine's float32 CPU setting). One greedy job alone, the same prompt, alternating
baseline and result each round in this process; medians of tokens/s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from shared.registry import DEFAULT_MODEL_ID, ModelRegistry
from workers.batch_engine import BatchEngine
from workers.model_loader import load_model

PROMPT = "The history of Rome"


def tokens_per_s(loaded, new_tokens: int, min_rows: int) -> float:
    """Run one greedy job alone on a one-slot engine stepping `min_rows` rows; return its tokens/s."""
    engine = BatchEngine(loaded, max_batch=1)
    engine.batch.min_rows = min_rows
    started = time.perf_counter()
    sequence = engine.submit({"prompt": PROMPT, "max_new_tokens": new_tokens, "temperature": 0})
    while not sequence.done.is_set():
        engine.step()
    return len(sequence.result().token_ids) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=48)
    args = parser.parse_args()
    cache = Path(os.environ.get("GEMMA_JOBS_MODEL_CACHE_DIR", "var/models"))
    loaded = load_model(ModelRegistry.load(None).get(DEFAULT_MODEL_ID), cache, torch.device("cpu"), torch.float32)
    tokens_per_s(loaded, 4, 2)  # warm-up
    one, two = [], []
    for _ in range(args.rounds):
        one.append(tokens_per_s(loaded, args.new_tokens, 1))
        two.append(tokens_per_s(loaded, args.new_tokens, 2))
    print(f"settings: float32 CPU, one greedy job alone, {args.new_tokens} new tokens, {args.rounds} alternating "
          f"rounds, torch threads {torch.get_num_threads()}")
    print(f"baseline  one row per step : {statistics.median(one):6.1f} tok/s  {[round(x, 1) for x in one]}")
    print(f"result    two rows per step: {statistics.median(two):6.1f} tok/s  {[round(x, 1) for x in two]}")
    print(f"ratio     result / baseline: {statistics.median(two) / statistics.median(one):.2f}")


if __name__ == "__main__":
    main()
