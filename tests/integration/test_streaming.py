"""Live job events over SSE, on a real database (SQLite and PostgreSQL) and real Redis.

No worker process runs here: the tests drive jobs as a worker does, with the real job store
(claim, finish) and the real token stream writers, on the gateway's database and Redis.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime

import pytest
import redis
from structlog.testing import capture_logs

from services.gateway import create_app, streaming
from services.gateway.streaming import TokenFeed
from shared import job_store, token_stream
from shared.db import Database
from shared.job_store import Claim
from shared.models import Job
from shared.settings import load_settings
from services.domain.keys import create_key
from tests.integration.helpers import RESULT, USAGE, assert_error, claim, lapse_lease, make_key, submit

pytestmark = pytest.mark.timeout(60)

STREAM = {"Accept": "text/event-stream"}


@dataclass
class Event:
    """One parsed SSE event."""

    name: str
    id: str
    data: dict


def sse_events(response) -> Iterator[Event]:
    """Yield the events of a streamed response as its chunks arrive; comment lines are skipped."""
    buffer = ""
    for chunk in response.response:
        buffer += chunk.decode("utf-8")
        while "\n\n" in buffer:
            frame, buffer = buffer.split("\n\n", 1)
            fields = dict(line.split(": ", 1) for line in frame.split("\n") if not line.startswith(":"))
            if fields:
                yield Event(fields["event"], fields["id"], json.loads(fields["data"]))


def read_until_done(response, on_event: Callable[[Event], None] = lambda event: None) -> list[Event]:
    """Return every event up to and including `done`; fail if the stream ends without it."""
    events = []
    for event in sse_events(response):
        events.append(event)
        on_event(event)
        if event.name == "done":
            return events
    pytest.fail(f"the stream ended without `done`: {[event.name for event in events]}")


@dataclass
class ActAsWorker:
    """Does to one job what a worker does, with the real job store and token stream writers."""

    db: Database
    redis: redis.Redis | None
    job_id: str
    worker_id: str = "worker-1"

    def claim(self) -> Claim:
        """Claim the job and start its token stream attempt."""
        held = claim(self.db, self.job_id, self.worker_id)
        assert held is not None
        if self.redis is not None:
            token_stream.start_attempt(self.redis, self.job_id, held.attempt)
        return held

    def tokens(self, held: Claim, *pieces: tuple[str, list[int]]) -> None:
        """Append text deltas one by one; the pauses keep their milliseconds apart."""
        for text, token_ids in pieces:
            time.sleep(0.005)
            token_stream.append_tokens(self.redis, self.job_id, held.attempt, text, token_ids)
        time.sleep(0.005)

    def finish(self, held: Claim, result: dict = RESULT) -> None:
        """Commit the success, then end the token stream."""
        with self.db.session_scope() as session:
            assert job_store.finish(session, held, self.worker_id, result=result, usage=USAGE)
        if self.redis is not None:
            token_stream.end_stream(self.redis, self.job_id, "succeeded")


def in_background(work: Callable[[], None]) -> Callable[[], None]:
    """Start work in a thread; return a join that re-raises what it raised."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as exc:  # handed to the test's thread by join()
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join() -> None:
        thread.join(timeout=30)
        assert not thread.is_alive(), "the background work did not finish"
        if errors:
            raise errors[0]

    return join


def job_id_of(client, auth) -> str:
    response = submit(client, auth)
    assert response.status_code == 202
    return response.get_json()["id"]


def stream(client, auth, job_id: str, **headers):
    response = client.get(f"/v1/jobs/{job_id}/events", headers={**auth, **STREAM, **headers})
    assert response.status_code == 200, response.get_data(as_text=True)
    return response


def worker_for(app, redis_client, job_id: str, worker_id: str = "worker-1") -> ActAsWorker:
    return ActAsWorker(app.extensions["gemma_jobs"].db, redis_client, job_id, worker_id)


