"""Fine-tuning jobs: submit a LoRA training run."""

from __future__ import annotations

import structlog
from flask import Blueprint
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from services.domain import jobs as job_domain
from services.domain.fine_tunes import create_fine_tune
from services.gateway.api.jobs import existing_job, idempotency_key_header, job_response
from services.gateway.auth import current_caller, require_key
from services.gateway.context import gateway
from services.gateway.metrics import JOBS_SUBMITTED
from services.gateway.requests import parse_body
from shared.celery_app import model_of_queue
from shared.errors import TooManyRequests
from shared.schemas import FineTuneRequest

log = structlog.get_logger(__name__)
blueprint = Blueprint("fine_tunes", __name__)


@blueprint.post("/v1/fine-tunes")
@require_key()
def submit_fine_tune():
    """Record a fine-tune job, enqueue it on its base model's fine-tune queue, answer 202."""
    context = gateway()
    body = parse_body(FineTuneRequest)
    key = idempotency_key_header()
    replayed = existing_job(context, body, key) if key else None
    if replayed is not None:
        return _replay(context, replayed)
    try:
        with context.db.session_scope() as session:
            submission = create_fine_tune(
                session, current_caller(), body, registry=context.registry, settings=context.settings,
                idempotency_key=key,
            )
    # A concurrent submit with the same key won: its insert, or its commit counted against the
    # key's limits while this one waited (as for generations).
    except (IntegrityError, TooManyRequests):
        replayed = existing_job(context, body, key) if key else None
        if replayed is None:
            raise
        return _replay(context, replayed)
    job = submission.job
    structlog.contextvars.bind_contextvars(job_id=job.id)
    log.info("job_submitted", model=job.model, kind=job.kind, adapter_id=job.adapter_id)
    JOBS_SUBMITTED.labels(job.kind, model_of_queue(job.queue)).inc()
    # Read back before publishing: once published, a worker may claim it before the answer.
    try:
        described = job_domain.poll_job(context.db, current_caller(), job.id, context.live_queues)
    except SQLAlchemyError as exc:
        # The job is committed: a 500 now would make the client's retry record it twice.
        log.warning("submit_answered_as_recorded", error=str(exc))
        described = job_domain.describe_recorded(job)
    context.publisher.publish(job.id, job.queue)
    response = job_response(context, job.id, 0, described)
    response.headers.update(submission.admission.headers())
    return response


def _replay(context, job):
    """Answer a retried submit with the job its first try created (nothing recorded again)."""
    structlog.contextvars.bind_contextvars(job_id=job.id)
    response = job_response(context, job.id, 0)
    response.headers["Idempotent-Replayed"] = "true"
    return response
