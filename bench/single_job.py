"""Single-job speed: one generation job at a time through the whole stack vs raw `generate`,
and (benchmark (g)) vs llama.cpp on the same GGUF file when a Python with `llama-cpp-python`
is given.

Prints the baselines (transformers `generate` on the same cached weights, same dtype, same
prompt, in this process; llama.cpp through `bench/llama_cpp_baseline.py` in that Python), the
stack's result (HTTP submit with `Prefer: wait` until the finished job comes back), and the
ratios. Run from the repo root:

    .venv/bin/python bench/single_job.py --jobs 5 --new-tokens 32 [--llama-python PYTHON]

llama-cpp-python is never a dependency of gemma-jobs; install it in a separate environment
(`python -m venv /tmp/llama && /tmp/llama/bin/pip install llama-cpp-python numpy`, which
builds llama.cpp from source: ~10 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import requests

# A sibling script (bench/ is on sys.path when a script in it runs).
from bench_processes import new_key, wait_until

PROMPT = "The history of the printing press begins"


def run_stack(data_dir: Path, port: int, jobs: int, new_tokens: int) -> tuple[float, list[float]]:
    """Return the stack's tokens/s over sequential jobs and each job's wall seconds."""
    from services.stack import Stack
    from shared.settings import load_settings

    settings = load_settings(data_dir=data_dir)
    with Stack(settings, port=port) as stack:
        _, key = new_key(settings.database_url_or_default)
        headers = {"Authorization": f"Bearer {key}", "Prefer": "wait=120"}
        body = {"model": "gemma-3-270m", "prompt": PROMPT, "max_new_tokens": new_tokens, "temperature": 0}
        url = f"{stack.base_url}/v1/generations"
        # Warm-up: the worker may still be loading the model; wait until one job is done.
        wait_until(lambda: requests.post(url, json=body, headers=headers, timeout=130).status_code == 200, 600)
        tokens, walls = 0, []
        for _ in range(jobs):
            started = time.perf_counter()
            job = requests.post(url, json=body, headers=headers, timeout=130).json()
            walls.append(time.perf_counter() - started)
            assert job["status"] == "succeeded", job
            tokens += job["usage"]["completion_tokens"]
    return tokens / sum(walls), walls


def run_baseline(cache_dir: Path, jobs: int, new_tokens: int) -> float:
    """Return tokens/s of transformers `generate` alone on the same weights and prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = cache_dir / "gemma-3-270m"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    input_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    tokens, seconds = 0, 0.0
    with torch.inference_mode():
        model.generate(input_ids, max_new_tokens=new_tokens, do_sample=False)  # warm-up
        for _ in range(jobs):
            started = time.perf_counter()
            output = model.generate(input_ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=[1, 106])
            seconds += time.perf_counter() - started
            tokens += output.shape[1] - input_ids.shape[1]
    return tokens / seconds


def run_llama_cpp(python: str, data_dir: Path, jobs: int, new_tokens: int) -> dict:
    """Return llama.cpp's result (tokens/s, prompt included) on the GGUF the default model is converted from."""
    import importlib

    from shared.registry import DEFAULT_MODEL_ID, ModelRegistry

    package = importlib.import_module(ModelRegistry.load(None).get(DEFAULT_MODEL_ID).gguf_package)
    gguf = Path(package.assemble(data_dir.resolve() / package.MODEL_NAME))
    script = Path(__file__).with_name("llama_cpp_baseline.py")
    command = [python, str(script), str(gguf), "--prompt", PROMPT, "--new-tokens", str(new_tokens),
               "--runs", str(jobs), "--threads", str(os.cpu_count())]
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--port", type=int, default=8790)
    parser.add_argument("--data-dir", type=Path, default=Path("var/bench"))
    parser.add_argument("--llama-python", default=None,
                        help="a Python that has llama-cpp-python: adds llama.cpp on the same GGUF as a baseline")
    args = parser.parse_args()
    os.environ.setdefault("GEMMA_JOBS_LOG_LEVEL", "warning")
    stack_rate, walls = run_stack(args.data_dir, args.port, args.jobs, args.new_tokens)
    base_rate = run_baseline(args.data_dir.resolve() / "models", args.jobs, args.new_tokens)
    llama = run_llama_cpp(args.llama_python, args.data_dir, args.jobs, args.new_tokens) if args.llama_python else None
    print(f"settings: gemma-3-270m bf16 CPU, greedy, {args.new_tokens} new tokens, {args.jobs} sequential jobs, "
          f"torch threads={os.cpu_count()}")
    print(f"baseline  transformers generate alone : {base_rate:7.1f} tokens/s")
    print(f"result    one job at a time via HTTP  : {stack_rate:7.1f} tokens/s "
          f"(job wall p50 {statistics.median(walls):.2f}s, submit to finished result)")
    print(f"ratio     stack / baseline            : {stack_rate / base_rate:7.2f}")
    if llama is not None:
        print(f"baseline  llama.cpp {llama['llama_cpp']}, same GGUF, {llama['threads']} threads: "
              f"{llama['tokens_per_s']:7.1f} tokens/s (prompt included)")
        print(f"ratio     stack / llama.cpp           : {stack_rate / llama['tokens_per_s']:7.2f} (stretch: >= 0.5)")


if __name__ == "__main__":
    main()
