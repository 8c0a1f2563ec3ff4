"""Greedy screen: a float32 engine's decode steps with the full output layer (baseline) vs the
bf16 screen (workers/greedy_screen.py), same prompts, same process, tokens compared.

Runs the batching engine alone (no stack) over greedy jobs of 32 new tokens at batch sizes 16
and 1, and prints milliseconds per decode step, the ratio, and whether every job's tokens
were identical. Run from the repo root:

    GEMMA_JOBS_MODEL_CACHE_DIR=var/models .venv/bin/python bench/greedy_screen.py
"""

from __future__ import annotations

import argparse
import time

import torch

from shared.registry import DEFAULT_MODEL_ID, ModelRegistry
from shared.settings import load_settings
from workers.batch_engine import BatchEngine
from workers.cpu_threads import cpu_has_bf16_dot
from workers.greedy_screen import GreedyScreen
from workers.model_loader import load_model


def run(loaded, prompts: list[str], new_tokens: int, screen: GreedyScreen | None) -> tuple[list, float]:
    """Return each job's tokens and the mean milliseconds of a decode step."""
    engine = BatchEngine(loaded, max_batch=len(prompts), greedy_screen=screen)
    sequences = [engine.submit({"prompt": p, "max_new_tokens": new_tokens, "temperature": 0}) for p in prompts]
    engine.step()  # the prefill, not timed
    started, steps = time.perf_counter(), 0
    while not all(sequence.done.is_set() for sequence in sequences):
        engine.step()
        steps += 1
    return [s.result().token_ids for s in sequences], (time.perf_counter() - started) / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="16,1")
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    entry = ModelRegistry.load(None).get(DEFAULT_MODEL_ID)
    loaded = load_model(entry, load_settings().model_cache_path, torch.device("cpu"), torch.float32)
    screen = GreedyScreen(loaded.model.lm_head.weight)
    print(f"settings: {DEFAULT_MODEL_ID} float32 CPU, {torch.get_num_threads()} threads, greedy, "
          f"{args.new_tokens} new tokens; CPU has bf16 dot products: {cpu_has_bf16_dot()}")
    for size in (int(s) for s in args.batch_sizes.split(",")):
        prompts = [("The history of printing " * (1 + i % 4)) + f"chapter {i}:" for i in range(size)]
        full_tokens, full_ms = run(loaded, prompts, args.new_tokens, None)
        screen_tokens, screen_ms = run(loaded, prompts, args.new_tokens, screen)
        same = sum(a == b for a, b in zip(full_tokens, screen_tokens))
        print(f"batch {size:2d}: baseline full output layer {full_ms:6.1f} ms/step | screen {screen_ms:6.1f} ms/step"
              f" | ratio {full_ms / screen_ms:.2f}x faster | identical jobs {same}/{size}")


if __name__ == "__main__":
    main()
