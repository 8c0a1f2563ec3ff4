"""Watching one running job from a side thread: lease renewal, cancel, deadline, shutdown."""

from __future__ import annotations

import threading
import time

import structlog
from sqlalchemy.exc import SQLAlchemyError

from shared import job_store
from shared.job_store import Claim
from shared.jobs import JobStatus

log = structlog.get_logger(__name__)


class StopReason:
    """Why a running job was stopped before it finished on its own."""

    CANCELLED = "cancelled"
    TIMEOUT = "timeout"
    LEASE_LOST = "lease_lost"
    SHUTDOWN = "shutdown"


class JobGuard:
    """Renews a job's lease and decides, between tokens, whether generation must stop."""

    def __init__(self, rt, held: Claim, timeout_s: float):
        self.rt = rt
        self.held = held
        self.deadline = time.monotonic() + timeout_s
        self.reason: str | None = None
        self._reason_lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"guard-{held.job_id}", daemon=True)

    def __enter__(self) -> "JobGuard":
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._done.set()
        self._thread.join()

    def should_stop(self) -> bool:
        """Return whether generation must stop now (called between tokens)."""
        if self.reason is None:
            now = time.monotonic()
            if now >= self.deadline:
                self._stop(StopReason.TIMEOUT)
            elif self.rt.shutdown_deadline is not None and now >= self.rt.shutdown_deadline:
                self._stop(StopReason.SHUTDOWN)
        return self.reason is not None

    def _stop(self, reason: str) -> None:
        """Record why generation stops; the first reason wins (two threads may race)."""
        with self._reason_lock:
            if self.reason is None:
                self.reason = reason

    def _watch(self) -> None:
        settings = self.rt.settings
        poll_s = min(settings.control_poll_s, settings.lease_s / 3)
        while not self._done.wait(poll_s):
            try:
                with self.rt.db.session_scope() as session:
                    status = job_store.renew_lease(session, self.held, self.rt.worker_id, settings.lease_s)
            except SQLAlchemyError as exc:
                # Keep generating: the lease has slack for a brief database outage.
                log.warning("lease_renewal_failed", error=str(exc))
                continue
            if status is not None:
                self._stop(StopReason.CANCELLED if status == JobStatus.CANCELLED else StopReason.LEASE_LOST)
                log.info("job_taken_away", status=status, reason=self.reason)
                return
