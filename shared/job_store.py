"""Conditional state changes of job rows: a second delivery loses the race and does nothing."""

from __future__ import annotations

from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from shared.jobs import JobStatus
from shared.models import Job, JobEvent, UsageRecord, utcnow


def add_event(session: Session, job_id: str, event_type: str, data: dict[str, Any]) -> None:
    """Append an event to a job's history."""
    session.add(JobEvent(job_id=job_id, type=event_type, data=data))


def claim(session: Session, job_id: str, worker_id: str) -> bool:
    """Move a queued job to running for this worker; False when someone else has it."""
    now = utcnow()
    claimed = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.QUEUED)
        .values(
            status=JobStatus.RUNNING,
            started_at=now,
            attempts=Job.attempts + 1,
            worker_id=worker_id,
        )
    ).rowcount
    if claimed:
        add_event(session, job_id, "status", {"status": JobStatus.RUNNING, "worker_id": worker_id})
    return bool(claimed)


def finish(
    session: Session,
    job: Job,
    worker_id: str,
    *,
    result: dict[str, Any],
    usage: dict[str, Any],
) -> bool:
    """Store a result and its one usage charge, if this worker still holds the job."""
    stored = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status == JobStatus.RUNNING, Job.worker_id == worker_id)
        .values(status=JobStatus.SUCCEEDED, result=result, finished_at=utcnow())
    ).rowcount
    if not stored:
        return False
    session.add(
        UsageRecord(
            job_id=job.id,
            key_id=job.owner_key_id,
            model=job.model,
            status=JobStatus.SUCCEEDED,
            **usage,
        )
    )
    add_event(session, job.id, "status", {"status": JobStatus.SUCCEEDED})
    return True


def fail(session: Session, job_id: str, worker_id: str, *, code: str, message: str) -> bool:
    """Record why a job failed, if this worker still holds it."""
    stored = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.RUNNING, Job.worker_id == worker_id)
        .values(
            status=JobStatus.FAILED,
            error={"code": code, "message": message},
            finished_at=utcnow(),
        )
    ).rowcount
    if stored:
        add_event(session, job_id, "status", {"status": JobStatus.FAILED, "code": code})
    return bool(stored)
