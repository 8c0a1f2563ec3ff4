"""Request ids: the client's X-Request-ID if it sent a sensible one, else one made here."""

from __future__ import annotations

import itertools
import secrets

MAX_LENGTH = 100


class RequestIds:
    """Makes ids unique like a UUID, without a system call per request: a random prefix per
    process and a counter."""

    def __init__(self):
        self._prefix = secrets.token_hex(8)
        self._counter = itertools.count()

    def for_request(self, incoming: str) -> str:
        """Return the id of a request whose X-Request-ID header is `incoming` ("" if none)."""
        if 0 < len(incoming) <= MAX_LENGTH:
            return incoming
        return f"{self._prefix}{next(self._counter):016x}"
