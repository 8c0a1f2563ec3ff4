"""Per-key limits: requests and tokens per minute, and concurrent jobs — exact under concurrency.

Admission runs in the submit's own transaction with the key's row locked (`SELECT … FOR
UPDATE` on PostgreSQL; SQLite's `BEGIN IMMEDIATE` write lock), so concurrent submits of one
key are decided one at a time against committed state. Windows are fixed UTC minutes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from services.domain.keys import Caller
from shared.errors import InvalidField, TooManyRequests
from shared.job_store import open_window, window_start_of
from shared.jobs import JobStatus
from shared.models import ApiKey, Job, RateLimitWindow, utcnow
from shared.settings import Settings

WINDOW_S = 60
# Windows older than this are deleted when a key opens a new one.
KEEP_WINDOWS_S = 3600


class RateLimited(TooManyRequests):
    """A request over one of its key's limits (429, with the limit headers)."""


@dataclass(frozen=True)
class Policy:
    """One limit, what is left of it, and when it resets (IETF RateLimit headers draft)."""

    name: str
    quota: int
    remaining: int
    window_s: int | None  # None: not a time window (concurrent jobs)
    reset_s: int


@dataclass(frozen=True)
class Admission:
    """The key's limits as they stand after a request was admitted (or refused)."""

    policies: tuple[Policy, ...]
    window_start: datetime | None  # None: the key has no limits, nothing was counted

    def headers(self, retry_after_s: int | None = None) -> dict[str, str]:
        """Return `RateLimit-Policy` and `RateLimit` (and `Retry-After` when refused)."""
        if not self.policies:
            return {}
        policy = ", ".join(
            f'"{p.name}";q={p.quota}' + (f";w={p.window_s}" if p.window_s else "") for p in self.policies
        )
        state = ", ".join(f'"{p.name}";r={max(p.remaining, 0)};t={p.reset_s}' for p in self.policies)
        headers = {"RateLimit-Policy": policy, "RateLimit": state}
        if retry_after_s is not None:
            headers["Retry-After"] = str(retry_after_s)
        return headers


def applies(caller: Caller, settings: Settings) -> bool:
    """Return whether the key has limits to enforce (its own or the server's defaults)."""
    defaults = (settings.default_rpm, settings.default_tpm, settings.default_max_concurrent)
    return caller.has_limits or defaults != (None, None, None)


@dataclass(frozen=True)
class KeyLimits:
    """A key's limits: its own, else the server's defaults (None: not limited)."""

    rpm: int | None
    tpm: int | None
    max_concurrent: int | None

    @classmethod
    def of(cls, key: ApiKey, settings: Settings) -> KeyLimits:
        return cls(key.rpm or settings.default_rpm, key.tpm or settings.default_tpm,
                   key.max_concurrent or settings.default_max_concurrent)

    def admission(self, window: RateLimitWindow | None, active: int, window_start: datetime, reset_s: int) -> Admission:
        """Return the limits as they stand with this minute's `window` and `active` jobs."""
        requests, tokens = (window.requests, window.tokens) if window is not None else (0, 0)
        policies = []
        if self.rpm is not None:
            policies.append(Policy("requests", self.rpm, self.rpm - requests, WINDOW_S, reset_s))
        if self.tpm is not None:
            policies.append(Policy("tokens", self.tpm, self.tpm - tokens, WINDOW_S, reset_s))
        if self.max_concurrent is not None:
            policies.append(Policy("concurrent", self.max_concurrent, self.max_concurrent - active, None, 1))
        return Admission(tuple(policies), window_start)

    def over_a_minute(self, tokens: int, at_least: bool = False) -> InvalidField | None:
        """Return the 422 for a request of `tokens` (`at_least`: a lower bound) that alone is over
        the key's tokens per minute, which no retry helps; None if it is not."""
        if self.tpm is None or tokens <= self.tpm:
            return None
        return InvalidField(
            f"this request reserves {'at least ' if at_least else ''}{tokens} tokens (prompt estimate + "
            f"max_new_tokens), more than this key's {self.tpm} tokens per minute: lower max_new_tokens",
            details=[{"field": "max_new_tokens", "message": "over the key's tokens per minute"}],
        )

    def refusal(self, window: RateLimitWindow | None, active: int, tokens: int, window_start: datetime,
                reset_s: int, at_least: bool = False) -> RateLimited | None:
        """Return the 429 for one more request of `tokens` (`at_least`: a lower bound), or None if it fits."""
        requests, counted = (window.requests, window.tokens) if window is not None else (0, 0)
        if self.max_concurrent is not None and active >= self.max_concurrent:
            limit, retry_after_s = f"{self.max_concurrent} concurrent jobs (queued + running)", 1
        elif self.rpm is not None and requests >= self.rpm:
            limit, retry_after_s = f"{self.rpm} requests per minute", reset_s
        elif self.tpm is not None and counted + tokens > self.tpm:
            limit = (f"{self.tpm} tokens per minute ({counted} reserved or used this minute, "
                     f"this request needs {'at least ' if at_least else ''}{tokens})")
            retry_after_s = reset_s
        else:
            return None
        error = RateLimited(f"rate limited: this key allows {limit}; retry in {retry_after_s} s")
        error.headers = self.admission(window, active, window_start, reset_s).headers(retry_after_s)
        return error


