"""Creating, reading and listing jobs."""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from pydantic import BaseModel
from sqlalchemy import Connection, bindparam, case, func, insert, select, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, aliased

from services.domain import limits
from services.domain.adapters import get_adapter, is_adapter_id
from services.domain.grouped_calls import GroupedCalls
from services.domain.keys import Caller
from services.domain.operations import LiveQueues, waiting_for
from services.domain.queue_positions import QueuePositions
from shared import job_store
from shared.celery_app import queue_for
from shared.db import DATABASE_UNAVAILABLE, Database, get_by_id
from shared.errors import Conflict, InvalidField, NotFound
from shared.ids import new_id
from shared.jobs import QUEUE_POSITION_CAP, JobKind, JobStatus
from shared.models import Adapter, Job, JobEvent, UsageRecord, utcnow
from shared.publish import JobPublisher
from shared.registry import ModelRegistry
from shared.schemas import GenerationRequest
from shared.schemas import Job as JobOut
from shared.settings import Settings


@dataclass(frozen=True)
class NewGeneration:
    """A generation job as its submit records it: the values of its row, by column name."""

    row: dict[str, Any]

    @property
    def id(self) -> str:
        return self.row["id"]

    @property
    def queue(self) -> str:
        return self.row["queue"]

    @property
    def model(self) -> str:
        return self.row["model"]

    @property
    def kind(self) -> str:
        return self.row["kind"]

    @property
    def status(self) -> str:
        return self.row["status"]


@dataclass(frozen=True)
class Submission:
    """A recorded job and the key's limits after admitting it."""

    job: Job | NewGeneration
    admission: limits.Admission
    # Jobs ahead of it in its queue when it was recorded (generations; see `insert_generations`).
    queue_position: int | None = None


def create_generation(
    session: Session,
    caller: Caller,
    request: GenerationRequest,
    *,
    db: Database,
    registry: ModelRegistry,
    settings: Settings,
    idempotency_key: str | None = None,
    prompt_tokens: int | None = None,
) -> Submission:
    """Validate a request, admit it against the key's limits and record it as queued, all in the session.

    `db` is the session's database. `prompt_tokens` is the exact count when the gateway could
    tokenize; else it is estimated.
    """
    adapter = get_adapter(session, caller, request.model) if is_adapter_id(request.model) else None
    job = plan_generation(caller, request, adapter=adapter, registry=registry, settings=settings,
                          idempotency_key=idempotency_key, prompt_tokens=prompt_tokens)
    admission = limits.admit(session, caller, settings, job.row["reserved_tokens"], job.row["created_at"])
    job.row["rate_window_start"] = admission.window_start
    (position,) = insert_generations(db, [job], within=session.connection())
    return Submission(job, admission, position)


def plan_generation(
    caller: Caller,
    request: GenerationRequest,
    *,
    adapter: Adapter | None,
    registry: ModelRegistry,
    settings: Settings,
    idempotency_key: str | None = None,
    prompt_tokens: int | None = None,
) -> NewGeneration:
    """Validate a request (422 names the field) and return the row that records it as queued.

    `adapter` is the caller's adapter when `request.model` names one (`get_adapter`). The row
    reserves the prompt's tokens plus `max_new_tokens`; admission, if the key has limits, sets
    its `rate_window_start`.
    """
    entry = registry.get(adapter.base_model if adapter else request.model)
    if entry is None:
        known = ", ".join(model.id for model in registry.all())
        raise InvalidField(
            f"unknown model {request.model!r}; GET /v1/models lists them ({known})",
            details=[{"field": "model", "message": "unknown model"}],
        )
    max_new_tokens = request.max_new_tokens or settings.default_max_new_tokens
    timeout_s = request.timeout_s or settings.default_timeout_s
    _check_limits(request, settings, max_new_tokens=max_new_tokens, timeout_s=timeout_s)
    # `stream` only says how this request is answered; the worker has no use for it.
    params = request.model_dump(exclude={"model", "metadata", "ttl_s", "stream"}, exclude_none=True)
    params.update(max_new_tokens=max_new_tokens, timeout_s=timeout_s)
    if adapter is not None:
        params["base_model"] = entry.id
    if prompt_tokens is not None and prompt_tokens + max_new_tokens > entry.context_length:
        raise InvalidField(
            f"the prompt is {prompt_tokens} tokens and max_new_tokens is {max_new_tokens}; together "
            f"they must fit {entry.id}'s context of {entry.context_length} tokens",
            details=[{"field": "messages" if request.messages else "prompt", "message": "over the context"}],
        )
    now = utcnow()
    reserved = (prompt_tokens if prompt_tokens is not None else estimate_prompt_tokens(request)) + max_new_tokens
    row = dict(
        id=new_id("job"),
        owner_key_id=caller.key_id,
        kind=JobKind.GENERATION,
        model=request.model,
        # An adapter runs on any worker that serves its base model.
        queue=queue_for(JobKind.GENERATION, entry.id),
        adapter_id=adapter.id if adapter else None,
        status=JobStatus.QUEUED,
        params=params,
        metadata=request.metadata,
        created_at=now,
        attempts=0,
        # Published right after the commit; the reaper republishes it if that never happens.
        enqueued_at=now,
        expires_at=now + timedelta(seconds=request.ttl_s) if request.ttl_s else None,
        idempotency_key=idempotency_key,
        request_hash=request_hash(request, settings) if idempotency_key else None,
        reserved_tokens=reserved,
        rate_window_start=None,
    )
    return NewGeneration(row)


