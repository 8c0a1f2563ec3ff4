"""Stop strings: transformers' `stop_strings` vs our StopOnStrings criterion, same jobs.

Both stop at the same token; the difference is per-call set-up cost. Run from the repo root:

    .venv/bin/python bench/stop_strings.py --model-dir var/models/gemma-3-270m --runs 5
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteriaList

from workers.stopping import StopOnStrings

PROMPT = "Q: What is the capital of France?\nA:"
STOPS = ["\n"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=Path("var/models/gemma-3-270m"))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16).eval()
    input_ids = tokenizer(PROMPT, return_tensors="pt").input_ids

    def run(**kwargs) -> tuple[float, list[int]]:
        started = time.perf_counter()
        with torch.inference_mode():
            output = model.generate(input_ids, max_new_tokens=args.new_tokens, do_sample=False, **kwargs)
        return time.perf_counter() - started, output[0, input_ids.shape[1]:].tolist()

    def ours() -> dict:
        return {"stopping_criteria": StoppingCriteriaList([StopOnStrings(tokenizer, STOPS, input_ids.shape[1])])}

    run()  # warm-up
    base = [run(stop_strings=STOPS, tokenizer=tokenizer) for _ in range(args.runs)]
    mine = [run(**ours()) for _ in range(args.runs)]
    assert all(tokens == base[0][1] for _, tokens in base + mine), "both must stop at the same token"
    base_s = sum(seconds for seconds, _ in base) / args.runs
    mine_s = sum(seconds for seconds, _ in mine) / args.runs
    print(f"settings: gemma-3-270m bf16 CPU, greedy, stop={STOPS!r}, {len(base[0][1])} tokens until the stop, {args.runs} runs each")
    print(f"baseline  transformers stop_strings : {base_s:6.3f} s per job")
    print(f"result    StopOnStrings            : {mine_s:6.3f} s per job")
    print(f"ratio     baseline / result        : {base_s / mine_s:6.2f}x faster")


if __name__ == "__main__":
    main()
