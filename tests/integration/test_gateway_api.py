"""The gateway's HTTP contract on a real database (SQLite and PostgreSQL) and real Redis."""

from __future__ import annotations

import json
import re
import time

import jsonschema_rs
import pytest

from services.domain.keys import create_key
from services.gateway import create_app
from shared.db import Database
from shared.ids import new_id
from shared.jobs import QUEUE_POSITION_CAP
from shared.models import Job, WorkerRecord, utcnow
from shared.settings import load_settings
from tests.integration.helpers import QUEUE, assert_error, make_key, submit


def test_submit_records_then_enqueues(client, auth, app, redis_client):
    response = submit(client, auth, metadata={"team": "search"})
    assert response.status_code == 202
    job = response.get_json()
    assert job["id"].startswith("job_")
    assert job["status"] == "queued"
    assert job["queue_position"] == 0
    assert job["metadata"] == {"team": "search"}
    assert response.headers["Location"] == f"/v1/jobs/{job['id']}"
    # The message on the model's queue carries only the job id.
    (raw,) = redis_client.lrange(QUEUE, 0, -1)
    message = json.loads(raw)
    assert json.loads(__import__("base64").b64decode(message["body"]))[0] == [job["id"]]
    with app.extensions["gemma_jobs"].db.session_scope() as session:
        row = session.get(Job, job["id"])
        assert row.params["max_new_tokens"] == 4
        assert row.params["temperature"] == 1.0


def test_queue_position_counts_jobs_ahead(client, auth):
    ids = [submit(client, auth).get_json()["id"] for _ in range(3)]
    positions = [client.get(f"/v1/jobs/{job_id}", headers=auth).get_json()["queue_position"] for job_id in ids]
    assert positions == [0, 1, 2]


def add_jobs(app, count: int, *, queue: str = QUEUE, status: str = "queued") -> None:
    """Add jobs of another key, older than any submitted after this."""
    with app.extensions["gemma_jobs"].db.session_scope() as session:
        key, _ = create_key(session, role="user")
        session.add_all(
            Job(id=new_id("job"), owner_key_id=key.id, kind="generation", model="gemma-3-270m", queue=queue,
                status=status, params={}, enqueued_at=utcnow())
            for _ in range(count)
        )


def test_queue_position_counts_only_queued_jobs_of_the_same_queue(client, auth, app):
    add_jobs(app, 2, queue="generation.other-model")
    add_jobs(app, 2, status="succeeded")
    add_jobs(app, 1, status="running")
    submitted = [submit(client, auth).get_json() for _ in range(3)]
    assert [job["queue_position"] for job in submitted] == [0, 1, 2]
    page = client.get("/v1/jobs", headers=auth).get_json()["data"]
    assert [job["queue_position"] for job in page] == [2, 1, 0]
    client.post(f"/v1/jobs/{submitted[0]['id']}/cancel", headers=auth)
    page = client.get("/v1/jobs", headers=auth).get_json()["data"]
    assert [job["queue_position"] for job in page] == [1, 0, None]


def test_queue_position_is_counted_up_to_the_cap(client, auth, app):
    add_jobs(app, QUEUE_POSITION_CAP + 5)
    job = submit(client, auth).get_json()
    assert job["queue_position"] == QUEUE_POSITION_CAP
    assert client.get(f"/v1/jobs/{job['id']}", headers=auth).get_json()["queue_position"] == QUEUE_POSITION_CAP


