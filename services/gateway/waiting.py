"""Holding a request until a job finishes, woken by Redis pub/sub rather than polling."""

from __future__ import annotations

import time
from collections.abc import Callable

import redis
import structlog

from shared.notify import job_done_channel

log = structlog.get_logger(__name__)


def wait_until_done(
    client: redis.Redis, job_id: str, timeout_s: float, is_done: Callable[[], bool]
) -> bool:
    """Wait up to timeout_s for a job's terminal state; return whether it was reached."""
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    try:
        pubsub.subscribe(job_done_channel(job_id))
        # Check only after subscribing, so a job finishing in between is not missed.
        if is_done():
            return True
        deadline = time.monotonic() + timeout_s
        while (remaining := deadline - time.monotonic()) > 0:
            message = pubsub.get_message(timeout=remaining)
            if message is not None and message["type"] == "message":
                return True
        return is_done()
    except redis.RedisError as exc:
        # Waiting is a convenience: without Redis the client simply polls.
        log.warning("wait_unavailable", job_id=job_id, error=str(exc))
        return is_done()
    finally:
        pubsub.close()
