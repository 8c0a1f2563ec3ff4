"""The time every process writes and compares: this host's clock moved onto the database server's.

Leases, queue TTLs, heartbeats and rate-limit minutes are written by one host and compared by
another (a worker's lease by another worker's reaper). A host whose clock ran 40 s behind had
its live leases taken over as lapsed, using up its jobs' attempts. Each process measures how far
its clock is from PostgreSQL's (`measure_offset`) when it checks the schema and again in its
periodic work, and `now()` adds that. SQLite is one host's file: its offset stays zero.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta, timezone

# The database server's clock minus this host's; set by `set_offset` only.
_offset = timedelta(0)
SAMPLES = 3


def now() -> datetime:
    """Return the current time on the database server's clock, timezone-aware in UTC."""
    return datetime.now(timezone.utc) + _offset


def offset() -> timedelta:
    """Return how far the database server's clock is ahead of this host's."""
    return _offset


def set_offset(value: timedelta) -> None:
    """Use `value` as the database clock's lead over this host's from now on."""
    global _offset
    _offset = value


def measure_offset(server_now: Callable[[], datetime]) -> tuple[timedelta, timedelta]:
    """Read the server's clock SAMPLES times; return (its lead over this host's clock, the round trip).

    Each read is taken as made halfway through its round trip; the read with the shortest round
    trip is kept, so the error is at most half of that (a fraction of a millisecond on a LAN).
    """
    best: tuple[timedelta, timedelta] | None = None
    for _ in range(SAMPLES):
        before = datetime.now(timezone.utc)
        server = server_now()
        after = datetime.now(timezone.utc)
        round_trip = after - before
        lead = server - (before + round_trip / 2)
        if best is None or round_trip < best[1]:
            best = (lead, round_trip)
    return best