def test_waiting_for_names_a_queue_without_live_workers(client, auth, app):
    job_id = submit(client, auth).get_json()["id"]
    assert "no live worker serves generation jobs for gemma-3-270m" in client.get(
        f"/v1/jobs/{job_id}", headers=auth).get_json()["waiting_for"]
    context = app.extensions["gemma_jobs"]
    context.live_queues.max_age_s = 0  # each process rereads the registry at most once per max_age_s
    # A worker still starting (it may never load the model, nor reach Redis) or draining (it takes
    # no new jobs) is no consumer: its alive heartbeat does not hide that none serves the queue.
    for state in ("starting", "draining"):
        with context.db.session_scope() as session:
            session.merge(WorkerRecord(id="worker-1", host="h", pid=1, device="cpu", role="generate",
                                       models=[], queues=[QUEUE], state=state))
        assert "no live worker serves" in client.get(f"/v1/jobs/{job_id}", headers=auth).get_json()["waiting_for"]
        assert _live_workers(client, app) == 0
    with context.db.session_scope() as session:
        session.merge(WorkerRecord(id="worker-1", host="h", pid=1, device="cpu", role="generate",
                                   models=["gemma-3-270m"], queues=[QUEUE], state="ready"))
    assert client.get(f"/v1/jobs/{job_id}", headers=auth).get_json()["waiting_for"] is None
    assert _live_workers(client, app) == 1


def _live_workers(client, app) -> int:
    """Return /v1/admin/queues' live_workers of the default model's generation queue."""
    queues = client.get("/v1/admin/queues", headers={"Authorization": f"Bearer {make_key(app, role='admin')}"})
    return {queue["name"]: queue for queue in queues.get_json()["data"]}[QUEUE]["live_workers"]


def test_missing_and_bad_keys_are_401(client, app):
    assert_error(client.get("/v1/jobs"), 401, "unauthenticated")
    assert_error(client.get("/v1/jobs", headers={"Authorization": "Bearer gj_not-a-real-key-at-all"}), 401, "unauthenticated")
    assert_error(client.get("/v1/jobs", headers={"Authorization": "Basic abc"}), 401, "unauthenticated")
    assert_error(client.get("/v1/models"), 401, "unauthenticated")
    submitted = client.post("/v1/generations", json={"model": "gemma-3-270m", "prompt": "hi"})
    assert_error(submitted, 401, "unauthenticated")
    assert submitted.headers["WWW-Authenticate"] == 'Bearer realm="gemma-jobs"'  # what scheme to send


def test_keys_are_stored_only_as_hashes(app):
    plaintext = make_key(app)
    with app.extensions["gemma_jobs"].db.engine.connect() as connection:
        dump = repr(connection.exec_driver_sql("SELECT * FROM api_keys").all())
    assert plaintext not in dump
    assert plaintext[len("gj_"):] not in dump


def test_malformed_json_is_400(client, auth):
    response = client.post("/v1/generations", data="{not json", headers={**auth, "Content-Type": "application/json"})
    assert_error(response, 400, "malformed_request")
    assert_error(client.post("/v1/generations", data="[1, 2]", headers=auth), 400, "malformed_request")
    assert_error(client.post("/v1/generations", headers=auth), 400, "malformed_request")


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": "many"}, "max_new_tokens"),
        ({"seed": -5}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"surprise": True}, "surprise"),
        ({"messages": [{"role": "robot", "content": "hi"}], "prompt": None}, "messages.0.role"),
    ],
)
def test_bad_fields_are_422_naming_the_field(client, auth, overrides, field):
    body = {"model": "gemma-3-270m", "prompt": "Hello", **overrides}
    body = {key: value for key, value in body.items() if value is not None}
    error = assert_error(client.post("/v1/generations", json=body, headers=auth), 422, "invalid_field")
    assert field in [detail["field"] for detail in error["details"]]
    assert field in error["message"]


@pytest.mark.parametrize("part", ['"metadata": {"k": "\\ud800"}', '"metadata": {"\\udfff": "v"}', '"stop": ["\\ud800"]'])
def test_a_lone_surrogate_is_422_and_records_no_job(client, auth, app, part):
    """A JSON escape of half a UTF-16 pair is valid JSON but no text: once stored, the job could
    not be answered (every poll and list page holding it failed)."""
    raw = '{"model": "gemma-3-270m", "prompt": "Hello", ' + part + "}"
    response = client.post("/v1/generations", data=raw, headers={**auth, "Content-Type": "application/json"})
    error = assert_error(response, 422, "invalid_field")
    assert "unicode" in error["message"].lower()
    assert client.get("/v1/jobs", headers=auth).get_json()["data"] == []


