"""Generation jobs: submit, read, list."""

from __future__ import annotations

from typing import Literal

import structlog
from flask import Blueprint, request
from pydantic import BaseModel, ConfigDict, Field
from redis import RedisError
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from services.domain import jobs as job_domain
from services.domain import limits
from services.domain.adapters import get_adapter, is_adapter_id
from services.gateway import streaming
from services.gateway.auth import current_caller, require_key
from services.gateway.context import GatewayContext, gateway
from services.gateway.metrics import JOBS_SUBMITTED
from services.gateway.requests import json_response, parse_body, parse_query, prefer_wait_seconds
from services.gateway.waiting import wait_until_done
from shared.celery_app import model_of_queue
from shared.errors import InvalidField, ServiceBusy, TooManyRequests
from shared.jobs import JobStatus
from shared.models import Adapter, Job
from shared.notify import publish_job_done
from shared.schemas import GenerationRequest, JobEventList, JobList
from shared.schemas import Job as JobOut

log = structlog.get_logger(__name__)
blueprint = Blueprint("jobs", __name__)


ID_PATTERN = r"^[0-9A-Za-z_-]+$"


class EventListQuery(BaseModel):
    """Query parameters of GET /v1/jobs/{id}/events."""

    model_config = ConfigDict(extra="forbid")

    after: int = Field(default=0, ge=0, le=2**63 - 1, description="the last event id already seen")
    limit: int = Field(default=100, ge=1, le=1000)


class JobListQuery(BaseModel):
    """Query parameters of GET /v1/jobs."""

    model_config = ConfigDict(extra="forbid")

    limit: int = Field(default=20, ge=1, le=100)
    after: str | None = Field(default=None, max_length=40, pattern=ID_PATTERN, description="the last job id seen")
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"] | None = None
    kind: Literal["generation", "fine_tune"] | None = None


@blueprint.post("/v1/generations")
@require_key()
def create_generation():
    """Record a generation job, enqueue it, and answer 202 (or 200 if it finished in time, or
    200 with its event stream when the body asks to `stream`)."""
    context = gateway()
    body = parse_body(GenerationRequest)
    wait_s = prefer_wait_seconds(context.settings.max_wait_s)
    idempotency_key = idempotency_key_header()
    job = existing_job(context, body, idempotency_key) if idempotency_key else None
    replayed = job is not None
    limit_headers: dict[str, str] = {}
    position = None
    if job is None and idempotency_key is None and not limits.applies(current_caller(), context.settings):
        job, position = _record_grouped(context, body)
    elif job is None:
        job, position, limit_headers, replayed = _record_admitted(context, body, idempotency_key)
    structlog.contextvars.bind_contextvars(job_id=job.id)
    headers = dict(limit_headers)
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    try:
        return _answer_submit(context, body, job, position, wait_s, replayed, headers)
    except SQLAlchemyError as exc:
        if replayed:
            raise  # an earlier submit's job: a retry finds it again
        # The job is committed: a 500 now would make the client's retry record it twice.
        log.warning("submit_answered_as_recorded", error=str(exc))
        response = json_response(job_domain.describe_new_job(job, position, None), 202, {"Location": job_path(job.id)})
        response.headers.update(headers)
        return response


def _answer_submit(context: GatewayContext, body: GenerationRequest, job, position: int | None, wait_s: float,
                   replayed: bool, headers: dict[str, str]):
    """Answer a recorded submit: its stream, or the job once it ended or the wait ran out, or at once."""
    if body.stream:
        # The stream lasts until the job ends, so `Prefer: wait` has nothing to add to it.
        wait_s = 0
        try:
            return streaming.event_stream(
                context, current_caller(), job.id, headers={**headers, "Location": job_path(job.id)})
        except ServiceBusy:
            pass  # no place to hold it: the job is recorded, so answer as a plain submit (below)
    # No place to hold a wait either: answer at once (`Prefer` lets a server not wait).
    key_id = current_caller().key_id
    if wait_s > 0 and not context.held.try_hold("wait", key_id):
        wait_s = 0
    described = None
    if wait_s > 0:
        try:
            wait_until_done(context.redis, job.id, wait_s, lambda: _is_finished(context, job.id))
        finally:
            context.held.release(key_id)
    elif not replayed:
        # Nothing can have changed the job but a worker claiming it: answer with it as recorded,
        # rather than read it back.
        queued = context.live_queues.after_commit(context.db)
        described = job_domain.describe_new_job(job, position, queued)
    response = job_response(context, job.id, wait_s, described)
    response.headers.update(headers)
    return response