def insert_generations(
    db: Database, jobs: list[NewGeneration], within: Connection | None = None, committed: dict[str, int] | None = None
) -> list[int]:
    """Insert planned jobs of one or more queues, each statement committing by itself (or in
    `within`'s transaction); return each one's queue position, in `jobs`' order.

    One INSERT per queue holds all of its rows and counts the queued jobs ahead of them once
    (an uncorrelated subquery is evaluated once per statement): a group of submits costs the
    database about what one did. A job's position is that count plus the group's jobs before it.
    `committed` (without `within`) gets each job's position as its statement commits, so that a
    caller whose later statement failed knows which jobs are recorded already.
    """
    by_queue: dict[str, list[NewGeneration]] = defaultdict(list)
    for job in sorted(jobs, key=lambda job: job.id):  # ids are time-ordered: queue order
        by_queue[job.queue].append(job)
    positions = committed if committed is not None else {}
    for queue, queued in by_queue.items():
        if db.engine.dialect.name == "postgresql":
            statement, params = _INSERT_JSON_ROWS, {"rows": _rows_json(queued)}
        else:
            statement = _insert_rows(len(queued))
            params = {f"r{index}_{name}": job.row[name] for index, job in enumerate(queued) for name in _SUBMIT_COLUMNS}
        params.update(position_queue=queue, position_before=queued[0].id)
        (ahead,) = db.first(statement, params, within=within)
        positions.update((job.id, min(ahead + index, QUEUE_POSITION_CAP)) for index, job in enumerate(queued))
    return [positions[job.id] for job in jobs]


def record_generations(db: Database, publisher: JobPublisher, jobs: list[NewGeneration]) -> list[int | Exception]:
    """Commit planned jobs (keys without limits) in one statement per queue, then publish them in one
    Redis round trip; return each one's queue position, or the error that kept it from being recorded.

    If the group's insert fails on a row, each job is inserted alone, so that one bad row fails
    only its own submit; if the database is unavailable, every job of the group fails at once (a
    try per row waited out one failed connection after another, holding every later group). A
    job whose message cannot be published stays queued: the reaper publishes it later.
    """
    committed: dict[str, int] = {}
    try:
        outcomes: list[int | Exception] = insert_generations(db, jobs, committed=committed)
    except DBAPIError as exc:
        if len(jobs) == 1:
            return [exc]
        # A statement for another queue may have committed before this one failed: its jobs are
        # recorded (inserted again, each would fail as a duplicate, and its submit with it).
        # The others: alone, unless the database is unavailable (then every try would fail too).
        unavailable = isinstance(exc, DATABASE_UNAVAILABLE)
        outcomes = [committed[job.id] if job.id in committed else exc if unavailable else _insert_alone(db, job)
                    for job in jobs]
    publisher.publish_many([(job.id, job.queue) for job, outcome in zip(jobs, outcomes)
                            if not isinstance(outcome, Exception)])
    return outcomes


def _insert_alone(db: Database, job: NewGeneration) -> int | Exception:
    try:
        (position,) = insert_generations(db, [job])
    except DBAPIError as exc:
        return exc
    return position


def estimate_prompt_tokens(request: GenerationRequest) -> int:
    """Estimate prompt tokens without a tokenizer (the gateway loads none): ~4 characters a
    token, plus the chat turn markers. The reservation is settled to the real count later."""
    if request.prompt is not None:
        return math.ceil(len(request.prompt) / 4) + 1
    return sum(math.ceil(len(message.content) / 4) + 5 for message in request.messages or []) + 3


