"""Celery tasks: each takes a job id, claims the row, runs, and writes the outcome once."""

from __future__ import annotations

import structlog
from celery import Celery
from redis import RedisError

from shared import job_store
from shared.celery_app import GENERATE_TASK
from shared.jobs import JobStatus
from shared.models import Job
from shared.notify import publish_job_done
from workers.generation import GenerationError, generate
from workers.model_loader import ModelUnavailable
from workers.runtime import WorkerRuntime, runtime

log = structlog.get_logger(__name__)


def register_tasks(app: Celery) -> None:
    """Register the worker's tasks on a Celery app."""

    @app.task(name=GENERATE_TASK)
    def generate_task(job_id: str) -> None:
        """Run one generation job (the signature is a wire contract: add only keyword args)."""
        structlog.contextvars.bind_contextvars(job_id=job_id)
        try:
            run_generation_job(runtime(), job_id)
        finally:
            structlog.contextvars.unbind_contextvars("job_id")


def run_generation_job(rt: WorkerRuntime, job_id: str) -> None:
    """Claim a queued job, generate without holding a DB connection, then store the outcome."""
    with rt.db.session_scope() as session:
        if not job_store.claim(session, job_id, rt.worker_id):
            # Already taken, finished or cancelled: a redelivery does nothing.
            log.info("job_not_claimed")
            return
        job = session.get(Job, job_id)
        model_id, params = job.model, dict(job.params)
    log.info("job_started", model=model_id)
    try:
        output = generate(rt.models.get(model_id), params)
    except GenerationError as exc:
        _fail(rt, job_id, exc.code, exc.message)
        return
    except ModelUnavailable as exc:
        _fail(rt, job_id, "model_unavailable", str(exc))
        return
    except Exception as exc:  # noqa: BLE001 - any crash of one job must not stop the worker
        log.exception("job_crashed")
        _fail(rt, job_id, "internal_error", f"{exc.__class__.__name__}: {exc}")
        return
    with rt.db.session_scope() as session:
        stored = job_store.finish(
            session,
            job,
            rt.worker_id,
            result={
                "text": output.text,
                "finish_reason": output.finish_reason,
                "token_ids": output.token_ids,
            },
            usage={
                "prompt_tokens": output.prompt_tokens,
                "completion_tokens": output.completion_tokens,
                "gpu_seconds": round(output.seconds, 4),
            },
        )
    log.info(
        "job_finished" if stored else "job_result_discarded",
        prompt_tokens=output.prompt_tokens,
        completion_tokens=output.completion_tokens,
        seconds=round(output.seconds, 3),
        tokens_per_s=round(output.completion_tokens / max(output.seconds, 1e-9), 1),
    )
    if stored:
        _announce(rt, job_id, JobStatus.SUCCEEDED)


def _fail(rt: WorkerRuntime, job_id: str, code: str, message: str) -> None:
    with rt.db.session_scope() as session:
        stored = job_store.fail(session, job_id, rt.worker_id, code=code, message=message)
    log.warning("job_failed", code=code, message=message)
    if stored:
        _announce(rt, job_id, JobStatus.FAILED)


def _announce(rt: WorkerRuntime, job_id: str, status: str) -> None:
    try:
        publish_job_done(rt.redis, job_id, status)
    except RedisError as exc:
        # Waiters fall back to reading the row; the outcome is already committed.
        log.warning("announce_failed", error=str(exc))