def _record_grouped(context: GatewayContext, body: GenerationRequest):
    """Record and publish a job of a key without limits; return it and its queue position.

    No limits to count and no earlier submit to look up: the row is the submit's one write, so
    concurrent submits share their INSERT, commit and publish (`GroupedCalls`).
    """
    adapter = _adapter(context, body.model)
    job = job_domain.plan_generation(
        current_caller(), body, adapter=adapter, registry=context.registry, settings=context.settings,
        prompt_tokens=_prompt_tokens(context, body, adapter))
    position = context.submits.run(job)
    announce_submitted(job)
    return job, position


def _record_admitted(context: GatewayContext, body: GenerationRequest, idempotency_key: str | None):
    """Admit a job against its key's limits and record it in one transaction, then publish it.

    Returns the job, its queue position, the limit headers and whether it was an earlier
    submit's job (a concurrent submit with the same Idempotency-Key won the insert).
    """
    try:
        # Counted before the transaction (not while holding the key's lock); an adapter's prompt on
        # its base model, so that one too long for the context is a 422 here, not a failed job.
        prompt_tokens = _prompt_tokens(context, body, _adapter(context, body.model), limited=True)
        with context.db.session_scope() as session:
            submission = job_domain.create_generation(
                session,
                current_caller(),
                body,
                db=context.db,
                registry=context.registry,
                settings=context.settings,
                idempotency_key=idempotency_key,
                prompt_tokens=prompt_tokens,
            )
    # A concurrent submit with the same Idempotency-Key won: its insert (IntegrityError), or
    # its commit while this one waited on the key's lock, which then counted its job (429).
    except (IntegrityError, TooManyRequests):
        if idempotency_key is None:
            raise
        job = existing_job(context, body, idempotency_key)
        if job is None:
            raise
        return job, None, {}, True
    announce_submitted(submission.job)
    # Only now is the row committed: a worker that gets the message will find it.
    context.publisher.publish(submission.job.id, submission.job.queue)
    return submission.job, submission.queue_position, submission.admission.headers(), False


def _prompt_tokens(context: GatewayContext, body: GenerationRequest, adapter: Adapter | None,
                   limited: bool = False) -> int | None:
    """The prompt count the submit checks and reserves with, on the model that will run it.

    For a key with limits (`limited`), a long prompt is counted only once a read of the key's
    limits shows they could admit it (`limits.refuse_early`).
    """
    model_id = adapter.base_model if adapter else None
    if limited and context.token_counter.costs_much(body, context.settings, model_id):
        with context.db.session_scope(read_only=True) as session:
            limits.refuse_early(session, current_caller(), context.settings,
                                tokens_at_least=body.max_new_tokens or context.settings.default_max_new_tokens)
    return context.token_counter.at_submit(body, context.settings, model_id)


def _adapter(context: GatewayContext, model: str) -> Adapter | None:
    """Return the caller's adapter that `model` names, if it names one (404 if it is not theirs)."""
    if not is_adapter_id(model):
        return None
    with context.db.session_scope(read_only=True) as session:
        return get_adapter(session, current_caller(), model)


def announce_submitted(job) -> None:
    """Log and count a job just recorded."""
    log.info("job_submitted", job_id=job.id, model=job.model, kind=job.kind)
    JOBS_SUBMITTED.labels(job.kind, model_of_queue(job.queue)).inc()


def idempotency_key_header() -> str | None:
    """Return the request's Idempotency-Key, if it has one (422 if its length is out of bounds)."""
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not 1 <= len(key) <= 200:
        raise InvalidField(
            "Idempotency-Key must be 1 to 200 characters",
            details=[{"field": "Idempotency-Key", "message": "bad length"}],
        )
    return key


