"""Batching across jobs: (a) stack vs raw batched `generate`, (b) batching on vs off,
(c) mixed lengths arriving over time, continuous vs static batching.

    .venv/bin/python bench/batching.py [--jobs 16] [--new-tokens 32] [--mixed-jobs 16] [--rounds 3]

All in one run, on this machine's CPU, gemma-3-270m from the cached safetensors:
(a) raw: one transformers `generate` call over all prompts (left-padded, greedy, exactly
    --new-tokens each, in the dtype a batching CPU worker picks here: bf16 on a CPU with bf16
    dot products, else fp32); stack: the same prompts
    as concurrent HTTP jobs to one `gemma-jobs worker --concurrency <jobs>`, each client
    holding its request open with `Prefer: wait` until its job ends; clock from the first submit
    to the last result received, tokens counted from the results. --rounds
    alternates raw and stack runs and compares their medians (single runs swing ±20% here).
(a') the worker's batching engine alone in the driver's process, the same prompts submitted at
    once (no HTTP, queue or database): splits (a)'s gap into the engine's and the stack's.
(b) the same jobs with `--concurrency 1` (batching off: one job at a time, bf16, which is
    what such a worker picks as fastest for one sequence) and, where the batching worker runs
    fp32, also in fp32 for the same-dtype view.
(c) --mixed-jobs jobs with max_new_tokens spread log-uniformly from 8 to 256 (fixed seed), one submitted
    every --arrival-s seconds; continuous batching vs GEMMA_JOBS_BATCHING=static (a batch
    is admitted only when the previous one has finished). Short jobs are those of at most 32
    tokens; latency is finished_at - created_at.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import requests
from bench_processes import bench_stack

MODEL_DIR = Path(os.environ.get("GEMMA_JOBS_MODEL_CACHE_DIR", "var/models")) / "gemma-3-270m"
TOPICS = ["rivers", "ships", "clocks", "bees", "maps", "salt", "glass", "rails", "tea", "owls", "kites", "bells",
          "coal", "silk", "ink", "moss", "wax", "tin", "oak", "reed", "iron", "wool", "jade", "lime"]
WAIT_S = 60  # `Prefer: wait` of the (a)/(b) clients: the gateway's longest wait by default


def prompts(count: int) -> list[str]:
    """Return distinct prompts that keep generating (no early end of text)."""
    return [f"A detailed history of {TOPICS[i % len(TOPICS)]}, part {i + 1}:" for i in range(count)]


def batching_dtype(jobs: int) -> str:
    """Return the dtype a `--concurrency <jobs>` CPU worker generates in on this machine."""
    import torch

    from workers.model_loader import generation_dtype

    return str(generation_dtype(torch.device("cpu"), jobs)).removeprefix("torch.")


def raw_generate(texts: list[str], new_tokens: int, dtype: str) -> float:
    """Return tokens/s of one padded `generate` call over all prompts, in `dtype`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=getattr(torch, dtype)).eval()
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, temperature=None,
                   top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id)
    with torch.inference_mode():
        model.generate(**batch, **{**options, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
        started = time.perf_counter()
        model.generate(**batch, **options)
        return len(texts) * new_tokens / (time.perf_counter() - started)


def engine_alone(texts: list[str], new_tokens: int, dtype: str) -> float:
    """Return tokens/s of the worker's batching engine alone in this process (no stack), in `dtype`:
    the prompts submitted at once, `step()` until all are done (prefill included)."""
    import torch

    from shared.registry import ModelRegistry
    from workers.batch_engine import BatchEngine
    from workers.model_loader import load_model

    loaded = load_model(ModelRegistry.load(None).get("gemma-3-270m"), MODEL_DIR.parent, torch.device("cpu"),
                        getattr(torch, dtype))
    engine = BatchEngine(loaded, len(texts))
    params = {"max_new_tokens": new_tokens, "temperature": 0}
    sequences = [engine.submit({**params, "prompt": text}) for text in texts]
    started = time.perf_counter()
    while not all(sequence.done.is_set() for sequence in sequences):
        engine.step()
    return sum(len(s.result().token_ids) for s in sequences) / (time.perf_counter() - started)


def stack_tokens_per_s(workdir: Path, name: str, args, worker: list[str], env: dict[str, str]) -> float:
    """Return tokens/s for the jobs submitted at once to a fresh stack with one worker, clocked from
    the first submit to the last result received."""
    with bench_stack(workdir, name, args.redis_url, [worker], env) as stack:
        warm = {"model": "gemma-3-270m", "prompt": "Hi", "max_new_tokens": 2, "temperature": 0}
        stack.wait_all([stack.submit(warm)])
        bodies = [{"model": "gemma-3-270m", "prompt": text, "max_new_tokens": args.new_tokens, "temperature": 0}
                  for text in prompts(args.jobs)]
        started = time.perf_counter()
        jobs = _submit_concurrently(stack, bodies, wait_s=WAIT_S)
        elapsed = time.perf_counter() - started
    return sum(job["usage"]["completion_tokens"] for job in jobs) / elapsed


def _submit_concurrently(stack, bodies: list[dict], wait_s: float | None = None) -> list:
    """Submit all bodies at once, as concurrent clients would; return ids in body order, or with
    `wait_s` the ended jobs (each client holds its request open with `Prefer: wait`, as a client
    that wants the result does: no polling load on the machine, no polling interval in the clock)."""
    results: list = [None] * len(bodies)

    def send(index: int) -> None:
        if wait_s is None:
            results[index] = stack.submit(bodies[index])
            return
        response = requests.post(f"{stack.base_url}/v1/generations", json=bodies[index],
                                 headers={**stack.headers, "Prefer": f"wait={wait_s:g}"}, timeout=wait_s + 30)
        response.raise_for_status()
        job = response.json()
        # 202: still running after the server's longest wait; its end is polled for.
        results[index] = job if response.status_code == 200 else stack.wait_all([job["id"]])[0]

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if wait_s is not None and any(job is None or job["status"] != "succeeded" for job in results):
        raise SystemExit(f"not every job succeeded: {[job and job['status'] for job in results]}")
    return results


def mixed(workdir: Path, name: str, args, env: dict[str, str]) -> dict:
    """Run the mixed-length arrival pattern; return throughput and short-job latencies."""
    rng = random.Random(7)
    # Log-uniform from 8 to 256: about 40% short jobs, and a long tail.
    lengths = [int(8 * 32 ** rng.random()) for _ in range(args.mixed_jobs)]
    worker = ["--concurrency", str(args.jobs)]
    with bench_stack(workdir, name, args.redis_url, [worker], env) as stack:
        stack.wait_all([stack.submit({"model": "gemma-3-270m", "prompt": "Hi", "max_new_tokens": 2})])
        started = time.perf_counter()
        ids = []
        for text, length in zip(prompts(args.mixed_jobs), lengths):
            ids.append(stack.submit({"model": "gemma-3-270m", "prompt": text, "max_new_tokens": length,
                                     "temperature": 0}))
            time.sleep(args.arrival_s)
        jobs = stack.wait_all(ids)
        elapsed = time.perf_counter() - started
    latency = {job["id"]: (_at(job["finished_at"]) - _at(job["created_at"])).total_seconds() for job in jobs}
    short = sorted(latency[job["id"]] for job, length in zip(jobs, lengths) if length <= 32)
    return {
        "tokens_per_s": sum(job["usage"]["completion_tokens"] for job in jobs) / elapsed,
        "short_p50": statistics.median(short),
        "short_p95": short[min(len(short) - 1, round(0.95 * (len(short) - 1)))],
        "short_jobs": len(short),
    }


def _at(value: str) -> datetime:
    return datetime.fromisoformat(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--mixed-jobs", type=int, default=16)
    parser.add_argument("--arrival-s", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=1, help="(a): alternate raw and stack runs; medians")
    parser.add_argument("--skip", default="", help="comma list of parts to skip: a,b,c")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/11"))
    args = parser.parse_args()
    skip = set(args.skip.split(","))
    dtype = batching_dtype(args.jobs)
    print(f"settings: cpu cores={os.cpu_count()} model=gemma-3-270m greedy jobs={args.jobs} "
          f"new_tokens={args.new_tokens} batching dtype={dtype} database=sqlite gateway=1 process", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        workdir = Path(folder)
        batched = None
        if "a" not in skip or "b" not in skip:
            raws, engines, stacks = [], [], []
            for round_ in range(args.rounds if "a" not in skip else 1):
                worker = ["--concurrency", str(args.jobs)]
                stacks.append(stack_tokens_per_s(workdir, f"batched-{round_}", args, worker, {}))
                if "a" not in skip:
                    raws.append(raw_generate(prompts(args.jobs), args.new_tokens, dtype))
                    engines.append(engine_alone(prompts(args.jobs), args.new_tokens, dtype))
            batched = statistics.median(stacks)
        if "a" not in skip:
            raw, engine = statistics.median(raws), statistics.median(engines)
            print(f"(a) raw generate {dtype} batch {args.jobs}: {raw:.1f} tok/s | stack --concurrency {args.jobs}: "
                  f"{batched:.1f} tok/s | ratio {batched / raw:.2f} (medians of {args.rounds}: raw "
                  f"{', '.join(f'{value:.1f}' for value in raws)}; stack {', '.join(f'{v:.1f}' for v in stacks)})",
                  flush=True)
            print(f"(a') the worker's engine alone in this process: {engine:.1f} tok/s "
                  f"({', '.join(f'{v:.1f}' for v in engines)}) | engine / raw {engine / raw:.2f} | "
                  f"stack / engine {batched / engine:.2f}", flush=True)
        if "b" not in skip:
            off = stack_tokens_per_s(workdir, "off", args, ["--concurrency", "1"], {})
            same = ""
            if dtype != "bfloat16":
                off_same = stack_tokens_per_s(workdir, "off-same", args, ["--concurrency", "1"],
                                              {"GEMMA_JOBS_CPU_DTYPE": dtype})
                same = f" | off {dtype}: {off_same:.1f} tok/s, ratio {batched / off_same:.2f}"
            print(f"(b) batching off (--concurrency 1, bf16): {off:.1f} tok/s | on ({dtype}): {batched:.1f} tok/s | "
                  f"ratio {batched / off:.2f}{same}", flush=True)
        if "c" not in skip:
            static = mixed(workdir, "static", args, {"GEMMA_JOBS_BATCHING": "static"})
            continuous = mixed(workdir, "continuous", args, {})
            print(f"(c) mixed 8-256 tokens, {args.mixed_jobs} jobs every {args.arrival_s:g} s, "
                  f"{continuous['short_jobs']} short (<=32 tokens)")
            for name, result in (("static", static), ("continuous", continuous)):
                print(f"    {name:10}: {result['tokens_per_s']:.1f} tok/s, short p50 {result['short_p50']:.2f} s, "
                      f"p95 {result['short_p95']:.2f} s")
            print(f"    ratio continuous/static: throughput {continuous['tokens_per_s'] / static['tokens_per_s']:.2f}, "
                  f"short p50 {continuous['short_p50'] / static['short_p50']:.2f}", flush=True)


if __name__ == "__main__":
    main()
