"""Fine-tuning jobs: submit a LoRA training run."""

from __future__ import annotations

import structlog
from flask import Blueprint

from services.domain import jobs as job_domain
from services.domain.fine_tunes import create_fine_tune
from services.gateway.api.jobs import job_response
from services.gateway.auth import current_caller, require_key
from services.gateway.context import gateway
from services.gateway.metrics import JOBS_SUBMITTED
from services.gateway.requests import parse_body
from shared.celery_app import model_of_queue
from shared.schemas import FineTuneRequest

log = structlog.get_logger(__name__)
blueprint = Blueprint("fine_tunes", __name__)


@blueprint.post("/v1/fine-tunes")
@require_key()
def submit_fine_tune():
    """Record a fine-tune job, enqueue it on its base model's fine-tune queue, answer 202."""
    context = gateway()
    body = parse_body(FineTuneRequest)
    with context.db.session_scope() as session:
        submission = create_fine_tune(
            session, current_caller(), body, registry=context.registry, settings=context.settings
        )
    job = submission.job
    structlog.contextvars.bind_contextvars(job_id=job.id)
    log.info("job_submitted", model=job.model, kind=job.kind, adapter_id=job.adapter_id)
    JOBS_SUBMITTED.labels(job.kind, model_of_queue(job.queue)).inc()
    # Read back before publishing: once published, a worker may claim it before the answer.
    described = job_domain.poll_job(context.db, current_caller(), job.id, context.live_queues)
    context.publisher.publish(job.id, job.queue)
    response = job_response(context, job.id, 0, described)
    response.headers.update(submission.admission.headers())
    return response