def _check_limits(
    request: GenerationRequest, settings: Settings, *, max_new_tokens: int, timeout_s: float
) -> None:
    """Refuse (422, field named) what is over this server's maxima."""
    prompt_field = "messages" if request.messages is not None else "prompt"
    prompt_chars = (
        len(request.prompt)
        if request.prompt is not None
        else sum(len(message.content) for message in request.messages or [])
    )
    checks = [
        (max_new_tokens > settings.max_new_tokens, "max_new_tokens",
         f"max_new_tokens is at most {settings.max_new_tokens} on this server"),
        (len(request.messages or []) > settings.max_messages, "messages",
         f"at most {settings.max_messages} messages per request"),
        (prompt_chars > settings.max_prompt_chars, prompt_field,
         f"the prompt is {prompt_chars} characters; the limit is {settings.max_prompt_chars}"),
        (timeout_s > settings.max_timeout_s, "timeout_s",
         f"timeout_s is at most {settings.max_timeout_s:g} on this server"),
        ((request.ttl_s or 0) > settings.max_ttl_s, "ttl_s",
         f"ttl_s is at most {settings.max_ttl_s:g} on this server"),
    ]
    for over, field, message in checks:
        if over:
            raise InvalidField(message, details=[{"field": field, "message": "over the server maximum"}])


