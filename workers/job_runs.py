"""What every job run does around its work: claim the row, and announce the outcome."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, TypeVar

import structlog
from sqlalchemy.exc import InterfaceError, OperationalError

from shared import job_store
from shared.celery_app import model_of_queue
from shared.job_store import Claim
from shared.jobs import JobStatus
from shared.models import utcnow
from shared.notify import announce_job_end
from shared.publish import publish_job
from workers.job_guard import StopReason
from workers.metrics import QUEUE_WAIT

if TYPE_CHECKING:  # the result writer process runs these without torch
    from workers.runtime import WorkerRuntime

log = structlog.get_logger(__name__)

# Pauses between tries of a write while the database is away: doubling from the first to the longest.
RETRY_FIRST_PAUSE_S = 0.1
RETRY_LONGEST_PAUSE_S = 2.0
Result = TypeVar("Result")


def retry_while_unreachable(write: Callable[[], Result], give_up_at: float, event: str) -> Result:
    """Run a database write, again after doubling pauses while the database cannot be reached
    (logged as `event`), until `give_up_at` (monotonic); then its last error is raised."""
    pause_s = RETRY_FIRST_PAUSE_S
    while True:
        try:
            return write()
        except (OperationalError, InterfaceError) as exc:
            if time.monotonic() + pause_s > give_up_at:
                raise
            log.warning(event, error=str(exc), pause_s=pause_s)
            time.sleep(pause_s)
            pause_s = min(pause_s * 2, RETRY_LONGEST_PAUSE_S)


def claim_job(rt: WorkerRuntime, job_id: str) -> Claim | None:
    """Claim a job for this worker; None (and a log line) when a redelivery finds it taken."""
    held = job_store.claim(
        rt.db, job_id, rt.worker_id, device=str(rt.device), lease_s=rt.settings.lease_s,
        max_attempts=rt.settings.max_attempts,
    )
    if held is None:
        # Already taken, finished, cancelled or expired: a redelivery does nothing.
        log.info("job_not_claimed")
    else:
        waited_s = (utcnow() - held.created_at).total_seconds() if held.created_at else 0.0
        QUEUE_WAIT.labels(held.kind, model_of_queue(held.queue)).observe(waited_s)
        log.info("job_started", kind=held.kind, model=held.model, attempt=held.attempt, queue_wait_s=round(waited_s, 3))
    return held


def announce(rt: WorkerRuntime, job_id: str, status: str) -> None:
    """Wake whoever waits on a job that just ended, and close its token stream."""
    if not announce_job_end(rt.redis, job_id, status):
        # Waiters fall back to reading the row; the outcome is already committed.
        log.warning("announce_failed", job_id=job_id)


def fail_attempt(rt: WorkerRuntime, held: Claim, code: str, message: str, usage: dict[str, Any] | None = None) -> None:
    """Record that the job failed (if this worker still holds it), charging what it produced
    (`usage`), and wake its waiters. A job cancelled meanwhile is charged as cancelled instead,
    and its reservation settled: its cancel left both to this attempt."""
    with rt.db.session_scope() as session:
        stored = job_store.fail(session, held, rt.worker_id, code=code, message=message, usage=usage)
    log.warning("job_failed", code=code, message=message)
    if stored:
        announce(rt, held.job_id, JobStatus.FAILED)
    else:
        settle_unfinished(rt, held, None, usage or {})


_OUTCOME_STATUS = {"finished": JobStatus.SUCCEEDED, "timed_out": JobStatus.FAILED, "cancelled": JobStatus.CANCELLED}


def store_attempt(
    rt: WorkerRuntime,
    held: Claim,
    reason: str | None,
    usage: dict[str, Any],
    *,
    timeout_message: str,
    finish: Callable[[], bool],
) -> str | None:
    """Write what one attempt earned, by why it stopped, and tell whoever must know.

    `finish` stores the result in a transaction of its own, if this worker still holds the job.
    Returns the outcome: "finished" (`finish` stored the result), "timed_out", "handed_back"
    (shutdown: republished for another worker), "cancelled" (cancelled meanwhile: charged what
    it used), or None (the lease was taken over: the new holder writes, this attempt writes nothing).
    """
    # The common case, a result, is one transaction (one statement on PostgreSQL) by itself.
    if reason is None and finish():
        announce(rt, held.job_id, _OUTCOME_STATUS["finished"])
        return "finished"
    return settle_unfinished(rt, held, reason, usage, timeout_message=timeout_message)


def settle_unfinished(rt: WorkerRuntime, held: Claim, reason: str | None, usage: dict[str, Any], *,
                      timeout_message: str = "") -> str | None:
    """Write what an attempt whose result was not stored earned (`store_attempt`'s outcomes but
    "finished"), and tell whoever must know (`timeout_message`: the error of a timeout)."""
    outcome = None
    with rt.db.session_scope() as session:
        if reason == StopReason.SHUTDOWN:
            outcome = "handed_back" if job_store.hand_back(session, held, rt.worker_id) else None
        elif reason == StopReason.TIMEOUT:
            stored = job_store.fail(session, held, rt.worker_id, code="timeout", message=timeout_message, usage=usage)
            outcome = "timed_out" if stored else None
        if outcome is None and job_store.charge_cancelled(session, held, rt.worker_id, usage):
            outcome = "cancelled"
    if outcome == "handed_back":
        publish_job(rt.celery, held.job_id, held.queue)
    elif outcome in ("timed_out", "cancelled"):
        announce(rt, held.job_id, _OUTCOME_STATUS[outcome])
    return outcome