def test_prompt_and_messages_together_is_422(client, auth):
    response = submit(client, auth, messages=[{"role": "user", "content": "hi"}])
    error = assert_error(response, 422, "invalid_field")
    assert "exactly one of `messages` or `prompt`" in json.dumps(error)


def test_unknown_model_is_422(client, auth):
    error = assert_error(submit(client, auth, model="gpt-17"), 422, "invalid_field")
    assert "gpt-17" in error["message"] and "gemma-3-270m" in error["message"]


def test_server_maximum_of_new_tokens_is_422(client, auth, app):
    limit = app.extensions["gemma_jobs"].settings.max_new_tokens
    error = assert_error(submit(client, auth, max_new_tokens=limit + 1), 422, "invalid_field")
    assert str(limit) in error["message"]


def test_oversized_body_is_413(client, auth, app):
    limit = app.extensions["gemma_jobs"].settings.max_body_bytes
    response = submit(client, auth, prompt="x" * (limit + 10))
    error = assert_error(response, 413, "payload_too_large")
    assert str(limit) in error["message"]


def test_unknown_and_foreign_jobs_are_404(client, auth, app):
    job_id = submit(client, auth).get_json()["id"]
    other = {"Authorization": f"Bearer {make_key(app)}"}
    assert_error(client.get(f"/v1/jobs/{job_id}", headers=other), 404, "not_found")
    assert_error(client.get("/v1/jobs/job_doesnotexist", headers=auth), 404, "not_found")
    assert client.get("/v1/jobs", headers=other).get_json()["data"] == []
    assert_error(client.get("/v1/nothing-here", headers=auth), 404, "not_found")
    not_allowed = client.delete("/v1/generations", headers=auth)
    error = assert_error(not_allowed, 405, "method_not_allowed")
    # RFC 9110: a 405 names the methods the resource has; so does the message.
    assert not_allowed.headers["Allow"] == "OPTIONS, POST" and "use OPTIONS, POST" in error["message"]


def test_made_up_methods_add_no_metric_series(client):
    """/metrics needs no key: a series per method anyone sends would grow the page without end."""
    series = re.compile(r'gemma_jobs_http_requests_total\{method="other",route="unmatched",status="405"\} (\S+)')

    def other_methods_counted() -> float:
        found = series.search(client.get("/metrics").get_data(as_text=True))
        return float(found.group(1)) if found else 0.0

    before = other_methods_counted()
    for method in ("AAAA", "AAAB", "ZZ1"):
        assert client.open("/healthz", method=method).status_code == 405
    assert other_methods_counted() == before + 3
    page = client.get("/metrics").get_data(as_text=True)
    assert "AAAA" not in page and "ZZ1" not in page


def test_a_repeated_query_parameter_is_422_not_its_first_value(client, auth):
    error = assert_error(client.get("/v1/jobs?limit=2&limit=50", headers=auth), 422, "invalid_field")
    assert "'limit' is given more than once" in error["message"]
    assert [detail["field"] for detail in error["details"]] == ["limit"]


def test_list_is_newest_first_with_a_cursor(client, auth):
    ids = [submit(client, auth).get_json()["id"] for _ in range(5)]
    seen, after = [], None
    while True:
        query = "/v1/jobs?limit=2" + (f"&after={after}" if after else "")
        page = client.get(query, headers=auth).get_json()
        seen += [job["id"] for job in page["data"]]
        if not page["has_more"]:
            assert page["next_after"] is None
            break
        after = page["next_after"]
    assert seen == list(reversed(ids))


