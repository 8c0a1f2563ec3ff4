"""Conditional state changes of job rows: whoever loses a race changes nothing.

Every write by a worker is fenced by (worker_id, attempts): a worker whose lease was taken
over — reaped, cancelled, or claimed again after expiry — can no longer touch the job.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.jobs import JobStatus
from shared.models import Job, JobEvent, RateLimitWindow, UsageRecord, utcnow


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


def add_event(session: Session, job_id: str, event_type: str, data: dict[str, Any]) -> None:
    """Append an event to a job's history."""
    session.add(JobEvent(job_id=job_id, type=event_type, data=data))


def claim(
    session: Session,
    job_id: str,
    worker_id: str,
    *,
    device: str,
    lease_s: float,
    max_attempts: int,
) -> Claim | None:
    """Move a job to running for this worker: if queued (and not past its TTL), or if its
    lease lapsed with attempts left. None when someone else has it or it is over."""
    now = utcnow()
    claimable = or_(
        and_(Job.status == JobStatus.QUEUED, or_(Job.expires_at.is_(None), Job.expires_at > now)),
        and_(
            Job.status == JobStatus.RUNNING,
            Job.lease_expires_at < now,
            Job.attempts < max_attempts,
        ),
    )
    claimed = session.execute(
        update(Job)
        .where(Job.id == job_id, claimable)
        .values(
            status=JobStatus.RUNNING,
            started_at=now,
            attempts=Job.attempts + 1,
            worker_id=worker_id,
            worker_device=device,
            heartbeat_at=now,
            lease_expires_at=now + timedelta(seconds=lease_s),
            # ttl_s bounds the wait before a job first runs; a retry must not expire.
            expires_at=None,
        )
        .execution_options(synchronize_session=False)
    ).rowcount
    if not claimed:
        return None
    job = session.get(Job, job_id, populate_existing=True)
    add_event(
        session,
        job_id,
        "status",
        {"status": JobStatus.RUNNING, "worker_id": worker_id, "attempt": job.attempts},
    )
    return Claim(
        job_id=job.id,
        attempt=job.attempts,
        kind=job.kind,
        model=job.model,
        queue=job.queue,
        owner_key_id=job.owner_key_id,
        params=dict(job.params),
        adapter_id=job.adapter_id,
        created_at=job.created_at,
    )


def _held_by(held: Claim, worker_id: str):
    return (
        Job.id == held.job_id,
        Job.status == JobStatus.RUNNING,
        Job.worker_id == worker_id,
        Job.attempts == held.attempt,
    )


def renew_lease(session: Session, held: Claim, worker_id: str, lease_s: float) -> str | None:
    """Extend the lease; return None while it is held, else the job's status now."""
    now = utcnow()
    renewed = session.execute(
        update(Job)
        .where(*_held_by(held, worker_id))
        .values(heartbeat_at=now, lease_expires_at=now + timedelta(seconds=lease_s))
        .execution_options(synchronize_session=False)
    ).rowcount
    if renewed:
        return None
    return session.scalar(select(Job.status).where(Job.id == held.job_id))


def record_progress(
    session: Session, held: Claim, worker_id: str, progress: dict[str, Any], event: dict[str, Any] | None = None
) -> bool:
    """Store a running job's progress (and an event for its history) while this worker holds it."""
    updated = session.execute(
        update(Job)
        .where(*_held_by(held, worker_id))
        .values(progress=progress)
        .execution_options(synchronize_session=False)
    ).rowcount
    if updated and event is not None:
        add_event(session, held.job_id, "progress", event)
    return bool(updated)


def settle_reservation(session: Session, job_id: str, used_tokens: int) -> None:
    """Replace the tokens a job reserved at submit with what it used, once."""
    job = session.execute(
        select(Job.owner_key_id, Job.reserved_tokens, Job.rate_window_start).where(Job.id == job_id)
    ).one()
    if not job.reserved_tokens or job.rate_window_start is None:
        return
    settled = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.reserved_tokens == job.reserved_tokens)
        .values(reserved_tokens=0)
        .execution_options(synchronize_session=False)
    ).rowcount
    if settled:
        session.execute(
            update(RateLimitWindow)
            .where(
                RateLimitWindow.key_id == job.owner_key_id,
                RateLimitWindow.window_start == job.rate_window_start,
            )
            .values(tokens=RateLimitWindow.tokens - job.reserved_tokens + used_tokens)
            .execution_options(synchronize_session=False)
        )