def request_hash(request: BaseModel, settings: Settings | None = None) -> str:
    """Return a digest of a request's meaning (field order and defaults do not matter).

    With `settings`, a value sent equal to the one this server fills in when it is left out
    (`max_new_tokens`, `timeout_s`) counts as left out.
    """
    # How the answer is delivered is not part of the job: a retry may stream or not and still
    # get the same job (and hashes stored before `stream` existed still match).
    meaning = request.model_dump(mode="json", exclude={"stream"})
    if settings is not None and isinstance(request, GenerationRequest):
        for field, default in (("max_new_tokens", settings.default_max_new_tokens),
                               ("timeout_s", settings.default_timeout_s)):
            if meaning[field] == default:
                meaning[field] = None
    canonical = json.dumps(meaning, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def find_idempotent(
    session: Session, caller: Caller, idempotency_key: str, request: BaseModel, settings: Settings
) -> Job | None:
    """Return the job an earlier submit with this key created; 409 if its body differed."""
    job = session.scalars(
        select(Job).where(Job.owner_key_id == caller.key_id, Job.idempotency_key == idempotency_key)
    ).first()
    # The body as sent also matches: jobs stored before explicit defaults counted as left out.
    if job is not None and job.request_hash not in (request_hash(request, settings), request_hash(request)):
        raise Conflict(
            f"Idempotency-Key {idempotency_key!r} was already used with a different request body "
            f"(job {job.id}); use a new key for a new request",
            code="idempotency_key_reused",
        )
    return job


def cancel_job(session: Session, caller: Caller, job_id: str) -> Job:
    """Cancel one of the caller's queued or running jobs; cancelling twice is fine."""
    job = get_job(session, caller, job_id)
    if not job_store.cancel(session, job.id):
        session.refresh(job)
        if job.status != JobStatus.CANCELLED:
            raise Conflict(
                f"job {job.id} already {job.status}; only queued or running jobs can be cancelled",
                code="job_finished",
            )
    session.refresh(job)
    return job


def get_job(session: Session, caller: Caller, job_id: str) -> Job:
    """Return one of the caller's jobs; someone else's job is 'not found' too."""
    job = get_by_id(session, Job, job_id)
    return _owned(job, caller, job_id)


def _owned(job, caller: Caller, job_id: str):
    """Return a job (entity or row) if it is the caller's; else 404."""
    if job is None or job.owner_key_id != caller.key_id:
        raise NotFound(f"no job {job_id!r}")
    return job


def list_jobs(
    session: Session,
    caller: Caller,
    *,
    limit: int,
    after: str | None = None,
    status: str | None = None,
    kind: str | None = None,
) -> tuple[list[Job], bool]:
    """Return a page of the caller's jobs, newest first, and whether more follow."""
    page = aliased(Job, name="page")
    query = select(page.id).where(page.owner_key_id == caller.key_id)
    if after:
        # Ids are time-ordered, so the cursor is the last id seen: a keyset, not an offset.
        query = query.where(page.id < after)
    if status:
        query = query.where(page.status == status)
    if kind:
        query = query.where(page.kind == kind)
    # The page's ids alone come from the (owner, [status,] id) index: an exact range. Asked for
    # whole rows, PostgreSQL may instead walk every job by id and skip other keys' — quick only
    # while this key's jobs are spread evenly over time.
    ids = query.order_by(page.id.desc()).limit(limit + 1)
    rows = list(session.scalars(select(Job).where(Job.id.in_(ids)).order_by(Job.id.desc())))
    return rows[:limit], len(rows) > limit


def _queue_position():
    """Return a column: jobs ahead of a queued job in its queue, up to QUEUE_POSITION_CAP."""
    ahead = aliased(Job, name="ahead")
    # The index on (queue, status, id) walks just the queued jobs ahead, and LIMIT stops the
    # walk: a poll reads at most QUEUE_POSITION_CAP index entries however deep the queue.
    jobs_ahead = (
        select(ahead.id)
        .where(ahead.queue == Job.queue, ahead.status == JobStatus.QUEUED, ahead.id < Job.id)
        .limit(QUEUE_POSITION_CAP)
        .correlate(Job)
        .subquery()
    )
    count = select(func.count()).select_from(jobs_ahead).scalar_subquery()
    return case((Job.status == JobStatus.QUEUED, count)).label("queue_position")


# Built once: constructing these per request costs more than running them. Columns, not
# entities: a poll builds its answer from one row without the ORM's identity map.
_JOB_COLUMNS = (
    Job.id, Job.owner_key_id, Job.kind, Job.status, Job.model, Job.queue, Job.created_at, Job.started_at,
    Job.finished_at, Job.attempts, Job.result, Job.error, Job.progress, Job.adapter_id,
    Job.metadata_.label("metadata_"),
)
_USAGE_COLUMNS = (UsageRecord.prompt_tokens, UsageRecord.completion_tokens, UsageRecord.train_tokens,
                  UsageRecord.gpu_seconds)
# A poll's row: the job and its usage, by primary key (its queue position comes from `QueuePositions`).
_POLL_JOB = (
    select(*_JOB_COLUMNS, UsageRecord.id.label("usage_id"), *_USAGE_COLUMNS)
    .outerjoin(UsageRecord, UsageRecord.job_id == Job.id)
    .where(Job.id == bindparam("job_id"))
)
# The same for up to POLL_GROUP jobs at once, for grouped polls: a fixed list of ids (unused ones
# NULL), not an array. With an array of unknown length PostgreSQL keeps planning each execution
# anew (a generic plan's estimate looks worse), which on a table of a million jobs cost more
# than the reads it saved.
POLL_GROUP = 16
_POLL_JOBS = (
    select(*_JOB_COLUMNS, UsageRecord.id.label("usage_id"), *_USAGE_COLUMNS)
    .outerjoin(UsageRecord, UsageRecord.job_id == Job.id)
    .where(Job.id.in_([bindparam(f"job_id_{index}", type_=Job.id.type) for index in range(POLL_GROUP)]))
)
# The same with the exact queue position counted.
_DESCRIBE_JOB = _POLL_JOB.add_columns(_queue_position())
_USAGE_OF_JOBS = select(UsageRecord).where(UsageRecord.job_id.in_(bindparam("job_ids", expanding=True)))
_FIRST_QUEUED = (
    select(Job.id)
    .where(
        Job.queue == bindparam("position_queue"),
        Job.status == JobStatus.QUEUED,
        Job.id < bindparam("position_before"),
    )
    .order_by(Job.id)
    .limit(QUEUE_POSITION_CAP)
)
# The queued jobs before `position_before` in `position_queue` (as `_queue_position`).
_COUNT_AHEAD = select(func.count()).select_from(_FIRST_QUEUED.subquery()).scalar_subquery()


# The columns a submit sets; the others start NULL (or at their server default).
_SUBMIT_COLUMNS = (
    "id", "owner_key_id", "kind", "model", "queue", "adapter_id", "status", "params", "metadata", "created_at",
    "attempts", "enqueued_at", "expires_at", "idempotency_key", "request_hash", "reserved_tokens",
    "rate_window_start",
)


def _insert_json_rows():
    """Return an INSERT of any number of job rows (PostgreSQL) given as one JSON array (parameter
    `rows`, see `_rows_json`), answering `_COUNT_AHEAD`.

    Its text is the same whatever the row count, so psycopg keeps it parsed and PostgreSQL keeps
    it prepared (a multi-row VALUES list would be new text, parsed and planned anew, per size);
    and one JSON string costs the gateway far less to send than a parameter per column and row.
    """
    dialect = postgresql.dialect()
    fields = ", ".join(f"{name} {Job.__table__.c[name].type.compile(dialect=dialect)}" for name in _SUBMIT_COLUMNS)
    rows = text(f"SELECT * FROM json_to_recordset(CAST(:rows AS JSON)) AS submitted({fields})").columns(
        *(Job.__table__.c[name] for name in _SUBMIT_COLUMNS)
    )
    return insert(Job.__table__).from_select(_SUBMIT_COLUMNS, rows).returning(_COUNT_AHEAD)


_INSERT_JSON_ROWS = _insert_json_rows()


def _rows_json(jobs: list[NewGeneration]) -> str:
    """Return the jobs' rows as the JSON array `_INSERT_JSON_ROWS` reads (timestamps naive UTC, as stored)."""
    return json.dumps([job.row for job in jobs], default=_naive_utc_iso)


def _naive_utc_iso(value: Any) -> str:
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).replace(tzinfo=None).isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