def test_list_filters_and_bad_query(client, auth):
    submit(client, auth)
    assert len(client.get("/v1/jobs?status=queued", headers=auth).get_json()["data"]) == 1
    assert client.get("/v1/jobs?status=succeeded", headers=auth).get_json()["data"] == []
    assert client.get("/v1/jobs?kind=fine_tune", headers=auth).get_json()["data"] == []
    error = assert_error(client.get("/v1/jobs?limit=1000", headers=auth), 422, "invalid_field")
    assert error["details"][0]["field"] == "limit"
    assert_error(client.get("/v1/jobs?status=done", headers=auth), 422, "invalid_field")


def test_prefer_wait_returns_202_when_nothing_finishes(client, auth):
    started = time.monotonic()
    response = client.post(
        "/v1/generations",
        json={"model": "gemma-3-270m", "prompt": "Hi"},
        headers={**auth, "Prefer": "wait=1"},
    )
    assert response.status_code == 202
    assert response.headers["Preference-Applied"] == "wait=1"
    assert 0.9 <= time.monotonic() - started < 4


def test_models_lists_the_registry(client, auth):
    models = client.get("/v1/models", headers=auth).get_json()
    assert [model["id"] for model in models["data"]] == ["gemma-3-270m"]
    assert models["data"][0]["context_length"] == 32768


def test_health_readiness_and_openapi(client):
    assert client.get("/healthz").get_json()["status"] == "ok"
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.get_json()["checks"] == {"database": "ok", "redis": "ok"}
    document = client.get("/openapi.json").get_json()
    assert document["openapi"].startswith("3.1")
    assert set(document["paths"]) >= {"/v1/generations", "/v1/jobs", "/v1/jobs/{job_id}", "/v1/models"}
    schemas = document["components"]["schemas"]
    assert "prompt" in schemas["GenerationRequest"]["properties"]
    assert schemas["Job"]["properties"]["status"]["enum"] == ["queued", "running", "succeeded", "failed", "cancelled"]
    refs = {v for v in _refs(document)}
    assert all(ref.removeprefix("#/components/schemas/") in schemas for ref in refs)


GENERATION_BODIES = [
    {"prompt": "Hello"},
    {"messages": [{"role": "user", "content": "Hi"}]},
    {"prompt": "Hello", "messages": None},
    {"prompt": "Hello", "stop": "\n"},  # one string is a list of one
    {"prompt": "Hello", "stop": ["\n", "."]},
    {},  # neither messages nor prompt
    {"prompt": "Hello", "messages": [{"role": "user", "content": "Hi"}]},  # both
    {"prompt": "Hello", "stop": [""]},
    {"prompt": "Hello", "stop": ""},
    {"prompt": "Hello", "max_new_tokens": 2048},
    {"prompt": "Hello", "max_new_tokens": 2049},  # the server's cap, under the schema's own 32768
    {"prompt": "Hello", "timeout_s": 3600},
    {"prompt": "Hello", "timeout_s": 3600.5},
    {"prompt": "Hello", "ttl_s": 7 * 86400 + 1},
    {"messages": [{"role": "user", "content": "Hi"}] * 257},
    {"prompt": "x" * 200_001},
]


@pytest.mark.parametrize("body", GENERATION_BODIES, ids=range(len(GENERATION_BODIES)))
def test_the_openapi_document_accepts_the_generation_bodies_the_server_accepts(client, auth, body):
    """A client that validates against the served document sends what the server takes, and only that."""
    document = client.get("/openapi.json").get_json()
    schema = {"$ref": "#/components/schemas/GenerationRequest", "components": document["components"]}
    body = {"model": "gemma-3-270m", **body}
    answer = client.post("/v1/generations", json=body, headers=auth)
    assert answer.status_code in (202, 422), answer.get_data(as_text=True)
    assert jsonschema_rs.Draft202012Validator(schema).is_valid(body) == (answer.status_code == 202)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"prompt": "a\x00b"}, "prompt"),
        ({"prompt": None, "messages": [{"role": "user", "content": "a\x00"}]}, "messages.0.content"),
        ({"stop": ["\x00"]}, "stop.0"),
        ({"metadata": {"team": "a\x00"}}, "metadata.team"),
    ],
)
def test_a_nul_character_is_422_naming_its_field_not_a_500(client, auth, fields, field):
    """PostgreSQL cannot store NUL in text or JSON: it was an unhandled error there."""
    error = assert_error(submit(client, auth, **fields), 422, "invalid_field")
    assert [detail["field"] for detail in error["details"]] == [field] and "NUL" in error["message"]


