"""Conditional state changes of job rows: whoever loses a race changes nothing.

Every write by a worker is fenced by (worker_id, attempts): a worker whose lease was taken
over — reaped, cancelled, or claimed again after expiry — can no longer touch the job.

LOCK ORDER. A transaction that changes several shared rows on PostgreSQL locks them in one
order, so that two never wait on each other (a deadlock fails one of them): job rows (by id),
then outcome counter rows (sorted), then rate-limit window rows (by key and window). A worker's
end and a cancel each end one job that way; a reaper step ends many, so each step is a
transaction of its own that settles its windows after its job rows and counters.

Statements are SQLAlchemy Core on the tables, not ORM units of work: a job's claim and its
end run once per job on the worker's hot path, and the ORM's bookkeeping cost more than the
database did (see "queue overhead" in docs/benchmarks.md).
"""

from __future__ import annotations

import functools
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, bindparam, cast, func, insert, literal, or_, select, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from shared.celery_app import model_of_queue
from shared.db import Database
from shared.jobs import JobKind, JobStatus
from shared.models import Job, JobEvent, JobOutcomeCount, RateLimitWindow, UsageRecord, utcnow

JOBS, EVENTS, USAGE, WINDOWS = Job.__table__, JobEvent.__table__, UsageRecord.__table__, RateLimitWindow.__table__
OUTCOMES = JobOutcomeCount.__table__
J, W = JOBS.c, WINDOWS.c
OUTCOME_SHARDS = 16


@dataclass(frozen=True)
class Claim:
    """What a worker holds while it runs one attempt of a job."""

    job_id: str
    attempt: int
    kind: str
    model: str
    queue: str
    owner_key_id: str
    params: dict[str, Any]
    # The adapter a fine-tune creates, or the one a generation runs with.
    adapter_id: str | None = None
    created_at: datetime | None = None
    # The tokens reserved at submit, in which rate window: settled when the attempt ends.
    reserved_tokens: int = 0
    rate_window_start: datetime | None = None


# The hot path's statements are built once: building one per call cost more CPU than running it.
# Parameters are named p_*, as SQLAlchemy keeps column names for the SET clause's own values.
_ADD_EVENT = insert(EVENTS)
_CLAIM = (
    update(JOBS)
    .where(
        J.id == bindparam("p_job_id"),
        or_(
            and_(J.status == JobStatus.QUEUED, or_(J.expires_at.is_(None), J.expires_at > bindparam("p_now"))),
            and_(
                J.status == JobStatus.RUNNING,
                J.lease_expires_at < bindparam("p_now"),
                J.attempts - J.hand_backs < bindparam("p_max_attempts"),
            ),
        ),
    )
    .values(
        status=JobStatus.RUNNING,
        started_at=bindparam("p_now"),
        attempts=J.attempts + 1,
        worker_id=bindparam("p_worker_id"),
        worker_device=bindparam("p_device"),
        heartbeat_at=bindparam("p_now"),
        lease_expires_at=bindparam("p_lease_expires_at"),
        # ttl_s bounds the wait before a job first runs; a retry must not expire.
        expires_at=None,
        # Progress is the attempt's own: a lost attempt's is charged by the reaper (`recover_lapsed`),
        # which charged an earlier attempt's when a retry was lost before its first report.
        progress=None,
    )
    .returning(
        J.id, J.attempts, J.kind, J.model, J.queue, J.owner_key_id, J.params, J.adapter_id, J.created_at,
        J.reserved_tokens, J.rate_window_start, J.worker_id, J.started_at,
    )
)
_CLAIMED = _CLAIM.cte("claimed")
# PostgreSQL: the claim and its status event as one statement (a data-modifying CTE), so a
# claim is one round trip and one commit, not BEGIN, UPDATE, INSERT and COMMIT.
_CLAIM_WITH_EVENT = select(_CLAIMED).add_cte(
    insert(EVENTS)
    .from_select(
        ["job_id", "type", "data", "created_at"],
        select(
            _CLAIMED.c.id,
            literal("status"),
            func.json_build_object(
                literal("status"), literal(JobStatus.RUNNING.value), literal("worker_id"), _CLAIMED.c.worker_id,
                literal("attempt"), _CLAIMED.c.attempts,
            ),
            _CLAIMED.c.started_at,
        ),
    )
    .cte("claim_event")
)
_HELD = and_(
    J.id == bindparam("p_job_id"),
    J.status == JobStatus.RUNNING,
    J.worker_id == bindparam("p_worker_id"),
    J.attempts == bindparam("p_attempt"),
)
# Every attempt a worker runs, in one statement (`p_attempts`: (job id, attempt) pairs).
_RENEW_ALL = (
    update(JOBS)
    .where(
        J.status == JobStatus.RUNNING,
        J.worker_id == bindparam("p_worker_id"),
        tuple_(J.id, J.attempts).in_(bindparam("p_attempts", expanding=True)),
    )
    .values(heartbeat_at=bindparam("p_now"), lease_expires_at=bindparam("p_lease_expires_at"))
    .returning(J.id)
)
_RECORD_PROGRESS = update(JOBS).where(_HELD).values(progress=bindparam("p_progress"))
_HAND_BACK = update(JOBS).where(_HELD).values(
    status=JobStatus.QUEUED, worker_id=None, worker_device=None, heartbeat_at=None, lease_expires_at=None,
    enqueued_at=bindparam("p_now"), hand_backs=J.hand_backs + 1,
)
_END = dict(status=bindparam("p_status"), finished_at=bindparam("p_now"), lease_expires_at=None, reserved_tokens=0)
_FINISH = update(JOBS).where(_HELD).values(**_END, result=bindparam("p_result"))
_FAIL = update(JOBS).where(_HELD).values(**_END, error=bindparam("p_error"))


