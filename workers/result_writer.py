"""Storing finished generations behind the tasks that ran them, many jobs to a commit."""

from __future__ import annotations

import contextvars
import threading
from dataclasses import dataclass
from typing import Any

import structlog
from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError

from shared import job_store
from shared.job_store import Claim
from shared.jobs import JobStatus
from workers.job_runs import fail_attempt, queue_announcement, settle_unfinished
from workers.token_publisher import StepWrites, TokenPublisher

log = structlog.get_logger(__name__)

# Results waiting at most: a task that would go past this waits, so a database that has stopped
# answering stops the worker taking jobs (a killed worker's waiting results are run again).
MAX_WAITING = 64
FINISHED, NOT_HELD, UNSTORED = "finished", "not_held", "result_not_stored"
# While a task is still running, wait this long for more results (up to LINGER_UNTIL of them)
# before writing: woken for each job, the writer took the GIL from the task thread at every
# hand-over and wrote groups of one or two (CPU per no-op job 1.6 ms with the wait, 2.0-2.1
# without). A finished job's end is announced at most this much later; an idle worker's at once.
LINGER_S = 0.002
LINGER_UNTIL = 8


@dataclass
class FinishedJob:
    """A generation that ended on its own, with what its row and stream must get."""

    held: Claim
    publisher: TokenPublisher
    result: dict[str, Any]  # its text and token_ids are also the stream's last
    usage: dict[str, Any]
    log_fields: dict[str, Any]


class ResultWriter:
    """One thread per worker writes finished jobs in groups: the rest of their streams in one
    Redis round trip, their results and usage in one transaction (one durable commit, one round
    trip), then their ends announced (with the next group's texts, when one is waiting).

    A task hands its job over and returns, so Celery acknowledges the message and takes the next
    one while the result is written. The database, not the message, is what keeps the job safe
    meanwhile: its row stays `running` under this worker's lease until the result is stored, and
    if the worker dies first the reaper requeues it when the lease runs out (a result is stored
    at most once: the write is conditional on this attempt still holding the job).
    """

    def __init__(self, rt):
        self.rt = rt
        self._waiting: list[FinishedJob] = []
        self._writing = 0
        self._changed = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    def put(self, job: FinishedJob) -> None:
        """Queue a finished job for writing (waits while MAX_WAITING are queued)."""
        with self._changed:
            while len(self._waiting) >= MAX_WAITING and not self._closed:
                self._changed.wait()
            if self._closed:
                raise RuntimeError("the result writer is closed")
            self._waiting.append(job)
            if self._thread is None:
                # With this thread's log context (the worker's id), as task threads have it.
                context = contextvars.copy_context()
                self._thread = threading.Thread(target=context.run, args=(self._run,), name="result-writer",
                                                daemon=True)
                self._thread.start()
            self._changed.notify_all()

    def close(self, timeout_s: float = 30.0) -> bool:
        """Write what is queued, then stop; return whether all of it was written in time."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
            drained = self._changed.wait_for(lambda: not self._waiting and not self._writing, timeout_s)
        return drained

    def _run(self) -> None:
        stored: list[FinishedJob] = []  # committed, not yet announced
        while True:
            with self._changed:
                if not stored:
                    self._changed.wait_for(lambda: self._waiting or self._closed)
                    if not self._waiting:
                        return
                if len(self._waiting) < LINGER_UNTIL and self._more_coming():
                    self._changed.wait_for(lambda: len(self._waiting) >= LINGER_UNTIL or self._closed, LINGER_S)
                group, self._waiting = self._waiting, []
                self._writing = len(group) + len(stored)
                self._changed.notify_all()  # room for tasks waiting to put
            try:
                stored = self.write(group, stored)
            except Exception:  # noqa: BLE001 - the thread must live on; the leases recover the jobs
                log.exception("result_write_crashed", jobs=[job.held.job_id for job in group])
                stored = []
            finally:
                with self._changed:
                    self._writing = len(stored)
                    self._changed.notify_all()

    def _more_coming(self) -> bool:
        """Whether a task is running that may hand over a result soon."""
        return self.rt.jobs_in_flight > 0

    def write(self, group: list[FinishedJob], stored_before: list[FinishedJob]) -> list[FinishedJob]:
        """Write a group: its streams' texts, then its results (one commit). Returns the jobs
        stored, to announce with the next group's texts (or alone, if none is waiting).

        The announcement of the group before goes in the same Redis round trip as this group's
        texts: under load, two round trips a group instead of three.
        """
        writes = StepWrites(self.rt.redis)
        for job in group:
            job.publisher.finish(job.result["text"], job.result["token_ids"], writes)
        pipe = self.rt.redis.pipeline(transaction=False)
        for job in stored_before:
            queue_announcement(pipe, job.held.job_id, JobStatus.SUCCEEDED)
        # Texts before the commit: a reader who sees a job ended finds all its text.
        announced = writes.flush(pipe)
        error = next((result for result in announced if isinstance(result, Exception)), None)
        if error is not None:
            # Waiters fall back to reading the rows; the results are already committed.
            log.warning("announce_failed", error=str(error))
        if not group:
            return []
        outcomes = self._store(group)
        for job, outcome in zip(group, outcomes):
            with structlog.contextvars.bound_contextvars(job_id=job.held.job_id):
                if outcome == NOT_HELD:  # cancelled meanwhile (charged what it used), or taken over
                    outcome = settle_unfinished(self.rt, job.held, None, job.usage)
                log.info(f"job_{outcome or 'result_discarded'}", **job.log_fields)
        return [job for job, outcome in zip(group, outcomes) if outcome == FINISHED]

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
        return [self._store_alone(job) for job in group]

    def _store_alone(self, job: FinishedJob) -> str:
        with structlog.contextvars.bound_contextvars(job_id=job.held.job_id):
            try:
                done = job_store.finish_alone(self.rt.db, job.held, self.rt.worker_id, result=job.result,
                                              usage=job.usage)
            except (OperationalError, InterfaceError) as exc:
                # The database is away: the job's lease runs out and the reaper gives it another attempt.
                log.error("result_not_stored", error=str(exc))
                return UNSTORED
            except SQLAlchemyError as exc:
                return self._refused(job, exc)
        return FINISHED if done else NOT_HELD

    def _refused(self, job: FinishedJob, error: Exception) -> str:
        """Fail a job whose result the database refused (it would refuse it again)."""
        log.error("result_refused", error=str(error))
        try:
            fail_attempt(self.rt, job.held, "internal_error", f"the result could not be stored: {error}")
        except SQLAlchemyError as exc:
            log.error("failure_not_stored", error=str(exc))  # left to the lease, as above
            return UNSTORED
        return "failed"