def test_tokens_arrive_live_in_order_then_done(client, auth, app, redis_client):
    job_id = job_id_of(client, auth)
    response = stream(client, auth, job_id)
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Accel-Buffering"] == "no"
    worker = worker_for(app, redis_client, job_id)
    first_token_seen = threading.Event()

    def work() -> None:
        held = worker.claim()
        worker.tokens(held, ("Hel", [10, 11]), ("lo", [12]))
        # The rest waits until the client has the first tokens: they were sent live, not replayed.
        assert first_token_seen.wait(15), "no token reached the client while the job ran"
        worker.tokens(held, (" world", [13]))
        worker.finish(held, {**RESULT, "text": "Hello world", "token_ids": [10, 11, 12, 13]})

    join = in_background(work)
    events = read_until_done(response, lambda event: event.name == "token" and first_token_seen.set())
    join()
    names = [event.name for event in events]
    assert names == ["status", "attempt", "token", "token", "token", "status", "done"]
    assert events[0].data["status"] == "running"
    assert events[1].data == {"attempt": 1}
    assert [event.data for event in events[2:5]] == [
        {"text": "Hel", "token_ids": [10, 11], "attempt": 1},
        {"text": "lo", "token_ids": [12], "attempt": 1},
        {"text": " world", "token_ids": [13], "attempt": 1},
    ]
    assert events[5].data == {"status": "succeeded"}
    assert events[-1].data == client.get(f"/v1/jobs/{job_id}", headers=auth).get_json()
    assert events[-1].data["status"] == "succeeded"
    assert events[-1].data["result"]["text"] == "Hello world"


def test_a_late_client_gets_everything_and_can_resume(client, auth, app, redis_client):
    job_id = job_id_of(client, auth)
    worker = worker_for(app, redis_client, job_id)
    held = worker.claim()
    worker.tokens(held, ("a", [1]), ("b", [2]), ("c", [3]))
    worker.finish(held)
    events = read_until_done(stream(client, auth, job_id))
    assert [event.name for event in events] == ["status", "attempt", "token", "token", "token", "status", "done"]
    assert "".join(event.data["text"] for event in events if event.name == "token") == "abc"
    # Ids are `<event id>:<stream entry id>`, each part moving forward with its own source.
    cursors = [(int(event.id.split(":")[0]), event.id.split(":")[1]) for event in events]
    assert [event_id for event_id, _ in cursors] == sorted(event_id for event_id, _ in cursors)
    assert cursors[0][1] == "0" and cursors[-1][0] > 0
    # Resuming after the first token replays only what came after it.
    resumed = read_until_done(stream(client, auth, job_id, **{"Last-Event-ID": events[2].id}))
    assert [event.name for event in resumed] == ["token", "token", "status", "done"]
    assert [event.data.get("text") for event in resumed[:2]] == ["b", "c"]
    assert [event.id for event in resumed] == [event.id for event in events[3:]]


def test_a_new_attempt_tells_the_client_to_start_over(client, auth, app, redis_client):
    job_id = job_id_of(client, auth)
    lost = worker_for(app, redis_client, job_id, "worker-lost")
    held = lost.claim()
    lost.tokens(held, ("The cap", [7, 8]))
    # The first worker vanishes; its lease lapses and another worker claims attempt 2.
    lapse_lease(app.extensions["gemma_jobs"].db, job_id)
    retry = worker_for(app, redis_client, job_id, "worker-2")
    first = held
    held = retry.claim()
    assert held.attempt == 2
    retry.tokens(held, ("The capital", [7, 9]))
    # The lost worker was only cut off from the database: it writes a little more of attempt 1,
    # its start marker too, which the stream must not pass on (the client started over).
    lost.tokens(first, ("ital of", [9, 10]))
    token_stream.start_attempt(redis_client, job_id, 1)
    retry.finish(held, {**RESULT, "text": "The capital", "token_ids": [7, 9]})
    events = read_until_done(stream(client, auth, job_id))
    assert [(event.name, event.data.get("attempt")) for event in events if event.name in ("attempt", "token")] == [
        ("attempt", 1), ("token", 1), ("attempt", 2), ("token", 2),
    ]
    # What a client keeps: the text since the last `attempt`.
    text = ""
    for event in events:
        if event.name == "attempt":
            text = ""
        elif event.name == "token":
            text += event.data["text"]
    assert text == events[-1].data["result"]["text"] == "The capital"
    # Resumed after attempt 2's text, the stream still drops what attempt 1 wrote after it.
    resumed = read_until_done(stream(client, auth, job_id, **{"Last-Event-ID": events[-3].id}))
    assert events[-3].name == "token" and [event.name for event in resumed] == ["status", "done"]
    # So does the JSON list, on one page and one event a page.
    listed = client.get(f"/v1/jobs/{job_id}/events", headers=auth).get_json()["data"]
    assert [(event["type"], event["data"].get("attempt")) for event in listed if event["id"] is None] == [
        ("attempt", 1), ("token", 1), ("attempt", 2), ("token", 2),
    ]
    assert one_a_page(client, auth, job_id) == listed