def add_event(session: Session, job_id: str, event_type: str, data: dict[str, Any]) -> None:
    """Append an event to a job's history."""
    session.execute(_ADD_EVENT, {"job_id": job_id, "type": event_type, "data": data})


def claim(
    db: Database,
    job_id: str,
    worker_id: str,
    *,
    device: str,
    lease_s: float,
    max_attempts: int,
) -> Claim | None:
    """Move a job to running for this worker: if queued (and not past its TTL), or if its
    lease lapsed with attempts left. None when someone else has it or it is over.

    On PostgreSQL the claim is one statement that commits without waiting for the disk: a
    database crash can lose only a claim, which leaves the job queued with its message
    already taken, and then the attempt's writes (fenced on this claim) change nothing and
    the reaper publishes the job again. Its outcome is written durably.
    """
    now = utcnow()
    params = {
        "p_job_id": job_id, "p_now": now, "p_max_attempts": max_attempts, "p_worker_id": worker_id,
        "p_device": device, "p_lease_expires_at": now + timedelta(seconds=lease_s),
    }
    if db.engine.dialect.name == "postgresql":
        row = db.first(_CLAIM_WITH_EVENT, params, durable=False)
    else:
        with db.session_scope() as session:
            row = session.execute(_CLAIM, params).one_or_none()
            if row is not None:
                add_event(session, job_id, "status", {"status": JobStatus.RUNNING, "worker_id": worker_id,
                                                      "attempt": row.attempts})
    if row is None:
        return None
    return Claim(
        job_id=job_id,
        attempt=row.attempts,
        kind=row.kind,
        model=row.model,
        queue=row.queue,
        owner_key_id=row.owner_key_id,
        params=dict(row.params),
        adapter_id=row.adapter_id,
        created_at=row.created_at,
        reserved_tokens=row.reserved_tokens or 0,
        rate_window_start=row.rate_window_start,
    )


def _held(held: Claim, worker_id: str) -> dict[str, Any]:
    """Return the parameters of `_HELD`: this worker's attempt, still running."""
    return {"p_job_id": held.job_id, "p_worker_id": worker_id, "p_attempt": held.attempt, "p_now": utcnow()}


