"""Celery tasks: each takes a job id, claims the row, runs, and writes the outcome once."""

from __future__ import annotations

import structlog
from celery import Celery

from shared.celery_app import FINE_TUNE_TASK, GENERATE_TASK
from workers.fine_tune_job import run_fine_tune_job
from workers.generation_job import run_generation_job
from workers.runtime import runtime


def register_tasks(app: Celery) -> None:
    """Register the worker's tasks on a Celery app (signatures are a wire contract: add only keyword args)."""

    @app.task(name=GENERATE_TASK)
    def generate_task(job_id: str) -> None:
        """Run one generation job."""
        with structlog.contextvars.bound_contextvars(job_id=job_id):
            run_generation_job(runtime(), job_id)

    @app.task(name=FINE_TUNE_TASK)
    def fine_tune_task(job_id: str) -> None:
        """Run one fine-tuning job."""
        with structlog.contextvars.bound_contextvars(job_id=job_id):
            run_fine_tune_job(runtime(), job_id)
