"""Celery tasks: each takes a job id, claims the row, runs, and writes the outcome once."""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import structlog
from celery import Celery

from shared.celery_app import FINE_TUNE_TASK, GENERATE_TASK
from shared.publish import publish_job
from workers.generation_job import run_generation_job
from workers.metrics import JOB_DURATION, JOBS_IN_FLIGHT
from workers.runtime import WorkerRuntime, runtime

log = structlog.get_logger(__name__)


def register_tasks(app: Celery) -> None:
    """Register the worker's tasks on a Celery app (signatures are a wire contract: add only keyword args)."""

    @app.task(name=GENERATE_TASK)
    def generate_task(job_id: str) -> None:
        """Run one generation job."""
        with _running(job_id, "generation") as run:
            run.claimed = run_generation_job(run.rt, job_id)

    @app.task(name=FINE_TUNE_TASK, bind=True)
    def fine_tune_task(task, job_id: str) -> None:
        """Run one fine-tuning job; one training run at a time, even with --concurrency."""
        # Imported here: peft and the Trainer add seconds to every worker's start-up otherwise.
        from workers.fine_tune_job import run_fine_tune_job

        rt = runtime()
        if not rt.training_slot.acquire(blocking=False):
            _defer(rt, job_id, task.request.delivery_info.get("routing_key"))
            return
        try:
            with _running(job_id, "fine_tune") as run:
                run.claimed = _in_own_thread(rt, run_fine_tune_job, job_id)
        finally:
            rt.training_slot.release()


# A fine-tune that finds this worker training already comes back this much later (here or on
# another worker): well within the reaper's republish_after_s, so its message is never taken for lost.
TRAINING_BUSY_RETRY_S = 5.0


def _defer(rt: WorkerRuntime, job_id: str, queue: str | None) -> None:
    """Send a fine-tune's message again for later, and free this thread now.

    Waiting for the training slot held a pool thread and the message: a few fine-tunes took
    every thread of a worker that also generates, and the reaper took the held messages for
    lost and sent them again, each taking one more thread. If the message cannot be sent, the
    job stays queued and the reaper republishes it.
    """
    if queue and publish_job(rt.celery, job_id, queue, countdown=TRAINING_BUSY_RETRY_S):
        log.info("fine_tune_deferred", job_id=job_id, retry_in_s=TRAINING_BUSY_RETRY_S)
    else:
        log.warning("fine_tune_deferral_not_sent", job_id=job_id, note="the reaper republishes it")


def _in_own_thread(rt: WorkerRuntime, run: Callable[[WorkerRuntime, str], bool], job_id: str) -> bool:
    """Run a job in a thread that ends with it, with this thread's log context; return what `run` returned.

    A thread that has run multi-threaded torch work keeps an OpenMP team while it lives, and
    on a CPU host a second team slows every step of the batching engine (~20% on 2 cores;
    BatchEngine.prefill_tokens). Training's team goes away with its thread.
    """
    context = contextvars.copy_context()
    errors: list[BaseException] = []
    returned: list[bool] = []

    def target() -> None:
        if rt.cpu_threads is not None:
            rt.cpu_threads.apply()
        try:
            returned.append(context.run(run, rt, job_id))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the task's thread
            errors.append(exc)

    thread = threading.Thread(target=target, name=f"job-{job_id}")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return returned[0]


@dataclass
class _Run:
    """A task's run of a job: `claimed` once the job turned out to be this worker's to run."""

    rt: WorkerRuntime
    claimed: bool = False


@contextmanager
def _running(job_id: str, kind: str):
    """Bind the job id to log lines and count the job in flight; count and time it as done
    only if it ran here (a redelivered message of a job taken or ended elsewhere did not)."""
    run = _Run(runtime())
    rt = run.rt
    with rt.counter_lock:
        rt.results.jobs_in_flight += 1
    JOBS_IN_FLIGHT.inc()
    started = time.perf_counter()
    try:
        with structlog.contextvars.bound_contextvars(job_id=job_id):
            yield run
    finally:
        with rt.counter_lock:
            rt.results.jobs_in_flight -= 1
            rt.jobs_done += run.claimed
        JOBS_IN_FLIGHT.dec()
        if run.claimed:
            JOB_DURATION.labels(kind).observe(time.perf_counter() - started)
