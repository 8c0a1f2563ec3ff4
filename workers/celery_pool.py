"""Celery's threads pool, with what a batching worker needs of a cold shutdown."""

from __future__ import annotations

from typing import Any

from celery.concurrency.thread import ApplyResult, TaskPool
from celery.worker import state

from workers.runtime import runtime

# The pool as Celery's `worker_pool` setting names it.
HAND_BACK_THREADS = "workers.celery_pool:HandBackThreadsPool"


class HandBackThreadsPool(TaskPool):
    """Celery's threads pool, whose running jobs a cold shutdown (a second Ctrl-C, SIGQUIT) hands back.

    A thread cannot be killed. Celery's cold shutdown tried (the threads pool raised from
    `terminate_job` and from its results' missing `terminate`: an "Unrecoverable error"), then
    stopped the pool, which waits for every running task: the jobs ran on to their ends, or to
    the end of the grace. Here nothing is killed; stopping the pool in a cold shutdown ends the
    worker's grace first, so each job stops at its next step and is handed back. A `revoke
    --terminate` leaves the job running (cancel it through the API to stop it).
    """

    def on_stop(self) -> None:
        if state.should_terminate:  # set by the cold shutdown before it stops the pool
            runtime().start_shutdown(0)
        super().on_stop()

    def terminate_job(self, pid, signal=None) -> None:
        """Kill nothing: see the class."""

    def on_apply(self, *args: Any, **kwargs: Any) -> ApplyResult:
        return _Unkillable(super().on_apply(*args, **kwargs).f)


class _Unkillable(ApplyResult):
    """A task's result, whose `terminate` (which Celery calls when it cancels a task) does nothing."""

    def terminate(self, signal=None) -> None:
        """Kill nothing: see HandBackThreadsPool."""
