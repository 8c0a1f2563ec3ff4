"""Celery's threads pool, with what a batching worker needs of a cold shutdown."""

from __future__ import annotations

from celery.concurrency.thread import TaskPool

from workers.runtime import runtime

# The pool as Celery's `worker_pool` setting names it.
HAND_BACK_THREADS = "workers.celery_pool:HandBackThreadsPool"


class HandBackThreadsPool(TaskPool):
    """Celery's threads pool, whose running jobs a cold shutdown (a second Ctrl-C, SIGQUIT) hands back.

    The threads pool cannot kill a task: Celery's cold shutdown raised NotImplementedError from
    `terminate_job` (an "Unrecoverable error"), and its tasks ran on to their ends, or until the
    result writer was closed under them. Here the worker's grace ends at once instead: each
    running job stops at its next step and is handed back.
    """

    def terminate_job(self, pid, signal=None) -> None:
        runtime().start_shutdown(0)
