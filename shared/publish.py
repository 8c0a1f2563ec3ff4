"""Publishing 'job X is ready to run' messages; always after the job row is committed."""

from __future__ import annotations

import json

import redis
import structlog
from celery import Celery
from kombu.exceptions import OperationalError

from shared.celery_app import task_for_queue

log = structlog.get_logger(__name__)

# Where kombu's Redis transport parks delivered-but-unacknowledged messages, and the
# sorted set of their delivery times.
UNACKED_KEY = "unacked"
UNACKED_INDEX_KEY = "unacked_index"


def publish_job(celery: Celery, job_id: str, queue: str) -> bool:
    """Send the job's message (its task id is the job id); False if Redis is unreachable."""
    try:
        celery.send_task(task_for_queue(queue), args=[job_id], queue=queue, task_id=job_id)
    except (OperationalError, redis.RedisError, OSError) as exc:
        # The row is committed and stays queued; the reaper republishes it later.
        log.error("publish_failed", job_id=job_id, queue=queue, error=str(exc))
        return False
    return True


def job_ids_in_redis(client: redis.Redis, queues: set[str], delivered_since: float) -> set[str]:
    """Return the job ids with a message waiting in these queues, or delivered to a consumer
    since a time (unix seconds) and not yet acknowledged.

    An older unacknowledged delivery of a job that is still queued belongs to a consumer that
    died before claiming it; Redis would hold it until the visibility timeout, so it does not
    count.
    """
    ids: set[str] = set()
    for queue in queues:
        for raw in client.lrange(queue, 0, -1):
            ids.add(_task_id(raw))
    recent_tags = client.zrangebyscore(UNACKED_INDEX_KEY, delivered_since, "+inf")
    for raw in client.hmget(UNACKED_KEY, recent_tags) if recent_tags else []:
        if raw is None:
            continue  # acknowledged in between
        try:
            ids.add(_task_id(json.dumps(json.loads(raw)[0])))
        except (ValueError, IndexError, TypeError):
            continue  # not one of ours
    ids.discard("")
    return ids


def _task_id(raw: bytes | str) -> str:
    try:
        return json.loads(raw).get("headers", {}).get("id", "")
    except (ValueError, AttributeError):
        return ""
