"""Storing finished generations behind the tasks that ran them, many jobs to a commit."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import structlog
from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError

from shared import job_store
from shared.job_store import Claim
from shared.jobs import JobStatus
from shared.notify import queue_job_end
from workers.job_runs import fail_attempt, retry_while_unreachable, settle_unfinished
from workers.token_publisher import execute_each, write_tokens

log = structlog.get_logger(__name__)

FINISHED, NOT_HELD, UNSTORED = "finished", "not_held", "result_not_stored"


@dataclass
class FinishedJob:
    """A generation that ended on its own, with what its row and stream must get."""

    held: Claim
    stream_tail: list[tuple]  # the rest of its token stream: `write_tokens` arguments after the job id
    result: dict[str, Any]
    usage: dict[str, Any]
    log_fields: dict[str, Any]


class ResultWriter:
    """Writes finished jobs in groups: the rest of their streams in one Redis round trip, their
    results and usage in one transaction (one durable commit, one round trip), then their ends
    announced (with the next group's texts, when one is waiting). `workers.result_process` runs
    it in the worker's result writer process.

    A task hands its job over and returns, so Celery acknowledges the message and takes the next
    one while the result is written. The database, not the message, is what keeps the job safe
    meanwhile: its row stays `running` for this attempt until the result is stored, and if the
    worker dies first the reaper requeues it when the lease runs out (a result is stored at most
    once: the write is conditional on this attempt still holding the job). The lease is no
    longer renewed once a job is handed over: a result that waited here past `lease_s` (a
    database stalled that long) may find its job requeued by a reaper meanwhile, and is then
    discarded for the new attempt's.
    """

    def __init__(self, rt):
        self.rt = rt  # what it needs of a worker runtime: db, redis, worker_id

    def write(self, group: list[FinishedJob], stored_before: list[FinishedJob]) -> list[FinishedJob]:
        """Write a group: its streams' texts, then its results (one commit). Returns the jobs
        stored, to announce with the next group's texts (or alone, if none is waiting).

        The announcement of the group before goes in the same Redis round trip as this group's
        texts: under load, two round trips a group instead of three.
        """
        self._stream(group, stored_before)
        if not group:
            return []
        outcomes = self._store(group)
        for job, outcome in zip(group, outcomes):
            with structlog.contextvars.bound_contextvars(job_id=job.held.job_id):
                if outcome == NOT_HELD:  # cancelled meanwhile (charged what it used), or taken over
                    outcome = settle_unfinished(self.rt, job.held, None, job.usage)
                log.info(f"job_{outcome or 'result_discarded'}", **job.log_fields)
        return [job for job, outcome in zip(group, outcomes) if outcome == FINISHED]

    def _stream(self, group: list[FinishedJob], stored_before: list[FinishedJob]) -> None:
        """Announce the jobs stored before and send this group's stream tails, in one round trip.

        Texts go before the commit: a reader who sees a job ended finds all its text. A failed
        write stops nothing: waiters fall back to reading the rows, and a stream is a convenience.
        """
        pipe = self.rt.redis.pipeline(transaction=False)
        for job in stored_before:
            queue_job_end(pipe, job.held.job_id, JobStatus.SUCCEEDED)
        counts = [len(pipe.command_stack)]  # the announcements', then each job's writes
        for job in group:
            counts.append(sum(write_tokens(pipe, job.held.job_id, *args) for args in job.stream_tail))
        if not sum(counts):
            return
        announced, *streamed = execute_each(pipe, counts)
        if announced is not None:
            log.warning("announce_failed", error=str(announced))
        for job, error in zip(group, streamed):
            if error is not None:
                log.warning("token_stream_unavailable", job_id=job.held.job_id, error=str(error))

    def _store(self, group: list[FinishedJob]) -> list[str]:
        """Store the group's results in one transaction; if that fails, each one alone (a lost
        connection is not lost twice, and a result the database refuses fails only its job).
        Returns each job's outcome."""
        rows = [(job.held, job.result, job.usage) for job in group]
        try:
            stored = job_store.finish_each(self.rt.db, rows, self.rt.worker_id)
            return [FINISHED if done else NOT_HELD for done in stored]
        except SQLAlchemyError as exc:
            log.warning("result_group_failed", jobs=len(group), error=str(exc))
        # While the database is away, the group's results are tried again for up to half a lease
        # in all (nothing renews a handed-over job's lease): a brief outage cost each a new attempt.
        give_up_at = time.monotonic() + self.rt.settings.lease_s / 2
        return [self._store_alone(job, give_up_at) for job in group]

    def _store_alone(self, job: FinishedJob, give_up_at: float) -> str:
        """Store one result, trying again until `give_up_at` while the database cannot be reached."""
        with structlog.contextvars.bound_contextvars(job_id=job.held.job_id):
            try:
                done = retry_while_unreachable(
                    lambda: job_store.finish_alone(self.rt.db, job.held, self.rt.worker_id, result=job.result,
                                                   usage=job.usage),
                    give_up_at, "result_store_retrying")
                return FINISHED if done else NOT_HELD
            except (OperationalError, InterfaceError) as exc:
                # Still away: the job's lease runs out and the reaper gives it another attempt.
                log.error("result_not_stored", error=str(exc))
                return UNSTORED
            except SQLAlchemyError as exc:
                return self._refused(job, exc)

    def _refused(self, job: FinishedJob, error: Exception) -> str:
        """Fail a job whose result the database refused (it would refuse it again)."""
        log.error("result_refused", error=str(error))
        try:
            fail_attempt(self.rt, job.held, "internal_error", f"the result could not be stored: {error}", job.usage)
        except SQLAlchemyError as exc:
            log.error("failure_not_stored", error=str(exc))  # left to the lease, as above
            return UNSTORED
        return "failed"