def renew_leases(session: Session, held: list[Claim], worker_id: str, lease_s: float) -> dict[str, str]:
    """Extend the leases of attempts this worker runs, all in one statement.

    Returns the status now of each job whose lease it no longer holds (cancelled, finished by
    a takeover, or running another attempt); the others were renewed.
    """
    if not held:
        return {}
    now = utcnow()
    renewed = set(
        session.scalars(
            _RENEW_ALL,
            {
                "p_worker_id": worker_id,
                "p_attempts": [(claim.job_id, claim.attempt) for claim in held],
                "p_now": now,
                "p_lease_expires_at": now + timedelta(seconds=lease_s),
            },
        )
    )
    lost = [claim.job_id for claim in held if claim.job_id not in renewed]
    if not lost:
        return {}
    return dict(session.execute(select(J.id, J.status).where(J.id.in_(lost))).all())


def record_progress(
    session: Session, held: Claim, worker_id: str, progress: dict[str, Any], event: dict[str, Any] | None = None
) -> bool:
    """Store a running job's progress (and an event for its history) while this worker holds it."""
    updated = session.execute(_RECORD_PROGRESS, {**_held(held, worker_id), "p_progress": progress}).rowcount
    if updated and event is not None:
        add_event(session, held.job_id, "progress", event)
    return bool(updated)


def window_start_of(now: datetime) -> datetime:
    """Return the start of the fixed one-minute rate-limit window that holds a time."""
    return now.replace(second=0, microsecond=0)


def settlement(held_window: datetime | None, reserved: int, used: int, now: datetime) -> tuple[datetime | None, int]:
    """Return which of the key's minute windows a reservation's settlement goes to, and the tokens.

    A refund (used no more than reserved) goes back to the minute it was reserved in. An overage
    goes to the current minute, where the key's next admissions count it: in the minute of its
    submit, mostly over by the job's end, it limited nothing, and a key whose prompts were
    estimated low (digits, CJK, emoji: 3-16x) used several times its tokens per minute every minute.
    None: the job reserved nothing, there is nothing to settle.
    """
    if not reserved or held_window is None:
        return None, 0
    delta = used - reserved
    return (held_window if delta <= 0 else window_start_of(now)), delta


@functools.cache
def _window_upsert(dialect_name: str) -> Any:
    """Return this backend's statement adding tokens to a key's minute window, creating its row."""
    dialect = postgresql if dialect_name == "postgresql" else sqlite
    add = dialect.insert(WINDOWS).values(
        key_id=bindparam("p_key_id"), window_start=bindparam("p_window_start"), requests=0,
        tokens=bindparam("p_tokens"),
    )
    return add.on_conflict_do_update(
        index_elements=[W.key_id, W.window_start], set_={"tokens": W.tokens + add.excluded.tokens})


def _add_to_window(session: Session, key_id: str, window_start: datetime, tokens: int) -> None:
    statement = _window_upsert(session.get_bind().dialect.name)
    session.execute(statement, {"p_key_id": key_id, "p_window_start": window_start, "p_tokens": tokens})


def open_window(session: Session, key_id: str, window_start: datetime) -> None:
    """Create a key's minute window row unless it exists: a worker settling an overage into the
    same minute may create it at the same moment (a plain INSERT would then fail the submit)."""
    _add_to_window(session, key_id, window_start, 0)


def settle_reservation(session: Session, job_id: str, used_tokens: int) -> bool:
    """Replace the tokens a job reserved at submit with what it used, once; return whether this did."""
    return settle_reservations(session, [job_id], used_tokens) == 1


def settle_reservations(session: Session, job_ids: Sequence[str], used_tokens: int = 0) -> int:
    """`settle_reservation` for several jobs that used as much: the job rows first, then the
    rate windows in key order (see LOCK ORDER). Return how many this settled."""
    changes: Counter[tuple[str, datetime]] = Counter()
    count, now = 0, utcnow()
    for job_id in job_ids:
        job = session.execute(
            select(J.owner_key_id, J.reserved_tokens, J.rate_window_start).where(J.id == job_id)
        ).one()
        if not job.reserved_tokens or job.rate_window_start is None:
            continue
        settled = session.execute(
            update(JOBS).where(J.id == job_id, J.reserved_tokens == job.reserved_tokens).values(reserved_tokens=0)
        ).rowcount
        if settled:
            window, tokens = settlement(job.rate_window_start, job.reserved_tokens, used_tokens, now)
            changes[job.owner_key_id, window] += tokens
            count += 1
    for (key_id, window_start), tokens in sorted(changes.items()):
        _add_to_window(session, key_id, window_start, tokens)
    return count


