"""The gateway while its database cannot be reached (real Redis and PostgreSQL): a process starts
(gunicorn shut the whole gateway down when a worker replaced during an outage could not boot),
says it is not ready and still serves its metrics; requests answer 503 `database_unavailable`
with Retry-After (they were 500s with a traceback each), an open event stream says so before it
ends; a submit whose read after its commit fails answers with the job as recorded."""

from __future__ import annotations

import io
import json

import psycopg
import pytest
from sqlalchemy import func, select
from structlog.testing import capture_logs

from services.domain.keys import create_key
from services.gateway import create_app
from shared.models import Job
from shared.db import Database
from shared.keys import generate_key
from shared.settings import load_settings
from tests.integration.helpers import assert_error, cut_off, submit
from tests.integration.test_streaming import sse_events, stream

pytestmark = pytest.mark.timeout(60)

UNREACHABLE = "postgresql://gemma@127.0.0.1:1/gemma_jobs"


def test_a_gateway_process_starts_and_serves_metrics_while_the_database_is_down(tmp_path, redis_url, redis_client):
    settings = load_settings(database_url=UNREACHABLE, redis_url=redis_url, data_dir=tmp_path / "var")
    with capture_logs() as logs:
        app = create_app(settings)
    assert [entry["event"] for entry in logs if entry["event"] == "schema_not_checked"] == ["schema_not_checked"]
    client = app.test_client()
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.get_json()["error"]["code"] == "not_ready"
    page = client.get("/metrics")
    assert page.status_code == 200
    assert "gemma_jobs_database_up 0.0" in page.text
    assert 'gemma_jobs_http_requests_total{method="GET",route="/readyz",status="503"}' in page.text
    app.extensions["gemma_jobs"].db.dispose()


def test_the_metrics_say_when_the_database_is_up(client):
    assert "gemma_jobs_database_up 1.0" in client.get("/metrics").text


def _break_the_read_connection(app, postgres_admin_url) -> None:
    """Kill the server side of the connection the gateway reads jobs back on (as a database
    restart does), within the second it is not pinged: its next read fails."""
    db = app.extensions["gemma_jobs"].db
    pid = db.first(select(func.pg_backend_pid().label("pid")), {}).pid
    with psycopg.connect(postgres_admin_url, autocommit=True) as connection:
        connection.execute("SELECT pg_terminate_backend(%s)", (pid,))


def _jobs(app) -> int:
    with app.extensions["gemma_jobs"].db.session_scope(read_only=True) as session:
        return session.scalar(select(func.count()).select_from(Job))


@pytest.mark.parametrize("kind", ["generation", "fine_tune"])
def test_a_submit_whose_read_back_fails_after_its_commit_answers_202(client, app, database_url,
                                                                     postgres_admin_url, kind):
    """It answered 500 for a job that was recorded, and the client's retry recorded a second."""
    if not database_url.startswith("postgresql"):
        pytest.skip("the read-back runs on a connection of its own on PostgreSQL only")
    # A key with limits: its submit commits in a transaction of the pool, not on the connection broken.
    with app.extensions["gemma_jobs"].db.session_scope() as session:
        _, plaintext = create_key(session, role="user", rpm=1000)
    auth = {"Authorization": f"Bearer {plaintext}"}
    if kind == "generation":
        send = lambda: submit(client, {**auth, "Prefer": "wait=0.1"})  # noqa: E731
    else:
        form = {"file": (io.BytesIO(b'{"prompt": "2+2=", "completion": "4"}\n'), "t.jsonl"), "purpose": "fine-tune"}
        training = client.post("/v1/files", data=form, headers=auth, content_type="multipart/form-data")
        body = {"base_model": "gemma-3-270m", "training_file": training.get_json()["id"]}
        send = lambda: client.post("/v1/fine-tunes", json=body, headers=auth)  # noqa: E731
    before = _jobs(app)
    with capture_logs() as logs:
        _break_the_read_connection(app, postgres_admin_url)
        response = send()
    assert response.status_code == 202, response.get_data(as_text=True)
    job = response.get_json()
    assert (job["kind"], job["status"]) == (kind, "queued") and response.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert any(entry["event"] == "submit_answered_as_recorded" for entry in logs)
    assert _jobs(app) == before + 1
    assert client.get(f"/v1/jobs/{job['id']}", headers=auth).status_code == 200


