"""Exact decode attention on the CPU: one unmasked call per distinct row length (baseline, the
fifth session's path) vs one masked call per 64-column span (workers/slot_cache.py), same process.

Runs the batching engine alone (bf16, no stack) over 16 greedy jobs of 32 new tokens, the
prompts of bench/batching.py (several distinct lengths), alternating the two paths for
--rounds rounds, and prints tokens/s, the median decode step, the ratio, and whether every
job's tokens were identical. The baseline swaps in `per_length_groups` for the spans: rows
share a call only when their lengths are equal, over exactly their columns, without a mask.
A raw padded `generate` over the same prompts is printed as the reference (a). Run from the
repo root:

    GEMMA_JOBS_MODEL_CACHE_DIR=var/models .venv/bin/python bench/exact_attention.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from batching import prompts

from shared.registry import DEFAULT_MODEL_ID, ModelRegistry
from shared.settings import load_settings
from workers import slot_cache
from workers.batch_engine import BatchEngine
from workers.model_loader import load_model

SPAN_GROUPS = slot_cache.SlotRows.span_groups


def per_length_groups(rows: slot_cache.SlotRows, window: int | None) -> list:
    """The fifth session's grouping: rows of one length share an unmasked call over exactly their columns."""
    by_length: dict[int, list[int]] = {}
    for row, length in enumerate(rows.lengths):
        by_length.setdefault(length, []).append(row)
    groups = []
    for length, members in by_length.items():
        index = torch.tensor(members)
        groups.append((slice(max(0, length - window) if window else 0, length), index, rows.slot_index[index], None))
    return groups


PATHS = {"per length": per_length_groups, "per 64-column span": SPAN_GROUPS}


def run(loaded, texts: list[str], new_tokens: int, groups) -> tuple[list, float, float]:
    """Return each job's tokens, tokens/s (prefill included) and the median decode step in ms."""
    slot_cache.SlotRows.span_groups = groups
    engine = BatchEngine(loaded, max_batch=len(texts))
    sequences = [engine.submit({"prompt": t, "max_new_tokens": new_tokens, "temperature": 0}) for t in texts]
    started, steps = time.perf_counter(), []
    while not all(sequence.done.is_set() for sequence in sequences):
        step_started = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - step_started)
    elapsed = time.perf_counter() - started
    tokens = [s.result().token_ids for s in sequences]
    return tokens, sum(map(len, tokens)) / elapsed, statistics.median(steps[1:]) * 1000


def raw_generate(loaded, texts: list[str], new_tokens: int) -> float:
    """Return tokens/s of one left-padded greedy `generate` over the prompts (plain SDPA)."""
    loaded.model.set_attn_implementation("sdpa")
    loaded.tokenizer.padding_side = "left"
    batch = loaded.tokenizer(texts, return_tensors="pt", padding=True)
    started = time.perf_counter()
    with torch.inference_mode():
        loaded.model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              top_p=None, top_k=None, pad_token_id=loaded.tokenizer.pad_token_id)
    loaded.model.set_attn_implementation(slot_cache.SLOT_ATTENTION)
    return len(texts) * new_tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    entry = ModelRegistry.load(None).get(DEFAULT_MODEL_ID)
    loaded = load_model(entry, load_settings().model_cache_path, torch.device("cpu"), torch.bfloat16)
    texts = prompts(args.jobs)
    lengths = sorted({len(loaded.tokenizer(t).input_ids) for t in texts})
    print(f"settings: {DEFAULT_MODEL_ID} bf16 CPU, {torch.get_num_threads()} threads, {args.jobs} greedy jobs x "
          f"{args.new_tokens} tokens, prompt lengths {lengths}, {args.rounds} alternating rounds (medians)")
    for groups in PATHS.values():  # warm-up
        run(loaded, texts[:2], 4, groups)
    results = {name: [] for name in PATHS}
    raws = []
    for _ in range(args.rounds):
        raws.append(raw_generate(loaded, texts, args.new_tokens))
        for name, groups in PATHS.items():
            results[name].append(run(loaded, texts, args.new_tokens, groups))
    for name, runs in results.items():
        print(f"{name:20}: {statistics.median(r[1] for r in runs):6.1f} tok/s, decode step "
              f"{statistics.median(r[2] for r in runs):5.1f} ms (rounds: {', '.join(f'{r[1]:.1f}' for r in runs)})")
    base, new = (statistics.median(r[1] for r in results[name]) for name in PATHS)
    same = all(a[0] == b[0] for a, b in zip(*results.values()))
    print(f"raw generate (reference): {statistics.median(raws):6.1f} tok/s")
    print(f"ratio span / per length: {new / base:.2f}; engine / raw generate: {base / statistics.median(raws):.2f} "
          f"-> {new / statistics.median(raws):.2f}; tokens identical on both paths: {same}")


if __name__ == "__main__":
    main()