@functools.lru_cache(maxsize=64)
def _insert_rows(count: int):
    """Return an INSERT of `count` job rows (parameters `r<i>_<column>`) answering `_COUNT_AHEAD`:
    for SQLite, which has no arrays.

    Built once per row count and run by `Database.first`, which compiles it once (SQLAlchemy
    finds no cache key for a multi-row INSERT and would compile it at every execution).
    """
    rows = [{name: bindparam(f"r{index}_{name}", type_=Job.__table__.c[name].type) for name in _SUBMIT_COLUMNS}
            for index in range(count)]
    return insert(Job.__table__).values(rows).returning(_COUNT_AHEAD)


def describe_jobs(session: Session, jobs: list[Job], live: LiveQueues | None = None) -> list[JobOut]:
    """Build the public view of job rows (a page, a cancelled job): one query for their usage, one per queue.

    With `live`, a queued job whose queue no live worker consumes says so in `waiting_for`.
    """
    ids = [job.id for job in jobs]
    records = session.scalars(_USAGE_OF_JOBS, {"job_ids": ids}) if ids else []
    usage_by_job = {record.job_id: _usage(record) for record in records}
    positions = _queue_positions(session, jobs)
    consumers = _consumers(session, jobs, live)
    return [_to_response(job, usage_by_job.get(job.id), positions.get(job.id), consumers) for job in jobs]


def _queue_positions(session: Session, jobs: list[Job]) -> dict[str, int]:
    """Return the positions of the queued jobs among `jobs`, with one query per queue.

    A page of twenty queued jobs would otherwise walk up to twenty times QUEUE_POSITION_CAP
    index entries. The first QUEUE_POSITION_CAP queued jobs of a queue (before the newest of
    ours) hold every job whose position is exact: its index there is its position; a job not
    among them has at least that many ahead.
    """
    waiting: dict[str, list[str]] = defaultdict(list)
    for job in jobs:
        if job.status == JobStatus.QUEUED:
            waiting[job.queue].append(job.id)
    positions = {}
    for queue, ids in waiting.items():
        # Ids are ASCII and time-ordered: max() here and `<` in SQL agree on the newest.
        first = session.scalars(_FIRST_QUEUED, {"position_queue": queue, "position_before": max(ids)}).all()
        index = {job_id: position for position, job_id in enumerate(first)}
        positions.update((job_id, index.get(job_id, len(first))) for job_id in ids)
    return positions


def describe_job(
    session: Session | Connection, caller: Caller, job_id: str, live: LiveQueues | None = None
) -> JobOut:
    """Return the public view of one of the caller's jobs (404 if it is not theirs), in one query."""
    row = session.execute(_DESCRIBE_JOB, {"job_id": job_id}).first() if "\x00" not in job_id else None
    job = _owned(row, caller, job_id)
    return _described(job, _consumers(session, [job], live))


