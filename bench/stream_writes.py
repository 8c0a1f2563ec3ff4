"""Token-stream writes per engine step: one XADD per row (baseline) vs one pipeline per step.

Replays what the engine does after each decode step of a batch — every row's TokenPublisher
decodes its new token and writes the text to the job's Redis stream — with the real tokenizer
and a real Redis, without the model, so the time is the writes' alone. Prints milliseconds per
step for both ways and their ratio. Run from the repo root:

    GEMMA_JOBS_MODEL_CACHE_DIR=var/models .venv/bin/python bench/stream_writes.py --rows 16 --steps 64
"""

from __future__ import annotations

import argparse
import statistics
import time

import redis

from shared import token_stream
from shared.ids import new_id
from shared.registry import DEFAULT_MODEL_ID, ModelRegistry
from shared.settings import load_settings
from workers.model_loader import weights_dir
from workers.token_publisher import StepWrites, TokenPublisher
from workers.tokenizer_cache import load_tokenizer

TEXT = (
    "The history of the printing press begins in the fifteenth century, when movable type made "
    "books cheaper to copy than by hand, and within fifty years presses were at work in most of "
    "the large cities of Europe, printing bibles, grammars, calendars and the news of the day. "
) * 4


def run(client: redis.Redis, tokenizer, token_ids: list[int], rows: int, steps: int, batched: bool) -> float:
    """Return the median milliseconds per step of `rows` publishers writing one token each per step."""
    step_writes = StepWrites(client) if batched else None
    publishers = [
        TokenPublisher(client, tokenizer, new_id("job"), 1, [], step_writes=step_writes) for _ in range(rows)
    ]
    times = []
    for step in range(1, steps + 1):
        started = time.perf_counter()
        for row, publisher in enumerate(publishers):
            publisher.update(token_ids[row : row + step])
        if step_writes is not None:
            step_writes.flush()
        times.append((time.perf_counter() - started) * 1000)
    client.delete(*(token_stream.stream_key(p.job_id) for p in publishers))
    assert not any(p.failed for p in publishers), "a stream write failed"
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16, help="rows in the batch (jobs streaming at once)")
    parser.add_argument("--steps", type=int, default=64, help="decode steps replayed")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are compared")
    args = parser.parse_args()

    settings = load_settings()
    folder = weights_dir(ModelRegistry.load(None).get(DEFAULT_MODEL_ID), settings.model_cache_path)
    tokenizer = load_tokenizer(folder, settings.model_cache_path)
    token_ids = tokenizer(TEXT)["input_ids"]
    assert len(token_ids) >= args.rows + args.steps, "TEXT is too short for these settings"
    client = redis.Redis.from_url(settings.redis_url)

    direct, piped = [], []
    for _ in range(args.rounds):
        direct.append(run(client, tokenizer, token_ids, args.rows, args.steps, batched=False))
        piped.append(run(client, tokenizer, token_ids, args.rows, args.steps, batched=True))
    baseline, result = statistics.median(direct), statistics.median(piped)
    print(f"settings: rows {args.rows}, steps {args.steps}, rounds {args.rounds}, redis {settings.redis_url}")
    print(f"baseline (one XADD per row per step): {baseline:.2f} ms/step  rounds {[round(t, 2) for t in direct]}")
    print(f"result (one pipeline per step):       {result:.2f} ms/step  rounds {[round(t, 2) for t in piped]}")
    print(f"ratio (baseline / result): {baseline / result:.2f}x less time spent writing streams per step")


if __name__ == "__main__":
    main()
