"""Redis pub/sub channels that tell waiters a job reached a terminal state."""

from __future__ import annotations

import json
from typing import Any

import redis

from shared.token_stream import end_stream

CHANNEL_PREFIX = "gemma-jobs:job-done:"


def job_done_channel(job_id: str) -> str:
    """Return the channel a job's terminal state is published on."""
    return CHANNEL_PREFIX + job_id


def publish_job_done(client: redis.Redis, job_id: str, status: str) -> None:
    """Announce a terminal state; the database already holds it, this only wakes waiters."""
    client.publish(job_done_channel(job_id), json.dumps({"job_id": job_id, "status": status}))


def queue_job_end(pipe: Any, job_id: str, status: str) -> None:
    """Add to a Redis pipeline what wakes whoever waits on a job that just ended and closes its stream."""
    publish_job_done(pipe, job_id, status)
    end_stream(pipe, job_id, status)


def announce_job_end(client: redis.Redis, job_id: str, status: str) -> bool:
    """Wake whoever waits on a job that just ended and close its token stream; False if Redis
    failed (waiters then fall back to reading the row, which already holds the outcome)."""
    try:
        with client.pipeline(transaction=False) as pipe:
            queue_job_end(pipe, job_id, status)
            pipe.execute()
    except redis.RedisError:
        return False
    return True