def test_cancelling_a_queued_job_ends_the_stream(client, auth, app):
    job_id = job_id_of(client, auth)
    response = stream(client, auth, job_id)
    started = time.monotonic()

    def cancel() -> None:
        time.sleep(0.3)  # while the stream waits on Redis for tokens that will never come
        assert app.test_client().post(f"/v1/jobs/{job_id}/cancel", headers=auth).status_code == 200

    join = in_background(cancel)
    events = read_until_done(response)
    join()
    assert [event.name for event in events] == ["status", "done"]
    assert events[0].data == {"status": "cancelled"}
    assert events[-1].data["status"] == "cancelled"
    assert time.monotonic() - started < 5


def test_another_keys_job_is_404_before_any_stream(client, auth, app):
    job_id = job_id_of(client, auth)
    other = {"Authorization": f"Bearer {make_key(app)}"}
    assert_error(client.get(f"/v1/jobs/{job_id}/events", headers={**other, **STREAM}), 404, "not_found")
    assert_error(client.get("/v1/jobs/job_nope/events", headers={**auth, **STREAM}), 404, "not_found")
    assert_error(client.get(f"/v1/jobs/{job_id}/events", headers=STREAM), 401, "unauthenticated")
    for bad in ("12", f"1:{2**64}-0", f"1:0-{2**64}"):  # not ours, or past Redis's 64-bit id parts
        bad_id = client.get(f"/v1/jobs/{job_id}/events", headers={**auth, **STREAM, "Last-Event-ID": bad})
        assert_error(bad_id, 422, "invalid_field")


def test_without_asking_for_a_stream_the_events_are_the_json_list(client, auth, app, redis_client):
    job_id = job_id_of(client, auth)
    worker_for(app, redis_client, job_id).claim()
    for accept in (None, "*/*", "application/json", "text/event-stream;q=0, application/json"):
        headers = {**auth, **({"Accept": accept} if accept else {})}
        response = client.get(f"/v1/jobs/{job_id}/events?limit=5", headers=headers)
        assert response.status_code == 200, accept
        assert response.headers["Content-Type"] == "application/json"
        body = response.get_json()
        # The claim's status, then the attempt its worker started on the token stream.
        assert [event["type"] for event in body["data"]] == ["status", "attempt"] and body["has_more"] is False
        assert_error(client.get(f"/v1/jobs/{job_id}/events?limit=0", headers=headers), 422, "invalid_field")