def _used_tokens(usage: dict[str, Any] | None) -> int:
    if not usage:
        return 0
    return usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0) + usage.get("train_tokens", 0)


@functools.cache
def _upserts(dialect_name: str) -> tuple[Any, Any]:
    """Return this backend's (charge, count) statements: INSERT … ON CONFLICT (PostgreSQL, SQLite)."""
    dialect = postgresql if dialect_name == "postgresql" else sqlite
    # No row comes back when the job's charge already existed.
    charge = dialect.insert(USAGE).on_conflict_do_nothing(index_elements=[USAGE.c.job_id]).returning(USAGE.c.id)
    count = dialect.insert(OUTCOMES)
    count = count.on_conflict_do_update(
        index_elements=[OUTCOMES.c.kind, OUTCOMES.c.model, OUTCOMES.c.status, OUTCOMES.c.shard],
        set_={"jobs": OUTCOMES.c.jobs + count.excluded.jobs},
    )
    return charge, count


def count_ended(session: Session, ended: list[tuple[str, str, str, str]]) -> None:
    """Add jobs that this transaction ended, as (job id, kind, queue, status), to the outcome counters."""
    counts = Counter((kind, model_of_queue(queue), status, zlib.crc32(job_id.encode()) % OUTCOME_SHARDS)
                     for job_id, kind, queue, status in ended)
    _, count = _upserts(session.get_bind().dialect.name)
    # Sorted: transactions that end several jobs lock counter rows in one order (no deadlock).
    for (kind, model, status, shard), jobs in sorted(counts.items()):
        session.execute(count, {"kind": kind, "model": model, "status": status, "shard": shard, "jobs": jobs})


def ended_counts(session: Session) -> list[tuple[str, str, str, int]]:
    """Return how many jobs have ended, as (kind, model, status, jobs), summed over shards."""
    c = OUTCOMES.c
    rows = session.execute(
        select(c.kind, c.model, c.status, func.sum(c.jobs)).group_by(c.kind, c.model, c.status)
        .order_by(c.kind, c.model, c.status)
    ).all()
    return [(kind, model, status, int(jobs)) for kind, model, status, jobs in rows]


def _charge(session: Session, held: Claim, status: str, usage: dict[str, Any]) -> bool:
    """Insert the job's one usage row; the unique job_id makes a second charge a no-op."""
    return _charge_job(session, held.job_id, held.owner_key_id, held.model, status, usage)


def _charge_job(session: Session, job_id: str, key_id: str, model: str, status: str, usage: dict[str, Any]) -> bool:
    """`_charge` for a job known by its row's fields (the reaper holds no claim)."""
    charge, _ = _upserts(session.get_bind().dialect.name)
    row = {"job_id": job_id, "key_id": key_id, "model": model, "status": status, **usage}
    return session.scalar(charge, row) is not None


def _end(
    session: Session, held: Claim, worker_id: str, status: str, used_tokens: int,
    result: dict[str, Any] | None = None, error: dict[str, str] | None = None,
) -> bool:
    """End the attempt this worker holds with a result or an error, its event, and settle the reservation."""
    params = {**_held(held, worker_id), "p_status": status}
    if error is None:
        ended = session.execute(_FINISH, {**params, "p_result": result}).rowcount
    else:
        ended = session.execute(_FAIL, {**params, "p_error": error}).rowcount
    if not ended:
        return False
    data = {"status": status}
    if error is not None:
        data["code"] = error["code"]
    add_event(session, held.job_id, "status", data)
    count_ended(session, [(held.job_id, held.kind, held.queue, status)])  # the counter, then the window
    # Only the holder ends a running job, once: the reservation read at claim is still the job's.
    window, tokens = settlement(held.rate_window_start, held.reserved_tokens, used_tokens, utcnow())
    if window is not None:
        _add_to_window(session, held.owner_key_id, window, tokens)
    return True


