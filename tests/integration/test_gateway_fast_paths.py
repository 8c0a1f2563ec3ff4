"""The gateway's fast paths answer exactly as the general ones: job messages, polls, cached keys."""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta
from types import SimpleNamespace

import pytest
import redis
from sqlalchemy import func, select, text
from werkzeug.test import Client

from services.domain import jobs as job_domain
from services.domain.keys import Caller, KeyCache, create_key, find_key, revoke_key
from services.gateway import fast_polls
from services.gateway.errors import INTERNAL_ERROR
from services.gateway.fast_polls import POLL_ROUTE, FastPolls
from services.gateway.fast_submits import SUBMIT_PATH, FastSubmits
from services.gateway.metrics import REQUESTS
from shared import job_store
from shared.celery_app import make_celery
from shared.errors import NotFound, Unauthenticated
from shared.keys import hash_key
from shared.models import Job, utcnow
from shared.publish import JobPublisher, publish_job
from tests.integration.helpers import QUEUE, RESULT, USAGE, claim, make_key, submit


def _messages(redis_client, queue: str) -> list[dict]:
    return [json.loads(raw) for raw in redis_client.lrange(queue, 0, -1)]


# What differs between two sends of the same job: a fresh tag, and who sent it.
PER_SENDER = {("properties", "delivery_tag"), ("properties", "reply_to"), ("headers", "origin")}


def _without_sender(message: dict) -> dict:
    return {
        part: {key: value for key, value in fields.items() if (part, key) not in PER_SENDER}
        if isinstance(fields, dict) else fields
        for part, fields in message.items()
    }


@pytest.mark.parametrize("queue", [QUEUE, "fine_tune.gemma-3-270m"])
def test_job_publisher_sends_what_send_task_sends(redis_url, redis_client, queue):
    assert publish_job(make_celery(redis_url), "job_abc", queue)
    assert JobPublisher(redis_client).publish("job_abc", queue)
    by_celery, by_publisher = _messages(redis_client, queue)
    assert _without_sender(by_publisher) == _without_sender(by_celery)
    assert by_publisher["properties"]["delivery_tag"] != by_celery["properties"]["delivery_tag"]


def test_job_publisher_reports_an_unreachable_redis():
    client = redis.Redis(port=1, socket_connect_timeout=0.5)
    assert JobPublisher(client).publish("job_abc", QUEUE) is False


def test_poll_answers_as_describe_job(app, client, auth):
    """A poll (prebuilt query, no session) and describe_job (a session) agree, queued or finished."""
    context = app.extensions["gemma_jobs"]
    first, second = (submit(client, auth).get_json()["id"] for _ in range(2))
    held = claim(context.db, first, "w1")
    with context.db.session_scope() as session:
        job_store.finish(session, held, "w1", result=RESULT, usage=USAGE)
    caller = _caller(context, auth)
    for job_id in (first, second):
        with context.db.session_scope(read_only=True) as session:
            described = job_domain.describe_job(session, caller, job_id, context.live_queues)
        assert job_domain.poll_job(context.db, caller, job_id, context.live_queues) == described
        assert client.get(f"/v1/jobs/{job_id}", headers=auth).get_json() == described.model_dump(mode="json")
    polled = client.get(f"/v1/jobs/{second}", headers=auth).get_json()
    assert polled["queue_position"] == 0 and polled["waiting_for"]
    finished = client.get(f"/v1/jobs/{first}", headers=auth).get_json()
    assert finished["usage"]["completion_tokens"] == 1 and finished["result"]["text"] == "hi"


def test_a_poll_takes_the_position_from_the_queue_head_read_at_most_max_age_ago(app, client, auth):
    positions = app.extensions["gemma_jobs"].queue_positions
    positions.max_age_s = 60  # no re-read within this test, however slow the machine

    def position(job_id: str) -> int | None:
        return client.get(f"/v1/jobs/{job_id}", headers=auth).get_json()["queue_position"]

    ids = [submit(client, auth).get_json()["id"] for _ in range(3)]
    assert [position(job_id) for job_id in ids] == [0, 1, 2]
    client.post(f"/v1/jobs/{ids[0]}/cancel", headers=auth)
    assert position(ids[0]) is None  # the status is read fresh
    assert position(ids[2]) == 2  # the head as read a moment ago
    later = submit(client, auth).get_json()
    assert later["queue_position"] == 2  # a submit counts exactly
    assert position(later["id"]) == 3  # not in the head read before it: after all of it
    positions.max_age_s = 0
    assert [position(job_id) for job_id in ids[1:]] + [position(later["id"])] == [0, 1, 2]


