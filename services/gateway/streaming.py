"""A job as Server-Sent Events: its recorded events and live tokens, ending with the job.

Two sources feed one stream: the job's events in the database (`job_events`, the truth) and
its token stream in Redis (`shared.token_stream`, a convenience). Every SSE event carries
`id: <last job_events id>:<last Redis stream entry id>` sent so far; a client that reconnects
with it as `Last-Event-ID` gets exactly what it had not seen of either source.
"""

from __future__ import annotations

import heapq
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import redis
import structlog
from flask import Response
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from werkzeug.datastructures import MIMEAccept

from services.domain import jobs as job_domain
from services.domain.keys import Caller, refusal_of
from services.gateway.context import KEY_CACHE_TTL_S, GatewayContext
from services.gateway.errors import database_unavailable_error
from shared import token_stream
from shared.db import DATABASE_UNAVAILABLE
from shared.errors import InvalidField
from shared.jobs import TERMINAL_STATUSES, JobStatus
from shared.models import ApiKey, JobEvent
from shared.schemas import JobEventInfo

log = structlog.get_logger(__name__)

EVENT_STREAM = "text/event-stream"
# Short blocks keep terminal detection (a database read) within about a second.
BLOCK_MS = 1000
DB_POLL_S = 1.0
# Proxies drop idle connections. Writing is also how a client that went away is found: TCP
# fails the second write after the peer closed, so within two periods.
KEEP_ALIVE_S = 15.0
KEEP_ALIVE = ": keep-alive\n\n"
REDIS_RETRY_S = 5.0
# How often an open stream checks that its key still works: with one wait on Redis after it, a
# revoked or expired key's stream ends within KEY_CACHE_TTL_S, as its requests do in other
# gateway processes.
KEY_CHECK_S = KEY_CACHE_TTL_S - BLOCK_MS / 1000
EVENT_PAGE = 1000
MAX_EVENT_ID = 2**63 - 1
MAX_STREAM_ID_PART = 2**64 - 1
_CURSOR = re.compile(r"^(\d{1,19}):(\d{1,20}(?:-\d{1,20})?)$")


def wants_event_stream(accept: MIMEAccept) -> bool:
    """Return whether the Accept header names text/event-stream itself (`*/*` does not count)."""
    # The media type alone: werkzeug keeps parameters in the value (`text/event-stream; charset=utf-8`).
    return any(value.split(";", 1)[0].strip().lower() == EVENT_STREAM and quality > 0 for value, quality in accept)


@dataclass
class Cursor:
    """How far a client has read each source; its text is the SSE event id."""

    event_id: int = 0
    entry_id: str = "0"
    # The latest attempt this connection has seen begin, or a resumed one had (not part of the id).
    attempt: int = field(default=0, compare=False)

    def __str__(self) -> str:
        return f"{self.event_id}:{self.entry_id}"

    @classmethod
    def parse(cls, value: str | None) -> Cursor:
        """Read a Last-Event-ID header; none means from the start, a malformed one is a 422."""
        if value is None:
            return cls()
        match = _CURSOR.match(value.strip())
        # Redis stream ids are two unsigned 64-bit numbers: a larger one made every read fail,
        # and the stream went on silently without tokens.
        if match is None or int(match.group(1)) > MAX_EVENT_ID or any(
            int(part) > MAX_STREAM_ID_PART for part in match.group(2).split("-")
        ):
            raise InvalidField(
                "Last-Event-ID must be an id this stream sends: <event id>:<stream entry id>",
                details=[{"field": "Last-Event-ID", "message": "not an event id of this stream"}],
            )
        return cls(int(match.group(1)), match.group(2))


class TokenFeed:
    """Reads a job's token stream from Redis; while Redis is away it yields nothing."""

    def __init__(self, client: redis.Redis, job_id: str, after_id: str):
        self.client, self.job_id, self.after_id = client, job_id, after_id
        self.retry_at = 0.0
        self.down = False

    def read(self, block_ms: int | None, last: bool = False) -> list[dict[str, Any]]:
        """Return every entry after the last one read, waiting up to block_ms for a first one
        (`last`: the read before the stream ends, which tries Redis even while backing off)."""
        if not last and time.monotonic() < self.retry_at:
            if block_ms:
                time.sleep(block_ms / 1000)  # keep the caller's pace without Redis to block on
            return []
        entries: list[dict[str, Any]] = []
        try:
            while True:
                page = token_stream.read_entries(self.client, self.job_id, self.after_id, block_ms, EVENT_PAGE)
                entries += page
                if page:
                    self.after_id = page[-1]["id"]
                if len(page) < EVENT_PAGE:
                    break
                block_ms = None  # the rest is already there
        except redis.RedisError as exc:
            # Tokens are a convenience: events and the final job come from the database.
            if not self.down:
                log.warning("token_stream_unavailable", job_id=self.job_id, error=str(exc))
            self.down, self.retry_at = True, time.monotonic() + REDIS_RETRY_S
            return entries
        self.down = False
        return entries


