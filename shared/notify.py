"""Redis pub/sub channels that tell waiters a job reached a terminal state."""

from __future__ import annotations

import json

import redis

CHANNEL_PREFIX = "gemma-jobs:job-done:"


def job_done_channel(job_id: str) -> str:
    """Return the channel a job's terminal state is published on."""
    return CHANNEL_PREFIX + job_id


def publish_job_done(client: redis.Redis, job_id: str, status: str) -> None:
    """Announce a terminal state; the database already holds it, this only wakes waiters."""
    client.publish(job_done_channel(job_id), json.dumps({"job_id": job_id, "status": status}))
