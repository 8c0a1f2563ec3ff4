"""Celery tasks: each takes a job id, claims the row, runs, and writes the outcome once."""

from __future__ import annotations

from contextlib import contextmanager

import structlog
from celery import Celery

from shared.celery_app import FINE_TUNE_TASK, GENERATE_TASK
from workers.generation_job import run_generation_job
from workers.metrics import JOB_DURATION, JOBS_IN_FLIGHT
from workers.runtime import WorkerRuntime, runtime


def register_tasks(app: Celery) -> None:
    """Register the worker's tasks on a Celery app (signatures are a wire contract: add only keyword args)."""

    @app.task(name=GENERATE_TASK)
    def generate_task(job_id: str) -> None:
        """Run one generation job."""
        with _running(job_id, "generation") as rt:
            run_generation_job(rt, job_id)

    @app.task(name=FINE_TUNE_TASK)
    def fine_tune_task(job_id: str) -> None:
        """Run one fine-tuning job."""
        # Imported here: peft and the Trainer add seconds to every worker's start-up otherwise.
        from workers.fine_tune_job import run_fine_tune_job

        with _running(job_id, "fine_tune") as rt, rt.training_slot:
            run_fine_tune_job(rt, job_id)  # one training run at a time, even with --concurrency


@contextmanager
def _running(job_id: str, kind: str):
    """Bind the job id to log lines, count the job in flight, and time it."""
    rt: WorkerRuntime = runtime()
    if rt.cpu_threads is not None:
        rt.cpu_threads.apply()  # a fine-tune trains in this thread
    with rt.counter_lock:
        rt.jobs_in_flight += 1
    JOBS_IN_FLIGHT.inc()
    try:
        with structlog.contextvars.bound_contextvars(job_id=job_id), JOB_DURATION.labels(kind).time():
            yield rt
    finally:
        with rt.counter_lock:
            rt.jobs_in_flight -= 1
            rt.jobs_done += 1
        JOBS_IN_FLIGHT.dec()