def _used_tokens(usage: dict[str, Any] | None) -> int:
    if not usage:
        return 0
    return usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0) + usage.get("train_tokens", 0)


def _charge(session: Session, held: Claim, status: str, usage: dict[str, Any]) -> bool:
    """Insert the job's one usage row; the unique job_id makes a second charge impossible."""
    try:
        with session.begin_nested():
            session.add(
                UsageRecord(
                    job_id=held.job_id,
                    key_id=held.owner_key_id,
                    model=held.model,
                    status=status,
                    **usage,
                )
            )
    except IntegrityError:
        already_charged = session.scalar(
            select(UsageRecord.id).where(UsageRecord.job_id == held.job_id)
        )
        if already_charged is None:
            raise  # not the duplicate we guard against: a real error
        return False
    return True


def _end(session: Session, held: Claim, worker_id: str, status: str, **values: Any) -> bool:
    ended = session.execute(
        update(Job)
        .where(*_held_by(held, worker_id))
        .values(status=status, finished_at=utcnow(), lease_expires_at=None, **values)
        .execution_options(synchronize_session=False)
    ).rowcount
    if ended:
        data = {"status": status}
        if values.get("error"):
            data["code"] = values["error"]["code"]
        add_event(session, held.job_id, "status", data)
    return bool(ended)


def finish(
    session: Session, held: Claim, worker_id: str, *, result: dict[str, Any], usage: dict[str, Any]
) -> bool:
    """Store the result and its one usage charge, if this worker still holds the job."""
    if not _end(session, held, worker_id, JobStatus.SUCCEEDED, result=result):
        return False
    _charge(session, held, JobStatus.SUCCEEDED, usage)
    settle_reservation(session, held.job_id, _used_tokens(usage))
    return True


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
    if not _end(session, held, worker_id, JobStatus.FAILED, error=error):
        return False
    if usage and (usage.get("completion_tokens") or usage.get("train_tokens")):
        _charge(session, held, JobStatus.FAILED, usage)
    settle_reservation(session, held.job_id, _used_tokens(usage))
    return True


def charge_cancelled(session: Session, held: Claim, worker_id: str, usage: dict[str, Any]) -> bool:
    """Charge what a cancelled attempt produced; only the attempt that ran may charge."""
    job = session.get(Job, held.job_id)
    if not (
        job.status == JobStatus.CANCELLED
        and job.worker_id == worker_id
        and job.attempts == held.attempt
    ):
        return False
    charged = _charge(session, held, JobStatus.CANCELLED, usage)
    if charged:
        settle_reservation(session, held.job_id, _used_tokens(usage))
    return charged


def hand_back(session: Session, held: Claim, worker_id: str) -> bool:
    """Return a running job to the queue (worker shutting down); the caller republishes it."""
    handed = session.execute(
        update(Job)
        .where(*_held_by(held, worker_id))
        .values(
            status=JobStatus.QUEUED,
            worker_id=None,
            worker_device=None,
            heartbeat_at=None,
            lease_expires_at=None,
            enqueued_at=utcnow(),
        )
        .execution_options(synchronize_session=False)
    ).rowcount
    if handed:
        add_event(session, held.job_id, "status", {"status": JobStatus.QUEUED, "reason": "handed_back"})
    return bool(handed)