def event_stream(
    context: GatewayContext,
    caller: Caller,
    job_id: str,
    last_event_id: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """Check the job is the caller's (else 404) and take a place among the process's held
    requests (else 503 `ServiceBusy`), then answer 200 with its event stream."""
    cursor = Cursor.parse(last_event_id)
    with context.db.session_scope(read_only=True) as session:
        job_domain.get_job(session, caller, job_id)
        # A resumed stream goes on dropping what attempts before the client's last one write.
        cursor.attempt = attempt_begun(session, job_id, cursor.event_id)
    context.held.hold_stream(caller.key_id)  # last: nothing between it and the response that gives it back
    stream_headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})}
    response = Response(_frames(context, caller, job_id, cursor), mimetype=EVENT_STREAM, headers=stream_headers)
    # The server closes the response however the stream ends, even one never started.
    response.call_on_close(lambda: context.held.release(caller.key_id))
    return response


def _frames(context: GatewayContext, caller: Caller, job_id: str, cursor: Cursor) -> Iterator[str]:
    """Yield SSE frames: what the client missed, then live, then `done` once the row is terminal.

    No database session stays open across a yield or a Redis block, so a client that goes
    away (the server closes this generator at its next write) leaves nothing behind.
    """
    tokens = TokenFeed(context.redis, job_id, cursor.entry_id)
    done = False
    try:
        yield KEEP_ALIVE  # sends the headers now, even if nothing has happened yet
        last_write, last_poll, key_checked = time.monotonic(), None, time.monotonic()
        while True:
            if time.monotonic() - key_checked >= KEY_CHECK_S:
                refusal = _key_refusal(context, caller)
                if refusal is not None:  # no retry: the key will not work again
                    yield _frame("error", {"code": "unauthenticated", "message": f"{refusal}; the stream ends"}, cursor)
                    return
                key_checked = time.monotonic()
            entries = tokens.read(None if last_poll is None else BLOCK_MS)
            # An attempt or end entry follows a database commit (claim, finish): read it now,
            # so that the status event goes out before the tokens that came after it.
            poll_due = last_poll is None or time.monotonic() - last_poll >= DB_POLL_S
            if not poll_due and all(entry["type"] == "token" for entry in entries):
                finished, events = False, []
            else:
                finished, events = _read_job(context, caller, job_id, cursor.event_id)
                last_poll = time.monotonic()
                if finished:
                    # Workers write every token before committing the end: this drain is complete.
                    entries += tokens.read(None, last=True)  # one failed read earlier must not cut its end
            for frame in _merged(events, entries, cursor):
                yield frame
                last_write = time.monotonic()
            if finished:
                yield _frame("done", _job_body(context, caller, job_id), cursor)
                done = True
                return
            if time.monotonic() - last_write >= KEEP_ALIVE_S:
                yield KEEP_ALIVE
                last_write = time.monotonic()
    except DATABASE_UNAVAILABLE as exc:
        # Said, not a dropped connection: the client resumes from this frame's id once it is back.
        error, headers = database_unavailable_error(exc)
        yield _frame("error", error["error"], cursor, retry_ms=int(headers["Retry-After"]) * 1000)
    finally:
        log.info("event_stream_closed", job_id=job_id, done=done)


def _key_refusal(context: GatewayContext, caller: Caller) -> str | None:
    """Return why the stream's key authenticates no more (revoked, expired, deleted), or None."""
    with context.db.session_scope(read_only=True) as session:
        return refusal_of(session.get(ApiKey, caller.key_id))


def _read_job(context: GatewayContext, caller: Caller, job_id: str, after: int) -> tuple[bool, list[Any]]:
    """Return whether the job has ended, and its events after an id, in one short session."""
    with context.db.session_scope(read_only=True) as session:
        # The status is read before the events: an ending seen here has its event seen below.
        finished = JobStatus(job_domain.get_job(session, caller, job_id).status).is_terminal
        events, has_more = [], True
        while has_more:
            rows, has_more = job_domain.list_events(session, caller, job_id, after=after, limit=EVENT_PAGE)
            events += rows
            after = rows[-1].id if rows else after
    return finished, events


def _job_body(context: GatewayContext, caller: Caller, job_id: str) -> dict[str, Any]:
    """Return the job as GET /v1/jobs/{id} shows it."""
    with context.db.session_scope(read_only=True) as session:
        job = job_domain.describe_job(session, caller, job_id, context.live_queues)
    return job.model_dump(mode="json")