def finish(
    session: Session, held: Claim, worker_id: str, *, result: dict[str, Any], usage: dict[str, Any]
) -> bool:
    """Store the result and its one usage charge, if this worker still holds the job."""
    if session.get_bind().dialect.name == "postgresql":
        return _finish_in_one_statement(session, held, worker_id, result, usage)
    if not _end(session, held, worker_id, JobStatus.SUCCEEDED, _used_tokens(usage), result=result):
        return False
    _charge(session, held, JobStatus.SUCCEEDED, usage)
    return True


_USAGE_COUNTS = ("prompt_tokens", "completion_tokens", "train_tokens", "gpu_seconds")


@functools.cache
def _finish_statement() -> Any:
    """Return `finish`'s writes on PostgreSQL as one statement: data-modifying CTEs, each reading
    the rows of the held-job UPDATE, so all happen once or none does (one round trip, not five)."""
    ended = _FINISH.returning(J.id, J.finished_at).cte("ended")
    succeeded = literal(JobStatus.SUCCEEDED.value)
    event = insert(EVENTS).from_select(
        ["job_id", "type", "data", "created_at"],
        select(ended.c.id, literal("status"), func.json_build_object(literal("status"), succeeded),
               ended.c.finished_at),
    )
    count = postgresql.insert(OUTCOMES).from_select(
        ["kind", "model", "status", "shard", "jobs"],
        select(
            bindparam("p_kind", type_=OUTCOMES.c.kind.type),
            bindparam("p_counted_model", type_=OUTCOMES.c.model.type),
            succeeded, bindparam("p_shard", type_=OUTCOMES.c.shard.type), literal(1, OUTCOMES.c.jobs.type),
        ).select_from(ended),
    )
    count = count.on_conflict_do_update(
        index_elements=[OUTCOMES.c.kind, OUTCOMES.c.model, OUTCOMES.c.status, OUTCOMES.c.shard],
        set_={"jobs": OUTCOMES.c.jobs + count.excluded.jobs},
    )
    # The window `settlement` chose (its row created if need be); a job without a reservation
    # passes a NULL window, and nothing is written.
    window_start = cast(bindparam("p_window_start"), W.window_start.type)
    window = postgresql.insert(WINDOWS).from_select(
        ["key_id", "window_start", "requests", "tokens"],
        select(bindparam("p_key_id", type_=W.key_id.type), window_start, literal(0, W.requests.type),
               bindparam("p_tokens", type_=W.tokens.type)).select_from(ended).where(window_start.is_not(None)),
    )
    window = window.on_conflict_do_update(
        index_elements=[W.key_id, W.window_start], set_={"tokens": W.tokens + window.excluded.tokens})
    charge = postgresql.insert(USAGE).from_select(
        ["job_id", "key_id", "model", "status", *_USAGE_COUNTS, "created_at"],
        select(
            ended.c.id, bindparam("p_key_id", type_=USAGE.c.key_id.type),
            bindparam("p_model", type_=USAGE.c.model.type), succeeded,
            *(bindparam(f"u_{name}", type_=USAGE.c[name].type) for name in _USAGE_COUNTS),
            ended.c.finished_at,
        ),
    ).on_conflict_do_nothing(index_elements=[USAGE.c.job_id])
    return select(func.count().label("ended")).select_from(ended).add_cte(
        event.cte("end_event"), count.cte("end_count"), window.cte("end_window"), charge.cte("end_charge")
    )


def finish_alone(
    db: Database, held: Claim, worker_id: str, *, result: dict[str, Any], usage: dict[str, Any]
) -> bool:
    """`finish` in a transaction of its own; on PostgreSQL one statement on a pooled
    connection, without a session (it runs once per job on the worker's hot path)."""
    if db.engine.dialect.name != "postgresql":
        with db.session_scope() as session:
            return finish(session, held, worker_id, result=result, usage=usage)
    return bool(db.first(_finish_statement(), _finish_params(held, worker_id, result, usage))[0])