def test_poll_of_someone_elses_job_is_not_found(app, client, auth):
    job_id = submit(client, auth).get_json()["id"]
    other = Caller(key_id="key_other", role="user")
    with pytest.raises(NotFound):
        job_domain.poll_job(app.extensions["gemma_jobs"].db, other, job_id)


def test_submit_answers_the_queue_position_it_recorded(client, auth):
    positions = [submit(client, auth).get_json()["queue_position"] for _ in range(3)]
    assert positions == [0, 1, 2]


def test_submit_of_a_limited_key_still_counts_in_one_transaction(app, client):
    """Keys with limits keep the locked, transactional admission (a 429 leaves no job behind)."""
    admin = {"Authorization": f"Bearer {make_key(app, role='admin')}"}
    created = client.post("/v1/admin/keys", json={"role": "user", "rpm": 1}, headers=admin).get_json()
    limited = {"Authorization": f"Bearer {created['key']}"}
    assert submit(client, limited).status_code == 202
    assert submit(client, limited).status_code == 429
    assert len(client.get("/v1/jobs", headers=limited).get_json()["data"]) == 1


def test_key_cache_serves_a_revocation_elsewhere_after_its_ttl(app):
    context = app.extensions["gemma_jobs"]
    plaintext = make_key(app)
    reads = []

    def find(digest):
        reads.append(digest)
        with context.db.read_connection() as connection:
            return find_key(connection, digest)

    cache = KeyCache(find, ttl_s=60)
    caller = cache.authenticate(plaintext)
    assert cache.authenticate(plaintext) == caller and len(reads) == 1
    with context.db.session_scope() as session:
        revoke_key(session, caller.key_id)
    assert cache.authenticate(plaintext) == caller  # revoked in "another process": within the TTL
    cache.ttl_s = 0
    with pytest.raises(Unauthenticated, match="revoked"):
        cache.authenticate(plaintext)


def test_key_cache_forgets_a_key_revoked_here_and_never_remembers_unknown_keys(app):
    context = app.extensions["gemma_jobs"]
    plaintext = make_key(app)
    caller = context.keys.authenticate(plaintext)
    context.keys.forget(caller.key_id)
    assert hash_key(plaintext) not in context.keys._rows
    with pytest.raises(Unauthenticated, match="unknown"):
        context.keys.authenticate("gj_" + "x" * 40)
    assert hash_key("gj_" + "x" * 40) not in context.keys._rows


def test_a_key_read_before_its_revoke_here_committed_is_not_remembered(app):
    """A request that read the key before the revoke put the row in the cache after the revoke's
    forget: the revoked key worked in this process for another TTL."""
    context = app.extensions["gemma_jobs"]
    with context.db.session_scope() as session:
        row, plaintext = create_key(session, role="user")
    read, revoked = threading.Event(), threading.Event()

    def find_then_wait(digest):
        found = _find(context, digest)
        read.set()
        assert revoked.wait(10)
        return found

    cache = KeyCache(find_then_wait, ttl_s=60)
    callers = []
    reading = threading.Thread(target=lambda: callers.append(cache.authenticate(plaintext)))
    reading.start()
    assert read.wait(10)
    with context.db.session_scope() as session:
        revoke_key(session, row.id)
    cache.forget(row.id)
    revoked.set()
    reading.join(10)
    assert [caller.key_id for caller in callers] == [row.id]  # the request already in flight
    cache.find = lambda digest: _find(context, digest)
    with pytest.raises(Unauthenticated, match="revoked"):
        cache.authenticate(plaintext)


