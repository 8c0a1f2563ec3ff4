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
    """Counts this process's held requests, in all and by API key; a request past either cap is not held."""

    def __init__(self, cap: int, per_key: int):
        self.cap = cap
        self.per_key = per_key
        self.held = 0
        self._by_key: dict[str, int] = {}
        self._lock = threading.Lock()

    def try_hold(self, kind: str, key_id: str) -> bool:
        """Take a place for a `kind` of held request (stream, wait) of a key if one is free to it;
        the caller releases it once the request ends."""
        return self._take(key_id) is None or self._refused(kind)

    def release(self, key_id: str) -> None:
        with self._lock:
            self.held -= 1
            left = self._by_key.pop(key_id) - 1
            if left:
                self._by_key[key_id] = left

    def hold_stream(self, key_id: str) -> None:
        """Take a place for an event stream, or refuse it with a 503 that says what to do instead."""
        full = self._take(key_id)
        if full is None:
            return
        self._refused("stream")
        if full == "key":
            message = (f"this API key already holds {self.per_key} open event streams and waits on this gateway "
                       f"process, its share of them; close one, retry after {RETRY_AFTER_S} s, or poll "
                       "GET /v1/jobs/{id} or its events as JSON meanwhile")
        else:
            message = (f"this gateway process already holds its limit of {self.cap} open event streams and waits; "
                       f"retry after {RETRY_AFTER_S} s, or poll GET /v1/jobs/{{id}} or its events as JSON meanwhile")
        error = ServiceBusy(message, details={"held_requests": self.cap, "held_requests_per_key": self.per_key})
        error.headers["Retry-After"] = str(RETRY_AFTER_S)
        raise error

    def _take(self, key_id: str) -> str | None:
        """Take a place for the key; None if taken, else which cap is full ("process" or "key")."""
        with self._lock:
            if self.held >= self.cap:
                return "process"
            if self._by_key.get(key_id, 0) >= self.per_key:
                return "key"
            self.held += 1
            self._by_key[key_id] = self._by_key.get(key_id, 0) + 1
        return None

    @staticmethod
    def _refused(kind: str) -> bool:
        HELD_REFUSED.labels(kind).inc()
        return False
