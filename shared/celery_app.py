"""The Celery app both sides share: configuration, task names and queue names."""

from __future__ import annotations

from celery import Celery

GENERATE_TASK = "gemma_jobs.generate"

# A long job must never be handed to a second worker just because it runs long; the
# database lease (not Redis) decides when a job is lost. 12 hours covers the longest job.
VISIBILITY_TIMEOUT_S = 12 * 3600


def queue_for(kind: str, model: str) -> str:
    """Return the queue that carries jobs of one kind for one model."""
    return f"{kind}.{model}"


def make_celery(redis_url: str) -> Celery:
    """Create a Celery app on Redis with JSON-only, late-ack delivery."""
    app = Celery("gemma_jobs", broker=redis_url)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,  # results live in the database, not in Celery
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT_S},
        # Fail a submit fast when Redis is down; the job row is already committed.
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.2},
        broker_connection_timeout=3,
    )
    return app
