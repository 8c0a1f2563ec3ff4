"""Why torch work outside the engine's thread slows the engine: the batching engine stepped in a
thread of its own, with no other thread having run multi-threaded torch work (baseline) vs after
another, still-live thread ran one multi-threaded step (each torch thread that runs parallel
work keeps an OpenMP team while it lives), and vs after a thread that did the same and ended.

Each case runs in a fresh process (a team cannot be undone in a live thread), alternating for
--rounds rounds; 16 greedy jobs x 32 tokens in bf16 on the CPU, the prompts of bench/batching.py.
This is what the worker avoids by doing the packing probe in the engine's thread and training
in a thread that ends with the job. Run from the repo root:

    GEMMA_JOBS_MODEL_CACHE_DIR=var/models .venv/bin/python bench/openmp_teams.py
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import threading
import time

CASES = {
    "engine thread only": "none",
    "after 2-thread work in a live thread": "live",
    "after 2-thread work in an ended thread": "ended",
}


def measure(case: str, new_tokens: int) -> float:
    """In this process: set up `case`, then return the tokens/s of the engine stepped in its own thread."""
    import torch
    from batching import prompts

    from shared.registry import DEFAULT_MODEL_ID, ModelRegistry
    from shared.settings import load_settings
    from workers.batch_engine import BatchEngine
    from workers.model_loader import load_model

    entry = ModelRegistry.load(None).get(DEFAULT_MODEL_ID)
    loaded = load_model(entry, load_settings().model_cache_path, torch.device("cpu"), torch.bfloat16)
    texts = prompts(16)

    def stepped(tokens: int) -> float:
        engine = BatchEngine(loaded, max_batch=len(texts))
        sequences = [engine.submit({"prompt": t, "max_new_tokens": tokens, "temperature": 0}) for t in texts]
        started = time.perf_counter()
        while not all(sequence.done.is_set() for sequence in sequences):
            engine.step()
        return sum(len(s.result().token_ids) for s in sequences) / (time.perf_counter() - started)

    if case == "live":
        stepped(2)  # this (main) thread lives on with its team
    elif case == "ended":
        other = threading.Thread(target=stepped, args=(2,))
        other.start()
        other.join()
    results: list[float] = []
    engine_thread = threading.Thread(target=lambda: results.extend([stepped(2), stepped(new_tokens)]))
    engine_thread.start()
    engine_thread.join()
    return results[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--case", choices=list(CASES.values()), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(measure(args.case, args.new_tokens))
        return
    import torch

    print(f"settings: bf16 CPU, {torch.get_num_threads()} torch threads, 16 greedy jobs x {args.new_tokens} tokens, "
          f"{args.rounds} alternating rounds of fresh processes (medians)")
    results: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(args.rounds):
        for name, case in CASES.items():
            out = subprocess.run([sys.executable, __file__, "--case", case, "--new-tokens", str(args.new_tokens)],
                                 capture_output=True, text=True, check=True).stdout
            results[name].append(float(out.strip().splitlines()[-1]))
    base = statistics.median(results["engine thread only"])
    for name, values in results.items():
        median = statistics.median(values)
        print(f"{name:40}: {median:6.1f} tok/s (rounds: {', '.join(f'{v:.1f}' for v in values)}) "
              f"ratio to baseline {median / base:.2f}")


if __name__ == "__main__":
    main()
