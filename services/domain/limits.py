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
    rpm = key.rpm or settings.default_rpm
    tpm = key.tpm or settings.default_tpm
    max_concurrent = key.max_concurrent or settings.default_max_concurrent
    window_start = window_start_of(now)
    reset_s = max(1, math.ceil((window_start + timedelta(seconds=WINDOW_S) - now).total_seconds()))
    if tpm is not None and tokens > tpm:
        raise InvalidField(
            f"this request reserves {tokens} tokens (prompt estimate + max_new_tokens), more than "
            f"this key's {tpm} tokens per minute: lower max_new_tokens",
            details=[{"field": "max_new_tokens", "message": "over the key's tokens per minute"}],
        )
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
    active = (
        session.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.owner_key_id == key_id, Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]))
        )
        if max_concurrent is not None
        else 0
    )

    def state(active_now: int) -> Admission:
        policies = []
        if rpm is not None:
            policies.append(Policy("requests", rpm, rpm - window.requests, WINDOW_S, reset_s))
        if tpm is not None:
            policies.append(Policy("tokens", tpm, tpm - window.tokens, WINDOW_S, reset_s))
        if max_concurrent is not None:
            policies.append(Policy("concurrent", max_concurrent, max_concurrent - active_now, None, 1))
        return Admission(tuple(policies), window_start)

    refusal = None
    if max_concurrent is not None and active >= max_concurrent:
        refusal = (f"{max_concurrent} concurrent jobs (queued + running)", 1)
    elif rpm is not None and window.requests >= rpm:
        refusal = (f"{rpm} requests per minute", reset_s)
    elif tpm is not None and window.tokens + tokens > tpm:
        refusal = (
            f"{tpm} tokens per minute ({window.tokens} reserved or used this minute, "
            f"this request needs {tokens})",
            reset_s,
        )
    if refusal is not None:
        limit, retry_after_s = refusal
        error = RateLimited(f"rate limited: this key allows {limit}; retry in {retry_after_s} s")
        error.headers = state(active).headers(retry_after_s)
        raise error
    window.requests += 1
    window.tokens += tokens
    session.flush()
    return state(active + 1)