def test_the_json_list_holds_the_tokens_in_time_order_on_every_page(client, auth, app, redis_client):
    job_id = job_id_of(client, auth)
    worker = worker_for(app, redis_client, job_id)
    held = worker.claim()
    worker.tokens(held, ("Hel", [10]), ("lo", [11]))
    worker.finish(held)
    everything = client.get(f"/v1/jobs/{job_id}/events", headers=auth).get_json()
    events = everything["data"]
    assert [event["type"] for event in events] == ["status", "attempt", "token", "token", "status"]
    assert [event["data"]["status"] for event in events if event["type"] == "status"] == ["running", "succeeded"]
    tokens = [event for event in events if event["type"] == "token"]
    assert [(event["data"]["text"], event["data"]["token_ids"], event["data"]["attempt"]) for event in tokens] == [
        ("Hel", [10], 1), ("lo", [11], 1)]
    assert all((event["id"] is None) == (event["type"] in ("attempt", "token")) for event in events)
    # Stream entry ids hold whole milliseconds, so the list is in time order at that precision.
    millis = [_millis(event["created_at"]) for event in events]
    assert millis == sorted(millis)
    # One recorded event a page: the pages hold every event once, in the same order.
    assert one_a_page(client, auth, job_id) == events
    # An `after` past every event: nothing, not the tokens again.
    assert client.get(f"/v1/jobs/{job_id}/events?after={2**40}", headers=auth).get_json()["data"] == []


def test_a_job_end_in_the_millisecond_of_its_last_text_comes_after_that_text(client, auth, app, redis_client):
    """Its worker writes the last text, then commits the end, often within one millisecond; on
    such a tie the end went first, and a client that took it for "the text is complete" lost the tail."""
    from datetime import timezone

    from sqlalchemy import update

    from shared.models import JobEvent

    job_id = job_id_of(client, auth)
    worker = worker_for(app, redis_client, job_id)
    held = worker.claim()
    worker.tokens(held, ("Hel", [10]), ("lo", [11]))
    worker.finish(held)
    last_text = [entry for entry in token_stream.read_entries(redis_client, job_id) if entry["type"] == "token"][-1]
    tied = datetime.fromtimestamp(token_stream.entry_millis(last_text["id"]) / 1000, timezone.utc)
    with worker.db.session_scope() as session:
        ended = session.execute(update(JobEvent).where(
            JobEvent.job_id == job_id, JobEvent.data["status"].as_string() == "succeeded").values(created_at=tied))
        assert ended.rowcount == 1
    streamed = [(event.name, event.data.get("text") or event.data.get("status"))
                for event in read_until_done(stream(client, auth, job_id))]
    assert streamed[-4:] == [("token", "Hel"), ("token", "lo"), ("status", "succeeded"), ("done", "succeeded")]
    listed = client.get(f"/v1/jobs/{job_id}/events", headers=auth).get_json()["data"]
    assert [event["type"] for event in listed][-3:] == ["token", "token", "status"]
    assert one_a_page(client, auth, job_id) == listed


def test_an_accept_header_with_parameters_still_asks_for_the_stream(client, auth, app, redis_client):
    """werkzeug keeps a media type's parameters in the value: such a client got the JSON list."""
    job_id = job_id_of(client, auth)
    worker = worker_for(app, redis_client, job_id)
    worker.finish(worker.claim())
    for accept in ("text/event-stream; charset=utf-8", "TEXT/EVENT-STREAM;charset=UTF-8", "application/json;q=0.5, text/event-stream ; q=0.9"):
        response = client.get(f"/v1/jobs/{job_id}/events", headers={**auth, "Accept": accept})
        assert response.headers["Content-Type"].startswith("text/event-stream"), accept
        assert read_until_done(response)[-1].data["status"] == "succeeded"


def one_a_page(client, auth, job_id: str) -> list[dict]:
    """The job's JSON event list read one recorded event a page, following `next_after`."""
    paged, after = [], 0
    while True:
        page = client.get(f"/v1/jobs/{job_id}/events?limit=1&after={after}", headers=auth).get_json()
        paged += page["data"]
        if not page["has_more"]:
            break
        after = page["next_after"]
    return paged


def _millis(created_at: str) -> int:
    """An event's created_at in whole milliseconds since the epoch."""
    return int(datetime.fromisoformat(created_at.replace("Z", "+00:00")).timestamp() * 1000)