def finish_each(db: Database, finished: Sequence[tuple[Claim, dict[str, Any], dict[str, Any]]], worker_id: str) -> list[bool]:
    """`finish_alone` for several jobs (each a claim, its result and its usage): whether each
    was stored. On PostgreSQL, one transaction in one round trip: one durable commit for all.

    Raises if the transaction fails (nothing stored): the caller may retry each job alone.
    """
    if db.engine.dialect.name != "postgresql":
        return [finish_alone(db, held, worker_id, result=result, usage=usage) for held, result, usage in finished]
    # Shared rows are locked in one order by every writer, so that two groups never wait on each
    # other: the writer's own outcome counter row (`_finish_params`), then the keys' minute
    # windows in key order (groups in any order deadlocked, and fell back to a job at a time).
    now = utcnow()
    unordered = [_finish_params(held, worker_id, result, usage, now) for held, result, usage in finished]
    order = sorted(range(len(finished)), key=lambda index: _window_of(unordered[index]))
    params = [unordered[index] for index in order]
    stored = [False] * len(finished)
    for index, row in zip(order, db.first_each(_finish_statement(), params)):
        stored[index] = bool(row[0])
    return stored


def _window_of(params: dict[str, Any]) -> tuple[str, str]:
    """The rate-limit window row a finish (these `_finish_params`) updates, as a sort key."""
    return params["p_key_id"], params["p_window_start"].isoformat() if params["p_window_start"] else ""


def _finish_in_one_statement(
    session: Session, held: Claim, worker_id: str, result: dict[str, Any], usage: dict[str, Any]
) -> bool:
    """`finish` on PostgreSQL: the same writes as `_end` and `_charge`, in one statement."""
    return bool(session.scalar(_finish_statement(), _finish_params(held, worker_id, result, usage)))


def _finish_params(
    held: Claim, worker_id: str, result: dict[str, Any], usage: dict[str, Any], now: datetime | None = None
) -> dict[str, Any]:
    """Return the parameters of `_finish_statement`."""
    window, tokens = settlement(held.rate_window_start, held.reserved_tokens, _used_tokens(usage), now or utcnow())
    return {
        **_held(held, worker_id), "p_status": JobStatus.SUCCEEDED, "p_result": result,
        # The worker's own counter row: its results are written by one process, one group at a time.
        "p_kind": held.kind, "p_shard": zlib.crc32(worker_id.encode()) % OUTCOME_SHARDS,
        "p_model": held.model, "p_counted_model": model_of_queue(held.queue),  # usage: the adapter's id
        "p_key_id": held.owner_key_id, "p_window_start": window, "p_tokens": tokens,
        **{f"u_{name}": usage.get(name, 0) for name in _USAGE_COUNTS},
    }


def fail(
    session: Session,
    held: Claim,
    worker_id: str,
    *,
    code: str,
    message: str,
    usage: dict[str, Any] | None = None,
) -> bool:
    """Record why a job failed (charging tokens it produced), if this worker still holds it."""
    error = {"code": code, "message": message}
    if not _end(session, held, worker_id, JobStatus.FAILED, _used_tokens(usage), error=error):
        return False
    if _produced(usage):
        _charge(session, held, JobStatus.FAILED, usage)
    return True


def _produced(usage: dict[str, Any] | None) -> bool:
    """Whether an attempt that did not succeed produced tokens, and so is charged."""
    return bool(usage and (usage.get("completion_tokens") or usage.get("train_tokens")))


def charge_cancelled(session: Session, held: Claim, worker_id: str, usage: dict[str, Any]) -> bool:
    """Charge what a cancelled attempt produced and settle its reservation; only the attempt that
    ran may. Return whether this did either (once)."""
    ran_and_cancelled = session.scalar(
        select(J.id).where(
            J.id == held.job_id,
            J.status == JobStatus.CANCELLED,
            J.worker_id == worker_id,
            J.attempts == held.attempt,
        )
    )
    if ran_and_cancelled is None:
        return False
    # As for a failure, only an attempt that produced tokens is charged (a ledger row for nothing
    # counted as a job in usage totals); the reservation is settled either way, once.
    charged = _produced(usage) and _charge(session, held, JobStatus.CANCELLED, usage)
    settled = settle_reservation(session, held.job_id, _used_tokens(usage))
    return bool(charged or settled)


def hand_back(session: Session, held: Claim, worker_id: str) -> bool:
    """Return a running job to the queue (worker shutting down); the caller republishes it."""
    handed = session.execute(_HAND_BACK, _held(held, worker_id)).rowcount
    if handed:
        add_event(session, held.job_id, "status", {"status": JobStatus.QUEUED, "reason": "handed_back"})
    return bool(handed)


