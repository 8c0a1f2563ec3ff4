"""Generation jobs: submit, read, list."""

from __future__ import annotations

from typing import Literal

import structlog
from flask import Blueprint, url_for
from kombu.exceptions import OperationalError
from pydantic import BaseModel, ConfigDict, Field
from redis import RedisError

from services.domain import jobs as job_domain
from services.gateway.auth import current_caller, require_key
from services.gateway.context import GatewayContext, gateway
from services.gateway.requests import parse_body, parse_query, prefer_wait_seconds
from services.gateway.waiting import wait_until_done
from shared.celery_app import GENERATE_TASK
from shared.jobs import JobStatus
from shared.models import Job
from shared.schemas import GenerationRequest, JobList

log = structlog.get_logger(__name__)
blueprint = Blueprint("jobs", __name__)


class JobListQuery(BaseModel):
    """Query parameters of GET /v1/jobs."""

    model_config = ConfigDict(extra="forbid")

    limit: int = Field(default=20, ge=1, le=100)
    after: str | None = Field(default=None, max_length=40)
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"] | None = None
    kind: Literal["generation", "fine_tune"] | None = None


@blueprint.post("/v1/generations")
@require_key()
def create_generation():
    """Record a generation job, enqueue it, and answer 202 (or 200 if it finished in time)."""
    context = gateway()
    body = parse_body(GenerationRequest)
    wait_s = prefer_wait_seconds(context.settings.max_wait_s)
    with context.db.session_scope() as session:
        job = job_domain.create_generation(
            session,
            current_caller(),
            body,
            registry=context.registry,
            settings=context.settings,
        )
    structlog.contextvars.bind_contextvars(job_id=job.id)
    log.info("job_submitted", model=job.model, kind=job.kind)
    # Only now is the row committed: a worker that gets the message will find it.
    _enqueue(context, job)
    if wait_s > 0:
        wait_until_done(context.redis, job.id, wait_s, lambda: _is_finished(context, job.id))
    return _job_response(context, job.id, wait_s)


def _enqueue(context: GatewayContext, job: Job) -> None:
    """Publish 'job X is ready to run'; the row stays queued if Redis is unreachable."""
    try:
        context.celery.send_task(GENERATE_TASK, args=[job.id], queue=job.queue)
    except (OperationalError, RedisError, OSError) as exc:
        log.error("enqueue_failed", job_id=job.id, error=str(exc))


def _is_finished(context: GatewayContext, job_id: str) -> bool:
    with context.db.session_scope() as session:
        status = session.get(Job, job_id).status
    return JobStatus(status).is_terminal


def _job_response(context: GatewayContext, job_id: str, wait_s: float):
    with context.db.session_scope() as session:
        job = job_domain.get_job(session, current_caller(), job_id)
        (body,) = job_domain.describe_jobs(session, [job])
    finished = JobStatus(body.status).is_terminal
    headers = {"Location": url_for("jobs.get_job", job_id=job_id)}
    if wait_s > 0:
        headers["Preference-Applied"] = f"wait={wait_s:g}"
    return body.model_dump(mode="json"), (200 if finished else 202), headers


@blueprint.get("/v1/jobs/<job_id>")
@require_key()
def get_job(job_id: str):
    """Return one of the caller's jobs."""
    with gateway().db.session_scope() as session:
        job = job_domain.get_job(session, current_caller(), job_id)
        (body,) = job_domain.describe_jobs(session, [job])
    return body.model_dump(mode="json")


@blueprint.get("/v1/jobs")
@require_key()
def list_jobs():
    """List the caller's jobs, newest first, with a keyset cursor."""
    query = parse_query(JobListQuery)
    with gateway().db.session_scope() as session:
        rows, has_more = job_domain.list_jobs(
            session,
            current_caller(),
            limit=query.limit,
            after=query.after,
            status=query.status,
            kind=query.kind,
        )
        data = job_domain.describe_jobs(session, rows)
    page = JobList(data=data, has_more=has_more, next_after=rows[-1].id if has_more else None)
    return page.model_dump(mode="json")