def test_the_json_list_without_redis_holds_the_recorded_events(database_url, tmp_path, redis_client):
    settings = load_settings(database_url=database_url, redis_url="redis://127.0.0.1:1/0", data_dir=tmp_path)
    app = create_app(settings)
    client = app.test_client()
    auth = {"Authorization": f"Bearer {make_key(app)}"}
    job_id = job_id_of(client, auth)
    assert claim(app.extensions["gemma_jobs"].db, job_id, "worker-1") is not None
    response = client.get(f"/v1/jobs/{job_id}/events", headers=auth)
    assert response.status_code == 200
    assert [event["type"] for event in response.get_json()["data"]] == ["status"]


def test_submit_with_stream_answers_with_the_stream(client, auth, app, redis_client):
    response = client.post(
        "/v1/generations",
        json={"model": "gemma-3-270m", "prompt": "Hi", "max_new_tokens": 4, "stream": True},
        headers={**auth, "Idempotency-Key": "stream-1"},
    )
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    job_id = response.headers["Location"].rsplit("/", 1)[1]
    worker = worker_for(app, redis_client, job_id)

    def work() -> None:
        held = worker.claim()
        worker.tokens(held, ("hi", [5]))
        worker.finish(held)

    join = in_background(work)
    events = read_until_done(response)
    join()
    assert [event.name for event in events] == ["status", "attempt", "token", "status", "done"]
    assert events[-1].data["id"] == job_id and events[-1].data["status"] == "succeeded"
    with app.extensions["gemma_jobs"].db.session_scope(read_only=True) as session:
        assert "stream" not in session.get(Job, job_id).params
    # Streaming or not is no part of the request's meaning: the same key and body, unstreamed,
    # is the same job.
    replay = client.post(
        "/v1/generations",
        json={"model": "gemma-3-270m", "prompt": "Hi", "max_new_tokens": 4},
        headers={**auth, "Idempotency-Key": "stream-1"},
    )
    # The contract's submit answer: 202 (200 only when `Prefer: wait` held it), the job finished.
    assert replay.status_code == 202 and replay.headers["Idempotent-Replayed"] == "true"
    assert replay.get_json()["id"] == job_id and replay.get_json()["status"] == "succeeded"
    waited = client.post(
        "/v1/generations",
        json={"model": "gemma-3-270m", "prompt": "Hi", "max_new_tokens": 4},
        headers={**auth, "Idempotency-Key": "stream-1", "Prefer": "wait=5"},
    )
    assert waited.status_code == 200 and waited.get_json()["id"] == job_id


def test_without_redis_the_stream_still_ends_with_done(database_url, tmp_path):
    settings = load_settings(database_url=database_url, redis_url="redis://127.0.0.1:1/0", data_dir=tmp_path)
    app = create_app(settings)
    client, auth = app.test_client(), {"Authorization": f"Bearer {make_key(app)}"}
    job_id = job_id_of(client, auth)
    worker = ActAsWorker(app.extensions["gemma_jobs"].db, None, job_id)
    with capture_logs() as logs:
        response = stream(client, auth, job_id)
        held = worker.claim()
        join = in_background(lambda: worker.finish(held))
        events = read_until_done(response)
        join()
    assert [event.name for event in events] == ["status", "status", "done"]
    assert events[-1].data["status"] == "succeeded"
    warnings = [entry for entry in logs if entry["event"] == "token_stream_unavailable"]
    assert len(warnings) == 1 and warnings[0]["log_level"] == "warning"
    app.extensions["gemma_jobs"].db.dispose()


def test_a_client_that_goes_away_ends_the_stream(client, auth):
    job_id = job_id_of(client, auth)
    with capture_logs() as logs:
        response = stream(client, auth, job_id)
        response.close()  # what the server does when writing to a gone client fails
    assert [entry for entry in logs if entry["event"] == "event_stream_closed"] == [
        {"event": "event_stream_closed", "job_id": job_id, "done": False, "log_level": "info"}
    ]