def cancel(session: Session, job_id: str) -> bool:
    """Cancel a queued or running job; False if it had already ended.

    A queued job used nothing: its reservation is released now. A running job's worker
    stops, charges what it produced and settles then; its lease stays, so that should the
    worker never do so (it died), the reaper settles the reservation once the lease lapses.
    """
    # Queued, then running, then each once more: on PostgreSQL each UPDATE sees the latest
    # commit, and a running job handed back or requeued between the first two (running ->
    # queued, committed as the second waited on its row) matched neither and was refused.
    for status in (JobStatus.QUEUED, JobStatus.RUNNING) * 2:
        cancelled = session.execute(
            update(JOBS)
            .where(J.id == job_id, J.status == status)
            .values(status=JobStatus.CANCELLED, finished_at=utcnow())
            .returning(J.kind, J.queue)
        ).one_or_none()
        if cancelled is not None:
            add_event(session, job_id, "status", {"status": JobStatus.CANCELLED})
            count_ended(session, [(job_id, cancelled.kind, cancelled.queue, JobStatus.CANCELLED)])
            if status == JobStatus.QUEUED:
                settle_reservation(session, job_id, 0)
            return True
    return False


def settle_abandoned_cancels(session: Session, now: datetime, limit: int = 500) -> list[str]:
    """Settle the reservations of jobs cancelled while running whose lease lapsed: their worker
    never charged them (it died, or its write failed). Return those jobs' ids.

    A worker that charges later still records its usage once; only its settlement finds nothing left.
    """
    lapsed = session.scalars(
        select(J.id).where(J.status == JobStatus.CANCELLED, J.lease_expires_at < now).order_by(J.id).limit(limit)
    ).all()
    cleared = []
    for job_id in lapsed:
        # The lease goes, so the job is looked at once; the reservation is settled once whoever comes first.
        if session.execute(
            update(JOBS)
            .where(J.id == job_id, J.status == JobStatus.CANCELLED, J.lease_expires_at < now)
            .values(lease_expires_at=None)
        ).rowcount:
            cleared.append(job_id)
    settle_reservations(session, cleared)
    return cleared


def expire_queued(session: Session, now: datetime, limit: int = 500) -> list[str]:
    """Fail queued jobs past their TTL with `expired`; return their ids."""
    candidates = session.execute(
        select(J.id, J.kind, J.queue)
        .where(J.status == JobStatus.QUEUED, J.expires_at <= now)
        .order_by(J.id)  # one lock order for every reaper: no deadlocks between them
        .limit(limit)
    ).all()
    expired, ended = [], []
    for job_id, kind, queue in candidates:
        changed = session.execute(
            update(JOBS)
            .where(J.id == job_id, J.status == JobStatus.QUEUED, J.expires_at <= now)
            .values(
                status=JobStatus.FAILED,
                finished_at=now,
                error={"code": "expired", "message": "the job waited in the queue past its ttl_s"},
            )
        ).rowcount
        if changed:
            add_event(session, job_id, "status", {"status": JobStatus.FAILED, "code": "expired"})
            expired.append(job_id)
            ended.append((job_id, kind, queue, JobStatus.FAILED))
    count_ended(session, ended)
    settle_reservations(session, expired)
    return expired


