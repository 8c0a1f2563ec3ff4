"""Publishing 'job X is ready to run' messages; always after the job row is committed."""

from __future__ import annotations

import json

import redis
import structlog
from celery import Celery
from kombu.exceptions import OperationalError

from shared.celery_app import task_for_queue

log = structlog.get_logger(__name__)

# Where kombu's Redis transport parks delivered-but-unacknowledged messages.
UNACKED_KEY = "unacked"


def publish_job(celery: Celery, job_id: str, queue: str) -> bool:
    """Send the job's message (its task id is the job id); False if Redis is unreachable."""
    try:
        celery.send_task(task_for_queue(queue), args=[job_id], queue=queue, task_id=job_id)
    except (OperationalError, redis.RedisError, OSError) as exc:
        # The row is committed and stays queued; the reaper republishes it later.
        log.error("publish_failed", job_id=job_id, queue=queue, error=str(exc))
        return False
    return True


def job_ids_in_redis(client: redis.Redis, queues: set[str]) -> set[str]:
    """Return the job ids that have a message waiting in these queues or held unacked."""
    ids: set[str] = set()
    for queue in queues:
        for raw in client.lrange(queue, 0, -1):
            ids.add(_task_id(raw))
    for raw in client.hvals(UNACKED_KEY):
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
