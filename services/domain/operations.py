"""What an operator looks at: workers, queues and recent failures."""

from __future__ import annotations

import time
from datetime import datetime, timedelta

import structlog
from sqlalchemy import Connection, func, or_, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from shared.db import Database
from shared.jobs import JobStatus
from shared.models import Job, WorkerRecord, utcnow
from shared.schemas import QueueInfo, WorkerInfo

log = structlog.get_logger(__name__)

# Dead or stopped workers stay listed this long, so an operator sees what just went away.
KEEP_GONE_WORKERS = timedelta(hours=1)


def is_alive(row: WorkerRecord, now: datetime, dead_after_s: float) -> bool:
    """Return whether a worker is up: not stopped, and heard from recently."""
    return row.state != "stopped" and row.heartbeat_at >= now - timedelta(seconds=dead_after_s)


def list_workers(session: Session, now: datetime, dead_after_s: float) -> list[WorkerInfo]:
    """Return live workers first, then recently gone ones, each newest first."""
    rows = session.scalars(
        select(WorkerRecord)
        .where(WorkerRecord.heartbeat_at >= now - KEEP_GONE_WORKERS)
        .order_by(WorkerRecord.started_at.desc())
    ).all()
    workers = [
        WorkerInfo.model_validate({**_columns(row), "alive": is_alive(row, now, dead_after_s)}) for row in rows
    ]
    return sorted(workers, key=lambda worker: not worker.alive)


def live_queues(session: Session | Connection, now: datetime, dead_after_s: float) -> dict[str, int]:
    """Return how many live workers consume each queue: `ready` ones only.

    A `starting` worker's queues are those it means to serve (it may fail to load their models,
    or never reach Redis), and a `draining` one takes no new jobs.
    """
    # The column, not the entity: a poll may read this on a Core connection.
    queue_lists = session.scalars(
        select(WorkerRecord.queues).where(
            WorkerRecord.state == "ready", WorkerRecord.heartbeat_at >= now - timedelta(seconds=dead_after_s)
        )
    ).all()
    counts: dict[str, int] = {}
    for queues in queue_lists:
        for queue in set(queues):  # a worker counts once per queue, however often its list names it
            counts[queue] = counts.get(queue, 0) + 1
    return counts


class LiveQueues:
    """`live_queues` as of at most `max_age_s` ago, read once per process per interval.

    Every poll of a queued job needs it for `waiting_for`; workers only report every few
    seconds and are declared dead after `dead_after_s`, so a second's staleness changes nothing.
    """

    def __init__(self, dead_after_s: float, max_age_s: float = 1.0):
        self.dead_after_s = dead_after_s
        self.max_age_s = max_age_s
        self._read: tuple[float, dict[str, int]] | None = None

    def get(self, session: Session | Connection) -> dict[str, int]:
        """Return how many live workers consume each queue."""
        counts = self._fresh()
        if counts is None:
            counts = live_queues(session, utcnow(), self.dead_after_s)
            self._read = (time.monotonic(), counts)  # one tuple, swapped whole: safe across threads
        return counts

    def current(self, db: Database) -> dict[str, int]:
        """Return `get`'s counts, opening a connection only when they must be read anew."""
        counts = self._fresh()
        if counts is None:
            with db.read_connection() as connection:
                counts = self.get(connection)
        return counts

    def after_commit(self, db: Database) -> dict[str, int] | None:
        """`current`, or None if it cannot be read: a submit that committed answers 202 without
        `waiting_for`, not a 500 whose retry would record the job twice."""
        try:
            return self.current(db)
        except SQLAlchemyError as exc:
            log.warning("live_queues_unreadable", error=str(exc))
            return None

    def _fresh(self) -> dict[str, int] | None:
        read = self._read
        if read is None or time.monotonic() - read[0] > self.max_age_s:
            return None
        return read[1]


def queue_stats(session: Session, now: datetime, dead_after_s: float) -> list[QueueInfo]:
    """Return depth, running count and oldest waiting job of every queue in use."""
    rows = session.execute(
        select(
            Job.queue,
            func.count().filter(Job.status == JobStatus.QUEUED),
            func.count().filter(Job.status == JobStatus.RUNNING),
            func.min(Job.created_at).filter(Job.status == JobStatus.QUEUED),
            # Ids are time-ordered: the least is the job that has waited longest.
            func.min(Job.id).filter(Job.status == JobStatus.QUEUED),
        )
        .where(or_(Job.status == JobStatus.QUEUED, Job.status == JobStatus.RUNNING))
        .group_by(Job.queue)
    ).all()
    consumers = live_queues(session, now, dead_after_s)
    stats = {queue: (queued, running, oldest, oldest_id) for queue, queued, running, oldest, oldest_id in rows}
    for queue in consumers:
        stats.setdefault(queue, (0, 0, None, None))
    result = []
    for queue, (queued, running, oldest, oldest_id) in sorted(stats.items()):
        kind, model = queue.split(".", 1)
        if oldest is not None and oldest.tzinfo is None:
            oldest = oldest.replace(tzinfo=now.tzinfo)  # an aggregate skips the column's type
        result.append(
            QueueInfo(
                name=queue,
                kind=kind,
                model=model,
                queued=queued,
                running=running,
                oldest_job_id=oldest_id,
                oldest_queued_at=oldest,
                oldest_wait_s=round((now - oldest).total_seconds(), 1) if oldest else None,
                live_workers=consumers.get(queue, 0),
            )
        )
    return result


def waiting_for(job: Job, consumers: dict[str, int]) -> str | None:
    """Say what a queued job waits for when no live worker consumes its queue."""
    if job.status != JobStatus.QUEUED or consumers.get(job.queue):
        return None
    kind, model = job.queue.split(".", 1)
    role = "finetune" if kind == "fine_tune" else "generate"
    return (
        f"no live worker serves {kind} jobs for {model}; it runs once one starts "
        f"(gemma-jobs worker --models {model} --role {role}|all)"
    )


def recent_failures(session: Session, limit: int = 10) -> list[Job]:
    """Return the latest failed jobs."""
    return list(
        session.scalars(
            select(Job).where(Job.status == JobStatus.FAILED).order_by(Job.finished_at.desc()).limit(limit)
        )
    )


def _columns(row: WorkerRecord) -> dict:
    return {column.key: getattr(row, column.key) for column in WorkerRecord.__table__.columns}
