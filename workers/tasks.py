"""Celery tasks: each takes a job id, claims the row, runs, and writes the outcome once."""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable
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
            _in_own_thread(rt, run_fine_tune_job, job_id)  # one training run at a time, even with --concurrency


def _in_own_thread(rt: WorkerRuntime, run: Callable[[WorkerRuntime, str], None], job_id: str) -> None:
    """Run a job in a thread that ends with it, with this thread's log context.

    A thread that has run multi-threaded torch work keeps an OpenMP team while it lives, and
    on a CPU host a second team slows every step of the batching engine (~20% on 2 cores;
    BatchEngine.prefill_tokens). Training's team goes away with its thread.
    """
    context = contextvars.copy_context()
    errors: list[BaseException] = []

    def target() -> None:
        if rt.cpu_threads is not None:
            rt.cpu_threads.apply()
        try:
            context.run(run, rt, job_id)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the task's thread
            errors.append(exc)

    thread = threading.Thread(target=target, name=f"job-{job_id}")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


@contextmanager
def _running(job_id: str, kind: str):
    """Bind the job id to log lines, count the job in flight, and time it."""
    rt: WorkerRuntime = runtime()
    with rt.counter_lock:
        rt.results.jobs_in_flight += 1
    JOBS_IN_FLIGHT.inc()
    try:
        with structlog.contextvars.bound_contextvars(job_id=job_id), JOB_DURATION.labels(kind).time():
            yield rt
    finally:
        with rt.counter_lock:
            rt.results.jobs_in_flight -= 1
            rt.jobs_done += 1
        JOBS_IN_FLIGHT.dec()
