"""Celery tasks: each takes a job id, claims the row, runs, and writes the outcome once."""

from __future__ import annotations

import structlog
from celery import Celery
from redis import RedisError

from shared import job_store
from shared.celery_app import GENERATE_TASK
from shared.jobs import JobStatus
from shared.notify import publish_job_done
from shared.publish import publish_job
from workers.generation import GenerationError, GenerationOutput, generate
from workers.job_guard import JobGuard, StopReason
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
    """Claim the job, generate without holding a DB connection, then store the outcome once."""
    settings = rt.settings
    with rt.db.session_scope() as session:
        held = job_store.claim(
            session,
            job_id,
            rt.worker_id,
            device=str(rt.device),
            lease_s=settings.lease_s,
            max_attempts=settings.max_attempts,
        )
    if held is None:
        # Already taken, finished, cancelled or expired: a redelivery does nothing.
        log.info("job_not_claimed")
        return
    log.info("job_started", model=held.model, attempt=held.attempt)
    timeout_s = held.params.get("timeout_s", settings.default_timeout_s)
    output: GenerationOutput | None = None
    with JobGuard(rt, held, timeout_s) as guard:
        try:
            output = generate(rt.models.get(held.model), held.params, should_stop=guard.should_stop)
        except GenerationError as exc:
            code, message = exc.code, exc.message
        except ModelUnavailable as exc:
            code, message = "model_unavailable", str(exc)
        except Exception as exc:  # noqa: BLE001 - one job's crash must not stop the worker
            log.exception("job_crashed")
            code, message = "internal_error", f"{exc.__class__.__name__}: {exc}"
    if output is None:
        with rt.db.session_scope() as session:
            stored = job_store.fail(session, held, rt.worker_id, code=code, message=message)
        log.warning("job_failed", code=code, message=message)
        _announce_if(stored, rt, job_id, JobStatus.FAILED)
        return
    _store_outcome(rt, held, output, guard.reason, timeout_s)


def _store_outcome(
    rt: WorkerRuntime, held, output: GenerationOutput, reason: str | None, timeout_s: float
) -> None:
    """Write what this attempt earned: a result, a timeout, a hand-back, or a cancel charge."""
    usage = {
        "prompt_tokens": output.prompt_tokens,
        "completion_tokens": output.completion_tokens,
        "gpu_seconds": round(output.seconds, 4),
    }
    with rt.db.session_scope() as session:
        if reason == StopReason.SHUTDOWN:
            outcome = "handed_back" if job_store.hand_back(session, held, rt.worker_id) else None
        elif reason == StopReason.TIMEOUT:
            message = f"the job ran past its timeout_s of {timeout_s:g} s and was stopped"
            stored = job_store.fail(session, held, rt.worker_id, code="timeout", message=message, usage=usage)
            outcome = "timed_out" if stored else None
        else:
            result = {"text": output.text, "finish_reason": output.finish_reason, "token_ids": output.token_ids}
            stored = job_store.finish(session, held, rt.worker_id, result=result, usage=usage)
            outcome = "finished" if stored else None
        # Not written: the job was cancelled meanwhile (charge what was produced) or taken
        # over after a lost lease (the new holder writes; this attempt writes nothing).
        if outcome is None and job_store.charge_cancelled(session, held, rt.worker_id, usage):
            outcome = "cancelled"
    tokens_per_s = round(output.completion_tokens / max(output.seconds, 1e-9), 1)
    log.info(f"job_{outcome or 'result_discarded'}", reason=reason, tokens_per_s=tokens_per_s, **usage)
    if outcome == "handed_back":
        publish_job(rt.celery, held.job_id, held.queue)
    elif outcome in ("finished", "timed_out"):
        status = JobStatus.SUCCEEDED if outcome == "finished" else JobStatus.FAILED
        _announce_if(True, rt, held.job_id, status)


def _announce_if(stored: bool, rt: WorkerRuntime, job_id: str, status: str) -> None:
    if not stored:
        return
    try:
        publish_job_done(rt.redis, job_id, status)
    except RedisError as exc:
        # Waiters fall back to reading the row; the outcome is already committed.
        log.warning("announce_failed", error=str(exc))