def cancel(session: Session, job_id: str) -> bool:
    """Cancel a queued or running job; False if it had already ended.

    A queued job used nothing: its reservation is released now. A running job's worker
    stops, charges what it produced and settles then.
    """
    for status in (JobStatus.QUEUED, JobStatus.RUNNING):
        cancelled = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == status)
            .values(status=JobStatus.CANCELLED, finished_at=utcnow(), lease_expires_at=None)
            .execution_options(synchronize_session=False)
        ).rowcount
        if cancelled:
            add_event(session, job_id, "status", {"status": JobStatus.CANCELLED})
            if status == JobStatus.QUEUED:
                settle_reservation(session, job_id, 0)
            return True
    return False


def expire_queued(session: Session, now: datetime, limit: int = 500) -> list[str]:
    """Fail queued jobs past their TTL with `expired`; return their ids."""
    candidates = session.scalars(
        select(Job.id)
        .where(Job.status == JobStatus.QUEUED, Job.expires_at <= now)
        .order_by(Job.id)  # one lock order for every reaper: no deadlocks between them
        .limit(limit)
    ).all()
    expired = []
    for job_id in candidates:
        changed = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.QUEUED, Job.expires_at <= now)
            .values(
                status=JobStatus.FAILED,
                finished_at=now,
                error={"code": "expired", "message": "the job waited in the queue past its ttl_s"},
            )
            .execution_options(synchronize_session=False)
        ).rowcount
        if changed:
            add_event(session, job_id, "status", {"status": JobStatus.FAILED, "code": "expired"})
            settle_reservation(session, job_id, 0)
            expired.append(job_id)
    return expired


def recover_lapsed(
    session: Session, now: datetime, max_attempts: int, limit: int = 500
) -> tuple[list[tuple[str, str]], list[str]]:
    """Requeue running jobs whose lease lapsed (worker lost); fail those out of attempts.

    Returns (requeued (id, queue) pairs to publish after commit, ids failed `worker_lost`).
    """
    lapsed = session.execute(
        select(Job.id, Job.queue, Job.attempts)
        .where(Job.status == JobStatus.RUNNING, Job.lease_expires_at < now)
        .order_by(Job.id)
        .limit(limit)
    ).all()
    requeued, failed = [], []
    for job_id, queue, attempts in lapsed:
        still_lapsed = (
            Job.id == job_id,
            Job.status == JobStatus.RUNNING,
            Job.attempts == attempts,
            Job.lease_expires_at < now,
        )
        if attempts >= max_attempts:
            error = {
                "code": "worker_lost",
                "message": f"the worker running this job was lost {attempts} times; giving up",
            }
            values: dict[str, Any] = {"status": JobStatus.FAILED, "finished_at": now, "error": error}
        else:
            values = {"status": JobStatus.QUEUED, "worker_id": None, "worker_device": None, "enqueued_at": now}
        changed = session.execute(
            update(Job)
            .where(*still_lapsed)
            .values(lease_expires_at=None, heartbeat_at=None, **values)
            .execution_options(synchronize_session=False)
        ).rowcount
        if not changed:
            continue
        if attempts >= max_attempts:
            add_event(session, job_id, "status", {"status": JobStatus.FAILED, "code": "worker_lost"})
            settle_reservation(session, job_id, 0)
            failed.append(job_id)
        else:
            add_event(session, job_id, "status", {"status": JobStatus.QUEUED, "reason": "worker_lost"})
            requeued.append((job_id, queue))
    return requeued, failed


def stale_queued(session: Session, published_before: datetime, limit: int = 1000) -> list[tuple[str, str]]:
    """Return (id, queue) of queued jobs last published before a time."""
    return [
        (job_id, queue)
        for job_id, queue in session.execute(
            select(Job.id, Job.queue)
            .where(
                Job.status == JobStatus.QUEUED,
                or_(Job.enqueued_at.is_(None), Job.enqueued_at < published_before),
            )
            .order_by(Job.id)
            .limit(limit)
        ).all()
    ]


def mark_published(session: Session, job_ids: list[str], now: datetime) -> None:
    """Record that messages for these jobs were (re)published now."""
    if job_ids:
        session.execute(
            update(Job)
            .where(Job.id.in_(job_ids), Job.status == JobStatus.QUEUED)
            .values(enqueued_at=now)
            .execution_options(synchronize_session=False)
        )
