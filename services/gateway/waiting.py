"""Holding a request until a job finishes, woken by Redis pub/sub rather than polling."""

from __future__ import annotations

import time
from collections.abc import Callable

import redis
import structlog

from shared.notify import job_done_channel

log = structlog.get_logger(__name__)


# Without Redis a wait reads the job's row this often instead.
POLL_WITHOUT_REDIS_S = 0.5


def wait_until_done(
    client: redis.Redis, job_id: str, timeout_s: float, is_done: Callable[[], bool]
) -> bool:
    """Wait up to timeout_s for a job's terminal state; return whether it was reached."""
    deadline = time.monotonic() + timeout_s
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    try:
        pubsub.subscribe(job_done_channel(job_id))
        # Check only after subscribing, so a job finishing in between is not missed.
        if is_done():
            return True
        while (remaining := deadline - time.monotonic()) > 0:
            message = pubsub.get_message(timeout=remaining)
            if message is not None and message["type"] == "message":
                return True
        return is_done()
    except redis.RedisError as exc:
        # Redis down, or its connection dropped mid-wait: the wait the client asked for (and
        # that Preference-Applied tells it it had) goes on, reading the row instead.
        log.warning("wait_unavailable", job_id=job_id, error=str(exc), note="polling the database instead")
        return _poll_until(deadline, is_done)
    finally:
        pubsub.close()


def _poll_until(deadline: float, is_done: Callable[[], bool]) -> bool:
    """Read whether the job is done every POLL_WITHOUT_REDIS_S until it is or `deadline` passes."""
    while not is_done():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(POLL_WITHOUT_REDIS_S, remaining))
    return True