def test_the_openapi_document_declares_the_headers_and_every_route(client):
    document = client.get("/openapi.json").get_json()
    submit = document["paths"]["/v1/generations"]["post"]["responses"]
    assert set(submit["429"]["headers"]) == {"Retry-After", "RateLimit-Policy", "RateLimit"}
    assert {"Location", "Idempotent-Replayed", "Preference-Applied"} <= set(submit["202"]["headers"])
    assert "WWW-Authenticate" in submit["401"]["headers"]
    assert "text/plain" in document["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert "/openapi.json" in document["paths"]


def _refs(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def test_readiness_is_503_without_redis(database_url, tmp_path):
    settings = load_settings(database_url=database_url, redis_url="redis://127.0.0.1:1/0", data_dir=tmp_path)
    response = create_app(settings).test_client().get("/readyz")
    assert response.status_code == 503
    body = response.get_json()
    assert body["checks"]["redis"].startswith("error")
    assert body["error"]["code"] == "not_ready" and "redis" in body["error"]["message"]


def test_a_wait_without_redis_reads_the_row_until_the_job_ends(database_url, tmp_path):
    """Without pub/sub a wait answered at once, yet said `Preference-Applied: wait=N`."""
    import threading

    from shared import job_store
    from tests.integration.helpers import RESULT, USAGE, claim

    settings = load_settings(database_url=database_url, redis_url="redis://127.0.0.1:1/0", data_dir=tmp_path)
    app = create_app(settings)
    client, auth = app.test_client(), {"Authorization": f"Bearer {make_key(app)}"}
    body = {"model": "gemma-3-270m", "prompt": "Hello", "max_new_tokens": 4}
    started = time.monotonic()
    waited = client.post("/v1/generations", json=body, headers={**auth, "Prefer": "wait=1"})
    assert waited.status_code == 202 and waited.headers["Preference-Applied"] == "wait=1"
    assert time.monotonic() - started >= 1.0

    db = Database(database_url)

    def act_as_worker() -> None:
        job_id, deadline = None, time.monotonic() + 10
        while job_id is None and time.monotonic() < deadline:
            time.sleep(0.5)
            with db.session_scope(read_only=True) as session:
                job_id = session.query(Job.id).filter(Job.status == "queued", Job.id != waited.get_json()["id"]).scalar()
        held = claim(db, job_id, "worker-a")
        with db.session_scope() as session:
            assert job_store.finish(session, held, "worker-a", result=RESULT, usage=USAGE)

    worker = threading.Thread(target=act_as_worker)
    worker.start()
    started = time.monotonic()
    finished = client.post("/v1/generations", json={**body, "prompt": "Hi"}, headers={**auth, "Prefer": "wait=20"})
    worker.join()
    assert finished.status_code == 200 and finished.get_json()["status"] == "succeeded"
    assert time.monotonic() - started < 5
    db.dispose()


def test_submit_without_redis_keeps_the_job(database_url, tmp_path):
    """Redis down at submit: the committed job is kept (queued) and the client gets its id."""
    settings = load_settings(database_url=database_url, redis_url="redis://127.0.0.1:1/0", data_dir=tmp_path)
    app = create_app(settings)
    response = submit(app.test_client(), {"Authorization": f"Bearer {make_key(app)}"})
    assert response.status_code == 202
    with Database(database_url).session_scope() as session:
        assert session.get(Job, response.get_json()["id"]).status == "queued"