def admit(session: Session, caller: Caller, settings: Settings, tokens: int, now: datetime) -> Admission:
    """Count one request of `tokens` against the key's limits, or raise RateLimited.

    Without limits (`applies` is False) it neither reads nor writes: a submit's only write is
    then its job row.
    """
    if not applies(caller, settings):
        # Nothing to enforce: skip the key's row lock, which would make each submit of the key
        # wait for the one before it to commit. No window is counted, so none is settled.
        return Admission((), None)
    key_id = caller.key_id
    # Admissions of a key take turns on its row. FOR NO KEY UPDATE (key_share) on PostgreSQL: it
    # does not wait for, nor block, the foreign-key checks of rows that name the key (a worker's
    # usage row): a worker holding the minute's window row and checking the key, while a submit
    # held the key and waited for the window, was a deadlock.
    key = session.scalars(select(ApiKey).where(ApiKey.id == key_id).with_for_update(key_share=True)).one()
    # The minute it is admitted in, not the one it was planned in: a submit that waited for the
    # lock across a minute's end counted in the minute before, beyond that minute's allowance.
    now = max(now, utcnow())
    key_limits = KeyLimits.of(key, settings)
    window_start, reset_s = _minute_of(now)
    too_many = key_limits.over_a_minute(tokens)
    if too_many is not None:
        raise too_many
    # Locked as well: workers settle reservations into this row (tokens = tokens + used - reserved)
    # without the key's lock, and an unlocked read here would write back a count that lost theirs.
    window = session.get(RateLimitWindow, (key_id, window_start), populate_existing=True, with_for_update=True)
    if window is None:
        session.execute(
            delete(RateLimitWindow).where(
                RateLimitWindow.key_id == key_id,
                RateLimitWindow.window_start < now - timedelta(seconds=KEEP_WINDOWS_S),
            )
        )
        open_window(session, key_id, window_start)
        window = session.get(RateLimitWindow, (key_id, window_start), populate_existing=True, with_for_update=True)
    active = _active_jobs(session, key_id) if key_limits.max_concurrent is not None else 0
    refused = key_limits.refusal(window, active, tokens, window_start, reset_s)
    if refused is not None:
        raise refused
    window.requests += 1
    window.tokens += tokens
    session.flush()
    return key_limits.admission(window, active + 1, window_start, reset_s)


def refuse_early(session: Session, caller: Caller, settings: Settings, tokens_at_least: int) -> None:
    """Raise RateLimited (or the 422 of a request over a whole minute's tokens) now for a
    request its key's limits refuse whatever its prompt's count: read without locks, before the
    gateway counts the prompt's tokens (so a prompt over the context is a 422 only once the key's
    limits admit a request again).

    Counting a long prompt costs the gateway up to ~0.1 s of CPU, which a key over its limits
    could otherwise make it spend on every request it sends only to be refused. `admit`
    decides for real afterwards; this only turns away what it would surely refuse.
    """
    if not applies(caller, settings):
        return
    key = session.get(ApiKey, caller.key_id)
    if key is None:
        return  # deleted meanwhile: admission answers it
    key_limits = KeyLimits.of(key, settings)
    # First, as admission: a request over the whole minute's tokens is a 422 (no retry helps).
    too_many = key_limits.over_a_minute(tokens_at_least, at_least=True)
    if too_many is not None:
        raise too_many
    window_start, reset_s = _minute_of(utcnow())
    window = session.get(RateLimitWindow, (caller.key_id, window_start))
    active = _active_jobs(session, caller.key_id) if key_limits.max_concurrent is not None else 0
    refused = key_limits.refusal(window, active, tokens_at_least, window_start, reset_s, at_least=True)
    if refused is not None:
        raise refused


def _minute_of(now: datetime) -> tuple[datetime, int]:
    """Return the start of `now`'s window and the seconds until it resets."""
    window_start = window_start_of(now)
    return window_start, max(1, math.ceil((window_start + timedelta(seconds=WINDOW_S) - now).total_seconds()))


def _active_jobs(session: Session, key_id: str) -> int:
    """Return how many of the key's jobs are queued or running."""
    return session.scalar(
        select(func.count())
        .select_from(Job)
        .where(Job.owner_key_id == key_id, Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]))
    )
