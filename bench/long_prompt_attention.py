"""A sliding-window layer's prefill attention over a long prompt: one mask over the whole prompt
vs masks per block of queries (`workers.slot_cache._window_attention_in_blocks`).

    .venv/bin/python bench/long_prompt_attention.py [--tokens 4096 8192 16384]

For each prompt length, a fresh Python process runs `_segment_attention` once on random bf16
tensors of Gemma 3 270M's shapes (4 query heads, 1 key/value head, head_dim 256, window 512), as
a CPU worker prefills one prompt, and reports its extra peak RSS and time. Baseline: the whole
prompt in one call with one length x length mask (`WINDOW_QUERY_BLOCK` raised past the length,
as the code was); result: the blocks. Ratio: result / baseline. The values are compared too
(largest absolute difference, bf16).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

HEADS, KV_HEADS, HEAD_DIM, WINDOW = 4, 1, 256, 512


def run_once(tokens: int, whole: bool) -> dict:
    """In this process: one sliding layer's prefill attention; its extra peak RSS, time and output sum."""
    from types import SimpleNamespace

    import torch

    from workers import slot_cache

    if whole:  # the code before: one call, its mask built from int64 distances
        slot_cache.WINDOW_QUERY_BLOCK = sys.maxsize
        slot_cache._window_mask = _mask_from_distances
    torch.manual_seed(0)
    query = torch.randn(1, HEADS, tokens, HEAD_DIM, dtype=torch.bfloat16)
    key, value = (torch.randn(1, KV_HEADS, tokens, HEAD_DIM, dtype=torch.bfloat16) for _ in range(2))
    module = SimpleNamespace(is_causal=True, num_key_value_groups=HEADS // KV_HEADS, training=False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    output = slot_cache._segment_attention(module, query, key, value, slot_cache.PrefillSegments([0], [tokens]),
                                           WINDOW, {"dropout": 0.0, "scaling": HEAD_DIM**-0.5})
    seconds = time.perf_counter() - started
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    torch.save(output, f"/tmp/long_prompt_attention_{tokens}_{int(whole)}.pt")
    return {"peak_mb": peak_mb, "seconds": seconds}


def _mask_from_distances(queries: int, keys: int, offset: int, window: int, device):
    """The whole-prompt mask as it was built before the blocks (a length x length int64 matrix first)."""
    import torch

    position = torch.arange(queries, device=device)
    distance = position[:, None] - position[None, :]
    return ((distance >= 0) & (distance < window))[None, None]


def measure(tokens: int, whole: bool) -> dict:
    """Run one measurement in a fresh process (peak RSS is per process)."""
    command = [sys.executable, __file__, "--child", str(tokens), "--whole" if whole else "--blocks"]
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--whole", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--blocks", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_once(args.child, args.whole)))
        return
    import torch

    from workers.slot_cache import WINDOW_QUERY_BLOCK

    print(f"settings: bf16, {HEADS} query heads, {KV_HEADS} key/value head, head_dim {HEAD_DIM}, window {WINDOW}, "
          f"blocks of {WINDOW_QUERY_BLOCK} queries, torch threads {torch.get_num_threads()}")
    for tokens in args.tokens:
        baseline, result = measure(tokens, whole=True), measure(tokens, whole=False)
        outputs = [torch.load(f"/tmp/long_prompt_attention_{tokens}_{whole}.pt") for whole in (1, 0)]
        difference = (outputs[0].float() - outputs[1].float()).abs().max().item()
        print(f"{tokens:6d} tokens  baseline one mask: {baseline['peak_mb']:7.0f} MB {baseline['seconds']:6.1f} s   "
              f"result blocks: {result['peak_mb']:5.0f} MB {result['seconds']:5.1f} s   "
              f"ratio memory {result['peak_mb'] / baseline['peak_mb']:.3f}, time "
              f"{result['seconds'] / baseline['seconds']:.2f}   largest difference {difference:.4f}")


if __name__ == "__main__":
    main()
