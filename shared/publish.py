"""Publishing 'job X is ready to run' messages; always after the job row is committed."""

from __future__ import annotations

import base64
import itertools
import json
import os
import socket
import uuid
from collections.abc import Callable

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
# Messages read per LRANGE when looking for a job's message in a queue.
SCAN_PAGE = 10_000


def publish_job(celery: Celery, job_id: str, queue: str, countdown: float | None = None) -> bool:
    """Send the job's message (its task id is the job id), to run no sooner than `countdown`
    seconds from now if given; False if Redis is unreachable."""
    return _sent(lambda: celery.send_task(task_for_queue(queue), args=[job_id], queue=queue, task_id=job_id,
                                          countdown=countdown),
                 job_id, queue)


class JobPublisher:
    """Sends the message `publish_job` sends with one LPUSH of a prebuilt dict, for the gateway.

    `send_task` costs ~1 ms of CPU a message (signals, routing, option merging); here the only
    per-job parts are the id and the delivery tag. The message is Celery's task protocol 2 as
    kombu's Redis transport stores it (anonymous exchange, priority 0: the list named after the
    queue), so the workers consume it like any other; a test compares it with `send_task`'s.
    """

    def __init__(self, client: redis.Redis):
        self.client = client
        # What Celery puts there for a producer that is not a worker.
        self.origin = f"gen{os.getpid()}@{socket.gethostname()}"
        self.reply_to = str(uuid.uuid4())
        # Delivery tags name a message in the consumers' unacked hash, so they must be unique:
        # this publisher's random prefix and a counter are, without a system call per message.
        self._tag_numbers = itertools.count()  # next() on it is atomic: safe across threads

    def publish(self, job_id: str, queue: str) -> bool:
        """Send the job's message (its task id is the job id); False if Redis is unreachable."""
        return _sent(lambda: self.client.lpush(queue, json.dumps(self.message(job_id, queue))), job_id, queue)

    def publish_many(self, jobs: list[tuple[str, str]]) -> bool:
        """Send the messages of (job id, queue) pairs in one round trip, oldest first; False if Redis is unreachable."""
        if not jobs:
            return True
        by_queue: dict[str, list[str]] = {}
        for job_id, queue in jobs:
            by_queue.setdefault(queue, []).append(json.dumps(self.message(job_id, queue)))

        def send() -> None:
            pipeline = self.client.pipeline(transaction=False)
            for queue, messages in by_queue.items():
                pipeline.lpush(queue, *messages)  # pushed in order: the first is consumed first
            pipeline.execute()

        return _sent(send, ", ".join(job_id for job_id, _ in jobs), ", ".join(by_queue))

    def message(self, job_id: str, queue: str) -> dict:
        """Return the kombu envelope of the job's task message."""
        embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
        body = json.dumps([[job_id], {}, embed]).encode("utf-8")
        headers = {
            "lang": "py", "task": task_for_queue(queue), "id": job_id, "shadow": None, "eta": None,
            "expires": None, "group": None, "group_index": None, "retries": 0, "timelimit": [None, None],
            "root_id": job_id, "parent_id": None, "argsrepr": repr([job_id]), "kwargsrepr": "{}",
            "origin": self.origin, "ignore_result": None, "replaced_task_nesting": 0,
            "stamped_headers": None, "stamps": {},
        }
        properties = {
            "correlation_id": job_id, "reply_to": self.reply_to, "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue}, "priority": 0,
            "body_encoding": "base64", "delivery_tag": f"{self.reply_to}-{next(self._tag_numbers):x}",
        }
        return {"body": base64.b64encode(body).decode("ascii"), "content-encoding": "utf-8",
                "content-type": "application/json", "headers": headers, "properties": properties}


def _sent(send: Callable[[], object], job_id: str, queue: str) -> bool:
    """Run a send; log and return False if Redis is unreachable."""
    try:
        send()
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
        # In pages, so that Redis never builds one reply of a whole backlog (100,000 messages are
        # ~100 MB). Publishers push on the left, so a push between two pages only shifts what is
        # left to read to the right: a page may repeat a message, never skip one.
        start = 0
        while page := client.lrange(queue, start, start + SCAN_PAGE - 1):
            ids.update(_task_id(raw) for raw in page)
            start += SCAN_PAGE
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