def listed_events(
    context: GatewayContext, session: Session, job_id: str, rows: list[JobEvent], after: int, has_more: bool
) -> list[JobEventInfo]:
    """Return a page of the JSON event list: its recorded events and, in time order among them,
    the token stream's entries of the same span.

    A page spans from the time of the `after` event (exclusive) to its last event's (inclusive);
    the last page runs to the stream's end. As in the live stream, tokens are a convenience:
    without Redis, or once the stream has expired, a page holds the recorded events alone.
    """
    # The time of the last event up to `after` (an id need not be one of this job's events).
    since = session.scalar(
        select(func.max(JobEvent.created_at)).where(JobEvent.job_id == job_id, JobEvent.id <= after)
    ) if after else None
    until = rows[-1].created_at if has_more and rows else None
    try:
        entries = token_stream.read_between(context.redis, job_id, _millis(since), _millis(until))
    except redis.RedisError as exc:
        log.warning("token_stream_unavailable", job_id=job_id, error=str(exc))
        entries = []
    recorded = [JobEventInfo(id=row.id, type=row.type, data=row.data, created_at=row.created_at) for row in rows]
    streamed = [_entry_event(entry) for entry in entries if entry["type"] in ("token", "attempt")]
    # The order the live stream sends (`_in_time_order`).
    merged = heapq.merge(recorded, streamed, key=lambda event: _in_time_order(event, event.id is None))
    attempt, page = attempt_begun(session, job_id, after), []
    for event in merged:
        counted = latest_attempt(attempt, event.type, event.data, streamed=event.id is None)
        if counted is not None:
            attempt = counted
            page.append(event)
    return page


def latest_attempt(latest: int, event_type: str, data: dict[str, Any], *, streamed: bool) -> int | None:
    """Count one event in time order: return the latest attempt begun with it, or None to drop it.

    A claim's status event names the attempt it begins, as do a token stream's entries. An entry
    of an earlier attempt is dropped: its worker, cut off from the database, wrote it after a
    later attempt began, so it is not the job's text (and its client has already started over).
    """
    attempt = data.get("attempt", 0)
    if streamed:
        return None if attempt < latest else attempt
    return max(latest, attempt) if event_type == "status" else latest


def attempt_begun(session: Session, job_id: str, up_to: int) -> int:
    """Return the latest attempt whose claim is among a job's recorded events up to an id (0: none)."""
    if not up_to:
        return 0
    statuses = session.scalars(
        select(JobEvent.data).where(JobEvent.job_id == job_id, JobEvent.type == "status", JobEvent.id <= up_to)
    )
    return max((data.get("attempt", 0) for data in statuses), default=0)


# Where an event goes among those of the same millisecond (see `_in_time_order`).
BEGUN, STREAMED, ENDED = 0, 1, 2


def _in_time_order(event: Any, streamed: bool) -> tuple[int, int]:
    """Return the key that puts recorded events and stream entries in the order they happened.

    Stream entry ids hold whole milliseconds, so that is the precision. On a tie a recorded
    event goes before the stream's entries (a claim comes before its attempt's text), but a
    job's end goes after them: its worker writes the last text before it commits the end, often
    within the same millisecond, and a client that took the end for "the text is complete" lost
    the tail.
    """
    if streamed:
        place = STREAMED
    else:
        place = ENDED if event.type == "status" and event.data.get("status") in TERMINAL_STATUSES else BEGUN
    return _millis(event.created_at), place


def _millis(moment: datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp() * 1000)


def _entry_event(entry: dict[str, Any]) -> JobEventInfo:
    """A token stream entry as an event of the JSON list (one without an id)."""
    data = {"attempt": entry["attempt"]}
    if entry["type"] == "token":
        data = {"text": entry["text"], "token_ids": entry["token_ids"], **data}
    created_at = datetime.fromtimestamp(token_stream.entry_millis(entry["id"]) / 1000, timezone.utc)
    return JobEventInfo(id=None, type=entry["type"], data=data, created_at=created_at)


def _merged(events: list[Any], entries: list[dict[str, Any]], cursor: Cursor) -> Iterator[str]:
    """Yield frames of both sources in time order, each source in its own order, moving the cursor."""
    timed = heapq.merge(
        ((_in_time_order(event, False), event) for event in events),
        (((token_stream.entry_millis(entry["id"]), STREAMED), entry) for entry in entries),
        key=lambda item: item[0],
    )
    for _, item in timed:
        if isinstance(item, dict):
            cursor.entry_id = item["id"]
            if item["type"] not in ("token", "attempt"):
                continue  # an `end` entry only moves the cursor: `done` comes from the job row
            event = _entry_event(item)
            counted = latest_attempt(cursor.attempt, event.type, event.data, streamed=True)
            if counted is not None:
                cursor.attempt = counted
                yield _frame(event.type, event.data, cursor)
        else:
            cursor.event_id = item.id
            cursor.attempt = latest_attempt(cursor.attempt, item.type, item.data, streamed=False)
            yield _frame(item.type, item.data, cursor)


def _frame(event: str, data: dict[str, Any], cursor: Cursor, retry_ms: int | None = None) -> str:
    """Format one SSE event (with the reconnection delay, if given); JSON escapes newlines, so
    the data is one line."""
    retry = "" if retry_ms is None else f"retry: {retry_ms}\n"
    return f"id: {cursor}\nevent: {event}\n{retry}data: {json.dumps(data, separators=(',', ':'))}\n\n"
