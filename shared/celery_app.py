"""The Celery app both sides share: configuration, task names and queue names."""

from __future__ import annotations

from celery import Celery

GENERATE_TASK = "gemma_jobs.generate"
FINE_TUNE_TASK = "gemma_jobs.fine_tune"
TASK_FOR_KIND = {"generation": GENERATE_TASK, "fine_tune": FINE_TUNE_TASK}


def queue_for(kind: str, model: str) -> str:
    """Return the queue that carries jobs of one kind for one model."""
    return f"{kind}.{model}"


def model_of_queue(queue: str) -> str:
    """Return the model a queue serves: the base model, also for an adapter's jobs.

    Metrics label by it: a label per adapter id would grow without bound and show every
    adapter id on the unauthenticated /metrics pages.
    """
    return queue.split(".", 1)[1]


def task_for_queue(queue: str) -> str:
    """Return the task name that runs the jobs of a queue."""
    return TASK_FOR_KIND[queue.split(".", 1)[0]]


def make_celery(redis_url: str, visibility_timeout_s: int = 12 * 3600) -> Celery:
    """Create a Celery app on Redis with JSON-only, late-ack delivery.

    A redelivery after the visibility timeout is harmless (the claim is conditional), but
    the timeout should exceed the longest job so Redis does not redeliver needlessly; the
    database lease, not Redis, decides when a job is lost.
    """
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
        broker_transport_options=_transport_options(visibility_timeout_s),
        # Fail a submit fast when Redis is down; the job row is already committed.
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.2},
        broker_connection_timeout=3,
    )
    return app


def _transport_options(visibility_timeout_s: int) -> dict:
    """Redis transport options; a short visibility timeout also gets frequent restore sweeps."""
    options: dict = {"visibility_timeout": visibility_timeout_s}
    if visibility_timeout_s < 600:
        # kombu sweeps unacked messages every interval x throttle seconds (100 s by default).
        options.update(unacked_restore_interval=max(1, visibility_timeout_s // 2), unacked_restore_throttle=1)
    return options
