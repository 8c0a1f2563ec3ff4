"""The reaper's look for lost messages under a backlog: what one scan of a queue costs.

    .venv/bin/python bench/reaper_scan.py [--messages 100000]

Fills a queue with --messages copies of a real job message (as `publish_job` sends it, each
with its own job id), then reads the job ids of everything waiting, twice: baseline, the whole
queue in one LRANGE (how `job_ids_in_redis` read it before); result, in pages of SCAN_PAGE
(how it reads now). Prints each one's wall and CPU time, and its longest single LRANGE: Redis
serves nobody else while it builds a reply. How often a cluster scans is not measured here:
every worker's reaper scanned every reaper_interval_s whenever a queued job was older than
republish_after_s (always, under a backlog); now one reaper per republish_after_s does.
Redis: --redis-url, a db of its own, flushed.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import redis

from shared import publish
from shared.celery_app import make_celery
from shared.publish import job_ids_in_redis, publish_job

QUEUE = "generation.gemma-3-270m"


def fill(client: redis.Redis, redis_url: str, count: int) -> None:
    """Push `count` messages like the one `publish_job` sends, each with its own job id."""
    publish_job(make_celery(redis_url), "job-template", QUEUE)
    template = json.loads(client.rpop(QUEUE))
    pipe = client.pipeline(transaction=False)
    for index in range(count):
        template["headers"]["id"] = f"job-{index:08d}"
        pipe.lpush(QUEUE, json.dumps(template))
        if index % 10_000 == 9_999:
            pipe.execute()
    pipe.execute()


def timed_scan(client: redis.Redis, page: int) -> dict:
    """Read every job id in the queue in pages of `page`; return times and the longest LRANGE."""
    longest = 0.0
    lrange = client.lrange

    def timed_lrange(*args):
        nonlocal longest
        started = time.perf_counter()
        try:
            return lrange(*args)
        finally:
            longest = max(longest, time.perf_counter() - started)

    client.lrange = timed_lrange
    publish.SCAN_PAGE = page
    started, cpu_started = time.perf_counter(), time.process_time()
    found = job_ids_in_redis(client, {QUEUE}, time.time())
    result = {"ids": len(found), "wall_s": time.perf_counter() - started, "cpu_s": time.process_time() - cpu_started,
              "longest_lrange_s": longest}
    del client.lrange
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13"))
    args = parser.parse_args()
    client = redis.Redis.from_url(args.redis_url)
    client.flushdb()
    paged = publish.SCAN_PAGE
    try:
        fill(client, args.redis_url, args.messages)
        size = client.memory_usage(QUEUE) or 0
        whole, pages = timed_scan(client, args.messages + 1), timed_scan(client, paged)
    finally:
        client.flushdb()
    print(f"settings: {args.messages:,} messages in one queue ({size / 1e6:.0f} MB in Redis), page {paged:,}, "
          f"redis={args.redis_url}")
    for label, run in (("baseline  one LRANGE  ", whole), ("result    paged LRANGE", pages)):
        print(f"{label}: {run['ids']:,} ids, wall {1000 * run['wall_s']:6.0f} ms, CPU {1000 * run['cpu_s']:6.0f} ms, "
              f"longest LRANGE {1000 * run['longest_lrange_s']:6.1f} ms")
    print(f"ratio     longest LRANGE, paged / one: {pages['longest_lrange_s'] / whole['longest_lrange_s']:.3f}; "
          f"scan CPU, paged / one: {pages['cpu_s'] / whole['cpu_s']:.2f}")


if __name__ == "__main__":
    main()