def recover_lapsed(
    session: Session, now: datetime, max_attempts: int, limit: int = 500
) -> tuple[list[tuple[str, str]], list[str]]:
    """Requeue running jobs whose lease lapsed (worker lost); fail those out of attempts.

    Returns (requeued (id, queue) pairs to publish after commit, ids failed `worker_lost`).
    """
    lapsed = session.execute(
        select(J.id, J.queue, J.attempts, J.hand_backs, J.kind, J.owner_key_id, J.model, J.progress, J.started_at,
               J.heartbeat_at)
        .where(J.status == JobStatus.RUNNING, J.lease_expires_at < now)
        .order_by(J.id)
        .limit(limit)
    ).all()
    requeued, failed, ended = [], [], []
    for job_id, queue, attempts, hand_backs, kind, key_id, model, progress, started_at, heartbeat_at in lapsed:
        still_lapsed = (
            J.id == job_id,
            J.status == JobStatus.RUNNING,
            J.attempts == attempts,
            J.lease_expires_at < now,
        )
        lost = attempts - hand_backs  # a worker that shut down handed its attempt back: not lost
        if lost >= max_attempts:
            error = {
                "code": "worker_lost",
                "message": f"the worker running this job was lost {lost} times; giving up",
            }
            values: dict[str, Any] = {"status": JobStatus.FAILED, "finished_at": now, "error": error}
        else:
            values = {"status": JobStatus.QUEUED, "worker_id": None, "worker_device": None, "enqueued_at": now}
        changed = session.execute(
            update(JOBS)
            .where(*still_lapsed)
            .values(lease_expires_at=None, heartbeat_at=None, **values)
        ).rowcount
        if not changed:
            continue
        if lost >= max_attempts:
            add_event(session, job_id, "status", {"status": JobStatus.FAILED, "code": "worker_lost"})
            usage = _trained_before_lost(progress, started_at, heartbeat_at)
            if usage:  # as a fine-tune that fails midway is charged: its worker cannot any more
                _charge_job(session, job_id, key_id, model, JobStatus.FAILED, usage)
            failed.append(job_id)
            ended.append((job_id, kind, queue, JobStatus.FAILED))
        else:
            add_event(session, job_id, "status", {"status": JobStatus.QUEUED, "reason": "worker_lost"})
            requeued.append((job_id, queue))
    count_ended(session, ended)
    settle_reservations(session, failed)
    return requeued, failed


def _trained_before_lost(progress: dict[str, Any] | None, started_at: datetime | None,
                         heartbeat_at: datetime | None) -> dict[str, Any] | None:
    """Return the charge of a fine-tune's last attempt whose worker was lost: the tokens its last
    stored progress counted, over the time from its claim to its worker's last renewal. None if
    it recorded no training (a generation records none)."""
    train_tokens = int(progress.get("train_tokens") or 0) if isinstance(progress, dict) else 0
    if not train_tokens:
        return None
    seconds = (heartbeat_at - started_at).total_seconds() if started_at and heartbeat_at else 0.0
    return {"train_tokens": train_tokens, "gpu_seconds": round(max(seconds, 0.0), 4)}


def fine_tune_adapter_ids(session: Session, job_ids: list[str]) -> list[str]:
    """Return the adapter ids of those of these jobs that are fine-tunes."""
    return list(session.scalars(
        select(J.adapter_id).where(J.id.in_(job_ids), J.kind == JobKind.FINE_TUNE, J.adapter_id.is_not(None))
    ))


def queued_fine_tune_attempts(session: Session, job_ids: list[str]) -> list[tuple[str, int]]:
    """Return (adapter id, attempts so far) of those of these jobs that are fine-tunes still queued:
    none of their attempts runs, so each attempt's folder is partial."""
    return [(adapter_id, attempts) for adapter_id, attempts in session.execute(
        select(J.adapter_id, J.attempts).where(
            J.id.in_(job_ids), J.kind == JobKind.FINE_TUNE, J.status == JobStatus.QUEUED, J.adapter_id.is_not(None))
    ).all()]


def stale_queued(
    session: Session, published_before: datetime, limit: int = 1000, after: str = ""
) -> list[tuple[str, str]]:
    """Return (id, queue) of queued jobs last published before a time, by id, after `after`."""
    return [
        (job_id, queue)
        for job_id, queue in session.execute(
            select(J.id, J.queue)
            .where(
                J.status == JobStatus.QUEUED,
                or_(J.enqueued_at.is_(None), J.enqueued_at < published_before),
                J.id > after,
            )
            .order_by(J.id)
            .limit(limit)
        ).all()
    ]


def mark_published(session: Session, job_ids: list[str], now: datetime) -> None:
    """Record that messages for these jobs were (re)published now."""
    if job_ids:
        session.execute(
            update(JOBS)
            .where(J.id.in_(job_ids), J.status == JobStatus.QUEUED)
            .values(enqueued_at=now)
            )
