"""The job state machine: states, kinds and which transitions are allowed."""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    """Where a job is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        """Return whether no further transition can happen."""
        return self in TERMINAL_STATUSES


class JobKind(StrEnum):
    """What a job does."""

    GENERATION = "generation"
    FINE_TUNE = "fine_tune"


TERMINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})

# A queued job's position is exact up to this many jobs ahead; one further back shows this
# number, so reading a position costs the same however deep the queue is.
QUEUE_POSITION_CAP = 1000

ALLOWED_TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELLED, JobStatus.FAILED}),
    # running -> queued is a hand-back (worker lost or shutting down).
    JobStatus.RUNNING: frozenset(
        {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.QUEUED}
    ),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}


def can_transition(source: JobStatus, target: JobStatus) -> bool:
    """Return whether a job may move from one status to another."""
    return target in ALLOWED_TRANSITIONS[source]