def test_revoking_the_key_ends_its_open_streams(client, app, monkeypatch):
    """A revoked key's stream went on until its job ended (up to max_timeout_s, an hour)."""
    monkeypatch.setattr(streaming, "KEY_CHECK_S", 0.2)
    with app.extensions["gemma_jobs"].db.session_scope() as session:
        key, plaintext = create_key(session, role="user")
    own = {"Authorization": f"Bearer {plaintext}"}
    job_id = job_id_of(client, own)
    response = stream(client, own, job_id)
    admin = {"Authorization": f"Bearer {make_key(app, role='admin')}"}

    def revoke() -> None:
        time.sleep(0.3)
        assert app.test_client().delete(f"/v1/admin/keys/{key.id}", headers=admin).status_code == 200

    join = in_background(revoke)
    started = time.monotonic()
    events = list(sse_events(response))  # the stream ends by itself
    join()
    assert [event.name for event in events] == ["error"]
    assert events[0].data == {"code": "unauthenticated",
                              "message": "this API key has been revoked; the stream ends"}
    assert time.monotonic() - started < 5


def test_an_idle_stream_sends_keep_alives_holding_no_database_connection(client, auth, app, monkeypatch):
    monkeypatch.setattr(streaming, "KEEP_ALIVE_S", 0.2)
    job_id = job_id_of(client, auth)
    response = stream(client, auth, job_id)
    pool = app.extensions["gemma_jobs"].db.engine.pool
    chunks = iter(response.response)
    for _ in range(3):
        assert next(chunks) == b": keep-alive\n\n"
        assert pool.checkedout() == 0  # the stream waits without a session
    response.close()


def test_token_stream_writers_and_reader(redis_client):
    pipeline = redis_client.pipeline()
    token_stream.start_attempt(pipeline, "job_x", 1)
    token_stream.append_tokens(pipeline, "job_x", 1, "hé\nllo", [1, 2])
    pipeline.execute()
    key = token_stream.stream_key("job_x")
    assert key == "gemma-jobs:job-stream:job_x"
    assert 0 < redis_client.ttl(key) <= token_stream.ABANDONED_TTL_S
    first, second = token_stream.read_entries(redis_client, "job_x")
    assert {k: v for k, v in first.items() if k != "id"} == {"type": "attempt", "attempt": 1}
    assert {k: v for k, v in second.items() if k != "id"} == {
        "type": "token", "attempt": 1, "text": "hé\nllo", "token_ids": [1, 2],
    }
    # Values are flat strings in Redis.
    assert redis_client.xrange(key)[1][1][b"token_ids"] == b"[1, 2]"
    assert token_stream.read_entries(redis_client, "job_x", after_id=second["id"]) == []
    started = time.monotonic()
    assert token_stream.read_entries(redis_client, "job_x", after_id=second["id"], block_ms=200) == []
    assert time.monotonic() - started >= 0.15
    token_stream.end_stream(redis_client, "job_x", "succeeded", ttl_s=60)
    assert 0 < redis_client.ttl(key) <= 60
    (end,) = token_stream.read_entries(redis_client, "job_x", after_id=second["id"], count=5)
    assert end["type"] == "end" and end["status"] == "succeeded"
    with pytest.raises(ValueError):
        token_stream.read_entries(redis_client, "job_x", block_ms=0)


def test_the_last_read_tries_redis_even_while_backing_off(redis_client):
    """One failed read (a dropped connection) starts a back-off; the read before `done` must
    still fetch the end of the text, or the stream ended without its last tokens."""
    token_stream.append_tokens(redis_client, "job_blip", 1, "Hello", [1])
    feed = TokenFeed(redis.Redis(port=1, socket_connect_timeout=0.2), "job_blip", "0")
    assert feed.read(None) == [] and feed.down  # the failed read
    feed.client = redis_client  # the connection is back
    assert feed.read(None) == []  # backing off
    assert [entry["text"] for entry in feed.read(None, last=True)] == ["Hello"]