def test_forgetting_a_key_while_other_keys_are_cached_is_safe(app):
    """`forget` walked the dict while other threads added keys: 'dictionary changed size during
    iteration', a 500 for a revoke that had committed."""
    context = app.extensions["gemma_jobs"]
    plaintext = make_key(app)
    row = _find(context, hash_key(plaintext))
    # Every key is that row, under its own digest.
    cache = KeyCache(lambda digest: SimpleNamespace(**{**row._asdict(), "key_hash": digest}), ttl_s=60)
    cache.MAX_KEYS = 10**9
    stop, errors = threading.Event(), []

    def add_keys(first: int) -> None:
        number = first
        while not stop.is_set():
            cache.authenticate(f"gj_{number:040d}")
            number += 4

    threads = [threading.Thread(target=add_keys, args=(first,)) for first in range(4)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(300):
            try:
                cache.forget("key_other")
            except RuntimeError as exc:
                errors.append(exc)
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    assert errors == []
    assert len(cache._rows) > 100  # the threads did add keys all along


def _caller(context, auth: dict[str, str]) -> Caller:
    return context.keys.authenticate(auth["Authorization"].removeprefix("Bearer "))



def test_a_cached_key_expires_by_the_clock_within_the_cache_ttl(app):
    context = app.extensions["gemma_jobs"]
    with context.db.session_scope() as session:
        _, plaintext = create_key(session, role="user", expires_at=utcnow() + timedelta(seconds=1))
    cache = KeyCache(lambda digest: _find(context, digest), ttl_s=60)
    assert cache.authenticate(plaintext).role == "user"
    time.sleep(1.1)
    with pytest.raises(Unauthenticated, match="expired"):
        cache.authenticate(plaintext)


def _find(context, digest):
    with context.db.read_connection() as connection:
        return find_key(connection, digest)


def _flask_only(app) -> Client:
    """A client of the Flask app without the fast paths' middleware in front of it."""
    assert isinstance(app.wsgi_app, FastSubmits) and isinstance(app.wsgi_app.wsgi_app, FastPolls)
    return Client(app.wsgi_app.wsgi_app.wsgi_app, use_cookies=False)


def _answer(response) -> tuple:
    headers = {name: value for name, value in response.headers.items() if name != "X-Request-ID"}
    return response.status_code, headers, response.get_data()


def test_a_fast_poll_answers_byte_for_byte_as_the_flask_route(app, client, auth):
    context = app.extensions["gemma_jobs"]
    ok, failed, queued = (submit(client, auth).get_json()["id"] for _ in range(3))
    held, lost = claim(context.db, ok, "w1"), claim(context.db, failed, "w1")
    with context.db.session_scope() as session:
        job_store.finish(session, held, "w1", result=RESULT, usage=USAGE)
        job_store.fail(session, lost, "w1", code="internal_error", message="boom")
    flask_only = _flask_only(app)
    for job_id in (ok, failed, queued):
        fast = client.get(f"/v1/jobs/{job_id}", headers=auth)
        assert fast.status_code == 200 and fast.headers["X-Request-ID"]
        assert _answer(fast) == _answer(flask_only.get(f"/v1/jobs/{job_id}", headers=auth))


def test_what_a_fast_poll_does_not_answer_flask_does(app, client, auth):
    job_id = submit(client, auth).get_json()["id"]
    other = {"Authorization": f"Bearer {make_key(app)}"}
    flask_only = _flask_only(app)
    for path, headers in [
        (f"/v1/jobs/{job_id}", {}),  # no key: 401
        (f"/v1/jobs/{job_id}", {"Authorization": "Bearer nope"}),  # a wrong key: 401
        (f"/v1/jobs/{job_id}", {"Authorization": f"Basic {auth['Authorization'][7:]}"}),  # not a bearer key
        (f"/v1/jobs/{job_id}", other),  # someone else's job: 404
        ("/v1/jobs/job_doesnotexist", auth),
        ("/v1/jobs/bad%20id", auth),  # not an id the gateway makes: Flask's route answers
        (f"/v1/jobs/{job_id}/", auth),  # Flask's own answer to a trailing slash
    ]:
        fast, slow = client.get(path, headers=headers), flask_only.get(path, headers=headers)
        assert _answer(fast) == _answer(slow), path
        assert fast.status_code != 200 or path.endswith("/")
    assert client.head(f"/v1/jobs/{job_id}", headers=auth).status_code == 200  # Flask answers HEAD


def test_an_error_a_fast_path_met_is_not_met_again_by_flask(app, client, auth, monkeypatch):
    """Flask redid the work: two key lookups for an unknown key (anyone could double the
    database's load), two reads of a job that is not the caller's, two timeouts in an outage."""
    keys = app.extensions["gemma_jobs"].keys
    lookups, polls = [], []
    find = keys.find
    monkeypatch.setattr(keys, "find", lambda digest: lookups.append(digest) or find(digest))
    for module in (fast_polls, job_domain):
        monkeypatch.setattr(module, "poll_job", _counted(module.poll_job, polls))
    real = make_key(app)
    unknown = {"Authorization": f"Bearer {real[:-4]}{'a' if real[-4] != 'a' else 'b'}{real[-3:]}"}  # well formed
    assert client.get("/v1/jobs/job_doesnotexist", headers=unknown).status_code == 401
    assert client.post(SUBMIT_PATH, json=SUBMIT, headers=unknown).status_code == 401
    assert len(lookups) == 2
    assert client.get("/v1/jobs/job_doesnotexist", headers=auth).status_code == 404
    assert len(polls) == 1


def _counted(function, calls: list):
    def counted(*args, **kwargs):
        calls.append(1)
        return function(*args, **kwargs)

    return counted


def test_a_fast_poll_echoes_the_request_id_and_is_counted(app, client, auth):
    job_id = submit(client, auth).get_json()["id"]
    series = REQUESTS.labels("GET", POLL_ROUTE, "200")
    before = series._value.get()
    response = client.get(f"/v1/jobs/{job_id}", headers={**auth, "X-Request-ID": "trace-me-1"})
    assert response.headers["X-Request-ID"] == "trace-me-1"
    made = {client.get(f"/v1/jobs/{job_id}", headers=auth).headers["X-Request-ID"] for _ in range(3)}
    assert len(made) == 3  # one new id per request
    assert series._value.get() == before + 4


def _jobs(app) -> int:
    with app.extensions["gemma_jobs"].db.session_scope(read_only=True) as session:
        return session.query(Job).count()


def _submitted(response) -> tuple:
    """A submit's answer without what differs from job to job (its id, time, place in the queue)."""
    body = response.get_json()
    assert response.headers["Location"] == f"/v1/jobs/{body['id']}"
    headers = {name: value for name, value in response.headers.items()
               if name not in ("X-Request-ID", "Location", "Content-Length")}
    varying = ("id", "created_at", "queue_position")
    return response.status_code, headers, {key: value for key, value in body.items() if key not in varying}


SUBMIT = {"model": "gemma-3-270m", "prompt": "Hello", "max_new_tokens": 4, "metadata": {"run": "a"}}


def test_a_fast_submit_answers_as_the_flask_route_and_records_one_job(app, client, auth):
    series = REQUESTS.labels("POST", SUBMIT_PATH, "202")
    before = series._value.get()
    fast = client.post(SUBMIT_PATH, json=SUBMIT, headers={**auth, "X-Request-ID": "trace-submit"})
    slow = _flask_only(app).post(SUBMIT_PATH, json=SUBMIT, headers=auth)
    assert fast.status_code == 202 and fast.headers["X-Request-ID"] == "trace-submit"
    assert _submitted(fast) == _submitted(slow)
    assert [fast.get_json()["queue_position"], slow.get_json()["queue_position"]] == [0, 1]
    assert series._value.get() == before + 2  # the fast path counts its request as the route does
    assert _jobs(app) == 2
    polled = client.get(f"/v1/jobs/{fast.get_json()['id']}", headers=auth).get_json()
    assert polled["metadata"] == {"run": "a"} and polled["status"] == "queued"


def test_what_a_fast_submit_does_not_take_the_flask_route_answers_once(app, client, auth):
    other_key = {"Authorization": f"Bearer {make_key(app)}"}
    flask_only = _flask_only(app)
    limit = app.extensions["gemma_jobs"].settings.max_body_bytes
    for name, headers, body in [
        ("no key", {}, json.dumps(SUBMIT)),
        ("a wrong key", {"Authorization": "Bearer nope"}, json.dumps(SUBMIT)),
        ("not JSON", auth, "{not json"),
        ("not an object", auth, "[1, 2]"),
        ("a bad field", auth, json.dumps({**SUBMIT, "max_new_tokens": -1})),
        ("an unknown model", auth, json.dumps({**SUBMIT, "model": "gemma-9"})),
        ("someone else's adapter", other_key, json.dumps({**SUBMIT, "model": "ft_doesnotexist"})),
        ("an empty body", auth, ""),
        ("a body over the limit", auth, json.dumps({**SUBMIT, "prompt": "x" * limit})),
    ]:
        headers = {**headers, "Content-Type": "application/json"}
        fast, slow = client.post(SUBMIT_PATH, data=body, headers=headers), flask_only.post(
            SUBMIT_PATH, data=body, headers=headers)
        assert fast.status_code >= 400 and _answer(fast) == _answer(slow), name
    assert _jobs(app) == 0
    # What only the route implements: taken there, once each.
    waited = client.post(SUBMIT_PATH, json=SUBMIT, headers={**auth, "Prefer": "wait=1"})
    assert waited.status_code == 202 and waited.headers["Preference-Applied"] == "wait=1"
    keyed = {**auth, "Idempotency-Key": "once"}
    first, again = (client.post(SUBMIT_PATH, json=SUBMIT, headers=keyed) for _ in range(2))
    assert again.headers["Idempotent-Replayed"] == "true" and again.get_json()["id"] == first.get_json()["id"]
    assert _jobs(app) == 2


def test_a_submit_the_database_refuses_is_a_500_from_either_path_and_records_nothing(app, client, auth):
    db = app.extensions["gemma_jobs"].db
    refuse = {
        "sqlite": ["CREATE TRIGGER refuse_jobs BEFORE INSERT ON jobs BEGIN SELECT RAISE(ABORT, 'refused'); END"],
        "postgresql": [
            "CREATE FUNCTION refuse_jobs() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "RAISE EXCEPTION 'refused for the test'; END $$",
            "CREATE TRIGGER refuse_jobs BEFORE INSERT ON jobs FOR EACH ROW EXECUTE FUNCTION refuse_jobs()",
        ],
    }[db.engine.dialect.name]
    with db.engine.begin() as connection:
        for statement in refuse:
            connection.exec_driver_sql(statement)
    fast = client.post(SUBMIT_PATH, json=SUBMIT, headers=auth)
    slow = _flask_only(app).post(SUBMIT_PATH, json=SUBMIT, headers=auth)
    assert fast.status_code == slow.status_code == 500
    assert fast.get_json() == slow.get_json() == INTERNAL_ERROR
    assert _jobs(app) == 0
    assert client.get("/healthz").status_code == 200  # the gateway goes on


def test_a_committed_submit_answers_202_when_the_worker_registry_cannot_be_read(app, auth, redis_client):
    """The live-queues read comes after the commit: failing, it used to answer 500 for a job that
    runs, and the client's retry made a second one. Both paths (plain, and a key with limits)."""
    context = app.extensions["gemma_jobs"]
    with context.db.session_scope() as session:
        _, limited = create_key(session, role="user", rpm=100)
        session.execute(text("DROP TABLE workers"))  # the registry unreadable (a real database error)
    context.live_queues.max_age_s = 0
    client = app.test_client()
    for headers in (auth, {"Authorization": f"Bearer {limited}"}):
        response = submit(client, headers)
        assert response.status_code == 202, response.get_data(as_text=True)
        assert response.get_json()["waiting_for"] is None  # not known this time
    with context.db.session_scope(read_only=True) as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 2
    assert redis_client.llen(QUEUE) == 2