def poll_job(
    db: Database,
    caller: Caller,
    job_id: str,
    live: LiveQueues | None = None,
    positions: QueuePositions | None = None,
    reads: GroupedCalls | None = None,
) -> JobOut:
    """`describe_job` for a poll, the gateway's most frequent request: its one query runs
    prebuilt on a pooled connection, without a session or a transaction.

    With `positions`, a queued job's position is looked up there (up to a second old) instead
    of counted. With `reads` (`read_polled_rows` grouped), concurrent polls share one query.
    """
    if "\x00" in job_id:
        row = None
    elif reads is not None and positions is not None:
        row = reads.run(job_id)
    else:
        row = db.first(_DESCRIBE_JOB if positions is None else _POLL_JOB, {"job_id": job_id})
    job = _owned(row, caller, job_id)
    queued = job.status == JobStatus.QUEUED
    consumers = live.current(db) if live is not None and queued else None
    if positions is None:
        return _described(job, consumers)
    position = positions.position(db, job.queue, job.id) if queued else None
    return _described(job, consumers, position)


def read_polled_rows(db: Database, job_ids: list[str]) -> list:
    """Return the poll rows (`_POLL_JOB`'s columns) of jobs, in `job_ids`' order (None: no such job),
    in one query per POLL_GROUP distinct ids."""
    distinct = list(dict.fromkeys(job_ids))
    rows = {}
    for start in range(0, len(distinct), POLL_GROUP):
        chunk = distinct[start : start + POLL_GROUP]
        params = {f"job_id_{index}": chunk[index] if index < len(chunk) else None for index in range(POLL_GROUP)}
        rows.update((row.id, row) for row in db.all(_POLL_JOBS, params))
    return [rows.get(job_id) for job_id in job_ids]


def _described(row, consumers: dict[str, int] | None, position: int | None = None) -> JobOut:
    """Build the public view from a `_DESCRIBE_JOB` row (or a `_POLL_JOB` row and its position)."""
    usage = _usage(row) if row.usage_id is not None else None
    return _to_response(row, usage, getattr(row, "queue_position", position), consumers)


def describe_new_job(job: NewGeneration, position: int | None, consumers: dict[str, int] | None) -> JobOut:
    """Return the public view of a generation just recorded: queued, no usage."""
    row = job.row
    # Built from values the request's validation produced: validating them again is a submit's
    # largest pydantic cost.
    return JobOut.model_construct(
        id=row["id"], kind=row["kind"], status=row["status"], model=row["model"], created_at=row["created_at"],
        attempts=row["attempts"], queue_position=position, adapter_id=row["adapter_id"],
        waiting_for=waiting_for(job, consumers) if consumers is not None else None, metadata=row["metadata"],
    )


def describe_recorded(job: Job) -> JobOut:
    """Return the public view of a job entity just committed, without reading it back."""
    return _to_response(job, None, None, None)


def _consumers(session: Session | Connection, jobs: list, live: LiveQueues | None) -> dict[str, int] | None:
    """Return live consumers per queue when some job waits in a queue (and `live` is given)."""
    if live is None or not any(job.status == JobStatus.QUEUED for job in jobs):
        return None
    return live.get(session)


def _usage(record) -> dict:
    """Return the usage fields of a usage record or of a described job's row."""
    return {column.key: getattr(record, column.key) for column in _USAGE_COLUMNS}


def _to_response(job, usage: dict | None, position: int | None, consumers: dict[str, int] | None) -> JobOut:
    """Build the public view of a job row or entity (the same attribute names)."""
    return JobOut(
        id=job.id,
        kind=job.kind,
        status=job.status,
        model=job.model,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        attempts=job.attempts,
        queue_position=position,
        result=job.result,
        error=job.error,
        progress=job.progress,
        usage=usage,
        adapter_id=shown_adapter_id(job.kind, job.status, job.adapter_id),
        waiting_for=waiting_for(job, consumers) if consumers is not None else None,
        metadata=job.metadata_,
    )


def shown_adapter_id(kind: str, status: str, adapter_id: str | None) -> str | None:
    """A generation shows the adapter it runs with; a fine-tune its adapter once it exists (on
    success): before, the id names nothing a generation could use, and may never."""
    if kind == JobKind.FINE_TUNE and status != JobStatus.SUCCEEDED:
        return None
    return adapter_id


def list_events(
    session: Session, caller: Caller, job_id: str, *, after: int = 0, limit: int = 100
) -> tuple[list[JobEvent], bool]:
    """Return a page of one of the caller's job's events, oldest first, and whether more follow."""
    job = get_job(session, caller, job_id)
    rows = list(
        session.scalars(
            select(JobEvent)
            .where(JobEvent.job_id == job.id, JobEvent.id > after)
            .order_by(JobEvent.id)
            .limit(limit + 1)
        )
    )
    return rows[:limit], len(rows) > limit