def existing_job(context: GatewayContext, body: BaseModel, idempotency_key: str) -> Job | None:
    """Return the caller's job an earlier submit with this key created (409 if its body differed)."""
    with context.db.session_scope(read_only=True) as session:
        return job_domain.find_idempotent(session, current_caller(), idempotency_key, body, context.settings)


def _is_finished(context: GatewayContext, job_id: str) -> bool:
    with context.db.session_scope(read_only=True) as session:
        status = session.get(Job, job_id).status
    return JobStatus(status).is_terminal


def job_response(context: GatewayContext, job_id: str, wait_s: float, body: JobOut | None = None):
    """Answer with a job just submitted, read unless given: 202, or 200 if it has finished and
    `Prefer: wait` was asked for (a replayed submit too: the job as it is now)."""
    if body is None:
        body = job_domain.poll_job(context.db, current_caller(), job_id, context.live_queues)
    finished = JobStatus(body.status).is_terminal
    headers = {"Location": job_path(job_id)}
    if wait_s > 0:
        headers["Preference-Applied"] = f"wait={wait_s:g}"
    return json_response(body, 200 if finished and wait_s > 0 else 202, headers)


@blueprint.post("/v1/jobs/<job_id>/cancel")
@require_key()
def cancel_job(job_id: str):
    """Cancel a queued or running job (idempotent); a finished job is a 409."""
    context = gateway()
    with context.db.session_scope() as session:
        job = job_domain.cancel_job(session, current_caller(), job_id)
        (body,) = job_domain.describe_jobs(session, [job], context.live_queues)
    structlog.contextvars.bind_contextvars(job_id=job_id)
    log.info("job_cancel_requested", status=body.status)
    try:
        publish_job_done(context.redis, job_id, body.status)  # wake anyone waiting on it
    except RedisError:
        pass  # waiters fall back to reading the row
    return body.model_dump(mode="json")


JOB_PATH = "/v1/jobs/{}"


def job_path(job_id: str) -> str:
    """Return the path of `get_job` for a job (ids need no escaping: letters, digits and `_`).

    `url_for` would build the same through the URL map, at a few per cent of a submit's CPU.
    """
    return JOB_PATH.format(job_id)


@blueprint.get(JOB_PATH.format("<job_id>"))
@require_key()
def get_job(job_id: str):
    """Return one of the caller's jobs."""
    context = gateway()
    body = job_domain.poll_job(context.db, current_caller(), job_id, context.live_queues, context.queue_positions,
                               context.poll_reads)
    return json_response(body)


@blueprint.get("/v1/jobs")
@require_key()
def list_jobs():
    """List the caller's jobs, newest first, with a keyset cursor."""
    query = parse_query(JobListQuery)
    context = gateway()
    with context.db.session_scope(read_only=True) as session:
        rows, has_more = job_domain.list_jobs(
            session,
            current_caller(),
            limit=query.limit,
            after=query.after,
            status=query.status,
            kind=query.kind,
        )
        data = job_domain.describe_jobs(session, rows, context.live_queues)
    page = JobList(data=data, has_more=has_more, next_after=rows[-1].id if has_more else None)
    return json_response(page)


@blueprint.get("/v1/jobs/<job_id>/events")
@require_key()
def list_job_events(job_id: str):
    """Return a job's events oldest first: status changes, for fine-tunes each loss point, and
    while its token stream is kept, its tokens.

    With `Accept: text/event-stream`, stream them live instead, until the job ends.
    """
    if streaming.wants_event_stream(request.accept_mimetypes):
        return streaming.event_stream(gateway(), current_caller(), job_id, request.headers.get("Last-Event-ID"))
    query = parse_query(EventListQuery)
    with gateway().db.session_scope(read_only=True) as session:
        rows, has_more = job_domain.list_events(
            session, current_caller(), job_id, after=query.after, limit=query.limit
        )
        data = streaming.listed_events(gateway(), session, job_id, rows, query.after, has_more)
    next_after = rows[-1].id if has_more else None
    return JobEventList(data=data, has_more=has_more, next_after=next_after).model_dump(mode="json")
