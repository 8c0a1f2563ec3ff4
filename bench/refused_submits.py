"""Refused submits: gateway CPU per 429 for a long prompt, against counting that prompt.

    .venv/bin/python bench/refused_submits.py --requests 30

A key over its `rpm` sends `POST /v1/generations` through the gateway app (Flask's test client,
in this process, on a fresh PostgreSQL database), with counting on
(GEMMA_JOBS_GATEWAY_COUNT_TOKENS=true, the tokenizer loaded first). Result: its submit of a
200,000-character prompt (the server's default `max_prompt_chars`; random letters, digits and
spaces, ~137k tokens), refused (429) before the prompt is counted. Baseline: the same prompt from
a key without limits, which the gateway counts (and then refuses, 422: it is over the model's
context) — what each refused request cost when the gateway counted before it checked limits.
Beside them: a refused short prompt. All timed in CPU seconds of this process
(`time.process_time`), median per request.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import string
import tempfile
import time
from pathlib import Path

import redis
from bench_processes import fresh_postgres

from services.domain.keys import create_key
from services.gateway import create_app
from shared.registry import DEFAULT_MODEL_ID
from shared.settings import load_settings


def cpu_per_request(client, body: dict, headers: dict, count: int, status: int) -> float:
    """Send `count` submits; return the median CPU seconds of one (each must answer `status`)."""
    used = []
    for _ in range(count):
        started = time.process_time()
        response = client.post("/v1/generations", json=body, headers=headers)
        used.append(time.process_time() - started)
        if response.status_code != status:
            raise SystemExit(f"expected {status}, got {response.status_code}: {response.get_data(as_text=True)}")
    return statistics.median(used)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12"))
    parser.add_argument("--model-cache", type=Path, default=Path(os.environ.get("GEMMA_JOBS_MODEL_CACHE_DIR", "var/models")))
    args = parser.parse_args()
    if not (args.model_cache / DEFAULT_MODEL_ID / "tokenizer.json").is_file():
        raise SystemExit(f"no converted model under {args.model_cache}: start a worker once, or set --model-cache")
    redis.Redis.from_url(args.redis_url).flushdb()
    rng = random.Random(0)
    long_prompt = "".join(rng.choice(string.ascii_letters + string.digits + " ") for _ in range(200_000))
    short = {"model": DEFAULT_MODEL_ID, "prompt": "The capital of France is", "max_new_tokens": 8}
    long = {**short, "prompt": long_prompt}
    with fresh_postgres() as database_url, tempfile.TemporaryDirectory() as folder:
        settings = load_settings(database_url=database_url, redis_url=args.redis_url, data_dir=Path(folder),
                                 model_cache_dir=args.model_cache, gateway_count_tokens=True)
        app = create_app(settings)
        client = app.test_client()
        with app.extensions["gemma_jobs"].db.session_scope() as session:
            _, limited = create_key(session, role="user", name="limited", rpm=1)
            _, open_key = create_key(session, role="user", name="open")
        limited_headers, open_headers = ({"Authorization": f"Bearer {key}"} for key in (limited, open_key))
        cpu_per_request(client, short, limited_headers, 1, 202)  # uses up the minute (and loads the tokenizer)
        short_refused = cpu_per_request(client, short, limited_headers, args.requests, 429)
        long_refused = cpu_per_request(client, long, limited_headers, args.requests, 429)
        long_counted = cpu_per_request(client, long, open_headers, max(3, args.requests // 10), 422)
        app.extensions["gemma_jobs"].db.dispose()
    redis.Redis.from_url(args.redis_url).flushdb()
    print(f"settings: requests={args.requests} per kind, gateway_count_tokens=true (tokenizer loaded), "
          f"long prompt 200,000 random characters (~137k tokens), PostgreSQL, in-process test client; "
          f"median CPU of this process per request")
    print(f"baseline  long prompt counted (no limits; 422, over the context): {1000 * long_counted:7.2f} ms CPU  "
          f"(what a refused key's request cost when the gateway counted before its limits)")
    print(f"result    long prompt, key over its rpm (429)                  : {1000 * long_refused:7.2f} ms CPU")
    print(f"ratio     result / baseline                                   : {long_refused / long_counted:7.3f}")
    print(f"beside    short prompt, key over its rpm (429)                 : {1000 * short_refused:7.2f} ms CPU")

if __name__ == "__main__":
    main()
