"""Public identifiers: time-ordered so that newest-first keyset pagination is an index scan."""

from __future__ import annotations

import os
import secrets
import threading
import time

_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"
_RANDOM_BITS = 80


def _base32(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        value, digit = divmod(value, 32)
        chars.append(_CROCKFORD[digit])
    return "".join(reversed(chars))


class _MonotonicClock:
    """The (milliseconds, random) pairs of one process's ids, each greater than the last.

    Two ids made in the same millisecond (a fast machine makes several) would otherwise order
    by their random bits, and a job list would show them out of creation order. As ULID's
    monotonic variant does, the second one takes the first's random bits plus one.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = (0, 0)

    def next(self) -> tuple[int, int]:
        millis = time.time_ns() // 1_000_000
        with self._lock:
            last_millis, last_random = self._last
            if millis > last_millis:
                self._last = (millis, secrets.randbits(_RANDOM_BITS))
            elif last_random + 1 < 1 << _RANDOM_BITS:  # same millisecond, or the clock stepped back
                self._last = (last_millis, last_random + 1)
            else:
                self._last = (last_millis + 1, secrets.randbits(_RANDOM_BITS))
            return self._last

    def forget(self) -> None:
        """Start afresh (in a forked child: its parent goes on from the same last id)."""
        self._last = (0, 0)
        self._lock = threading.Lock()


_CLOCK = _MonotonicClock()
os.register_at_fork(after_in_child=_CLOCK.forget)


def new_id(prefix: str, separator: str = "_") -> str:
    """Return prefix + separator + a ULID-style id: 48-bit milliseconds then 80 random bits,
    increasing within a process."""
    millis, random = _CLOCK.next()
    return f"{prefix}{separator}{_base32(millis, 10)}{_base32(random, 16)}"
