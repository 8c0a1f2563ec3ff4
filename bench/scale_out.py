"""Throughput of 1, 2 and 3 workers on one machine: jobs/s with a cheap generation setting.

    .venv/bin/python bench/scale_out.py --jobs 30 --new-tokens 8 --workers 1,2,3 [--cpu-threads auto|all]

For each worker count: a fresh SQLite database, Redis at REDIS_URL (default
redis://127.0.0.1:6379/11, flushed), one gateway, N `gemma-jobs worker --device cpu`
processes started and ready before the clock starts; then all jobs are submitted at once and
the clock stops when the last one has succeeded. Prints jobs/s per N and the ratio to N=1.
`--cpu-threads auto` (the product default) lets the workers split the cores; `all` gives each
worker every core (torch's own default, which the product used before).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from bench_processes import bench_stack


def run(workers: int, args, workdir: Path) -> float:
    """Return jobs/s for one worker count."""
    env = {"GEMMA_JOBS_CPU_THREADS": str(len(os.sched_getaffinity(0))) if args.cpu_threads == "all" else "auto"}
    with bench_stack(workdir, f"bench-{workers}", args.redis_url, [[] for _ in range(workers)], env) as stack:
        body = {"model": "gemma-3-270m", "prompt": "Count: 1, 2, 3,", "max_new_tokens": args.new_tokens,
                "temperature": 0}
        started = time.perf_counter()
        stack.wait_all([stack.submit(body) for _ in range(args.jobs)], 600)
        return args.jobs / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=30)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--workers", default="1,2,3")
    parser.add_argument("--cpu-threads", choices=["auto", "all"], default="auto",
                        help="auto: workers split the cores (default); all: each worker takes every core")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/11"))
    args = parser.parse_args()
    counts = [int(count) for count in args.workers.split(",")]
    with tempfile.TemporaryDirectory() as folder:
        workdir = Path(folder)
        rates = {count: run(count, args, workdir) for count in counts}
    print(f"settings: jobs={args.jobs} new_tokens={args.new_tokens} device=cpu cores={os.cpu_count()} "
          f"model=gemma-3-270m database=sqlite cpu_threads={args.cpu_threads}")
    baseline = rates[counts[0]]
    for count, rate in rates.items():
        print(f"workers={count}: {rate:.2f} jobs/s  ratio vs {counts[0]} worker(s): {rate / baseline:.2f}")


if __name__ == "__main__":
    main()