def _assert_database_unavailable(response) -> None:
    error = assert_error(response, 503, "database_unavailable")
    assert "retry" in error["message"] and response.headers["Retry-After"] == "2"


def test_requests_answer_503_database_unavailable_while_the_database_is_down(tmp_path, redis_url, redis_client):
    settings = load_settings(database_url=UNREACHABLE, redis_url=redis_url, data_dir=tmp_path / "var")
    app = create_app(settings)
    client = app.test_client()
    auth = {"Authorization": f"Bearer {generate_key()}"}
    requests = [
        lambda: client.get("/v1/jobs/job_0123456789", headers=auth),  # the fast poll path hands it to Flask
        lambda: submit(client, auth),  # the fast submit path too: the key cannot be checked
        lambda: client.get("/v1/jobs/job_0123456789/events", headers=auth),
        lambda: client.get("/v1/jobs/job_0123456789/events", headers={**auth, "Accept": "text/event-stream"}),
        lambda: client.get("/v1/usage", headers=auth),
        lambda: client.get("/v1/admin/keys", headers=auth),
        lambda: client.post("/v1/jobs/job_0123456789/cancel", headers=auth),
    ]
    with capture_logs() as logs:
        for send in requests:
            _assert_database_unavailable(send())
    events = [entry["event"] for entry in logs]
    assert events.count("database_unavailable") == len(requests) and "unhandled_error" not in events
    assert client.get("/healthz").status_code == 200  # the process serves on
    app.extensions["gemma_jobs"].db.dispose()


def _postgres_only(database_url: str) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("a SQLite file cannot be taken away from a process that has it open")


def test_a_plain_submit_whose_commit_fails_answers_503_and_records_nothing(client, app, auth, database_url,
                                                                           postgres_admin_url):
    """The fast submit path answered 500 once recording had begun, whatever the error."""
    _postgres_only(database_url)
    assert submit(client, auth).status_code == 202  # the key is now cached: the submit gets to its commit
    before = _jobs(app)
    with cut_off(database_url, postgres_admin_url), capture_logs() as logs:
        _assert_database_unavailable(submit(client, auth))
    assert "unhandled_error" not in [entry["event"] for entry in logs]
    fresh = Database(database_url)  # the app's pooled connections were ended: a new one counts
    with fresh.session_scope(read_only=True) as session:
        assert session.scalar(select(func.count()).select_from(Job)) == before
    fresh.dispose()
    assert submit(client, auth).status_code == 202  # and once it is back, submits go on


def test_an_open_event_stream_says_the_database_is_unavailable_before_it_ends(client, app, auth, database_url,
                                                                             postgres_admin_url):
    """It ended without a word (the server logged a traceback): a client could not tell an
    outage from the end of the job."""
    _postgres_only(database_url)
    job_id = submit(client, auth).get_json()["id"]
    response = stream(client, auth, job_id)
    with cut_off(database_url, postgres_admin_url):
        # Its first database read fails, and the stream ends.
        text = b"".join(response.response).decode()
    [frame] = [frame for frame in text.split("\n\n") if frame and not frame.startswith(":")]
    fields = dict(line.split(": ", 1) for line in frame.split("\n"))
    assert fields["event"] == "error" and fields["retry"] == "2000"  # EventSource reconnects in 2 s
    error = json.loads(fields["data"])
    assert error["code"] == "database_unavailable" and "retry" in error["message"]
    # Once the database is back, a client resumes from the frame's id, and its stream ends as usual.
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=auth).status_code == 200
    resumed = stream(client, auth, job_id, **{"Last-Event-ID": fields["id"]})
    assert [(event.name, event.data["status"]) for event in sse_events(resumed)] == [
        ("status", "cancelled"), ("done", "cancelled")]
