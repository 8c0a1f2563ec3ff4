"""A cap on the requests one gateway process holds open (event streams, `Prefer: wait`).

Each held request keeps one of the process's threads for up to minutes; uncapped, a few clients'
streams could take every thread, and polls, submits and health checks would wait behind them.
"""

from __future__ import annotations

import threading

from services.gateway.metrics import HELD_REFUSED
from shared.errors import ServiceBusy

# What a refused stream tells the client to wait before trying again, in seconds.
RETRY_AFTER_S = 2


class HeldRequests:
    """Counts this process's held requests; a request past the cap is not held."""

    def __init__(self, cap: int):
        self.cap = cap
        self.held = 0
        self._lock = threading.Lock()

    def try_hold(self, kind: str) -> bool:
        """Take a place for a `kind` of held request (stream, wait) if one is free; the caller
        releases it once the request ends."""
        with self._lock:
            free = self.held < self.cap
            self.held += free
        if not free:
            HELD_REFUSED.labels(kind).inc()
        return free

    def release(self) -> None:
        with self._lock:
            self.held -= 1

    def hold_stream(self) -> None:
        """Take a place for an event stream, or refuse it with a 503 that says what to do instead."""
        if not self.try_hold("stream"):
            error = ServiceBusy(
                f"this gateway process already holds its limit of {self.cap} open event streams and waits; "
                f"retry after {RETRY_AFTER_S} s, or poll GET /v1/jobs/{{id}} or its events as JSON meanwhile",
                details={"held_requests": self.cap},
            )
            error.headers["Retry-After"] = str(RETRY_AFTER_S)
            raise error
