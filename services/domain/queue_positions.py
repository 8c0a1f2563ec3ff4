"""Queue positions for polls: each queue's head read at most once a second per process."""

from __future__ import annotations

import time
from bisect import bisect_left

from sqlalchemy import bindparam, select

from shared.db import Database
from shared.jobs import QUEUE_POSITION_CAP, JobStatus
from shared.models import Job

# The first QUEUE_POSITION_CAP queued jobs of a queue, oldest first (the (queue, status, id) index).
_QUEUE_HEAD = (
    select(Job.id)
    .where(Job.queue == bindparam("queue"), Job.status == JobStatus.QUEUED)
    .order_by(Job.id)
    .limit(QUEUE_POSITION_CAP)
)


class QueuePositions:
    """Positions in each queue as of at most `max_age_s` ago, from the ids at the queue's head.

    Counted per poll, a queued job's position walks up to QUEUE_POSITION_CAP index entries,
    and in a deep queue that was most of a poll's cost. Here a queue's head (its first
    QUEUE_POSITION_CAP queued ids) is read once per interval, however many of its jobs are
    polled, and a position is a bisect in it. Like `waiting_for`, it may be a second old: a
    job claimed since still counts, one submitted since is not counted yet.
    """

    MAX_QUEUES = 1024

    def __init__(self, max_age_s: float = 1.0):
        self.max_age_s = max_age_s
        self._heads: dict[str, tuple[float, list[str]]] = {}

    def position(self, db: Database, queue: str, job_id: str) -> int:
        """Return how many queued jobs are ahead of a queued job, up to QUEUE_POSITION_CAP."""
        ids = self._head(db, queue)
        ahead = bisect_left(ids, job_id)  # ids are time-ordered ASCII: str order is queue order
        # Beyond a full head, all we know is that at least the cap is ahead.
        return QUEUE_POSITION_CAP if len(ids) == QUEUE_POSITION_CAP and ahead == len(ids) else ahead

    def _head(self, db: Database, queue: str) -> list[str]:
        read = self._heads.get(queue)
        if read is not None and time.monotonic() - read[0] <= self.max_age_s:
            return read[1]
        with db.read_connection() as connection:
            ids = list(connection.scalars(_QUEUE_HEAD, {"queue": queue}))
        if len(self._heads) >= self.MAX_QUEUES:
            self._heads = {}  # queues come from the model registry: this only bounds a leak
        self._heads[queue] = (time.monotonic(), ids)  # one tuple, swapped whole: safe across threads
        return ids
