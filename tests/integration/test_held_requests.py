"""The gateway's cap on held requests, on a real database and Redis: past it an event stream is
refused with a 503 that says what to do, a `Prefer: wait` or `"stream": true` submit answers
at once as a plain submit (its job recorded once), and every place comes back when its
request ends, even a stream the client never read."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import func, select
from structlog.testing import capture_logs

from services.gateway import create_app
from shared.models import Job
from shared.settings import load_settings
from tests.integration.helpers import assert_error, make_key, submit

pytestmark = pytest.mark.timeout(60)

STREAM = {"Accept": "text/event-stream"}


@pytest.fixture()
def capped(database_url, redis_url, tmp_path, redis_client):
    """A gateway app whose process holds at most two requests."""
    settings = load_settings(database_url=database_url, redis_url=redis_url, data_dir=tmp_path / "var",
                             max_held_requests=2, max_held_requests_per_key=2, max_wait_s=5)
    app = create_app(settings)
    yield app
    app.extensions["gemma_jobs"].db.dispose()


def held(app) -> int:
    return app.extensions["gemma_jobs"].held.held


def job_count(app) -> int:
    with app.extensions["gemma_jobs"].db.session_scope(read_only=True) as session:
        return session.scalar(select(func.count()).select_from(Job))


def open_stream(client, auth, job_id: str):
    response = client.get(f"/v1/jobs/{job_id}/events", headers={**auth, **STREAM})
    assert response.status_code == 200, response.get_data(as_text=True)
    assert next(response.response)  # the stream has begun: its first keep-alive
    return response


def test_past_the_cap_streams_are_refused_and_waits_answer_at_once(capped):
    client = capped.test_client()
    auth = {"Authorization": f"Bearer {make_key(capped)}"}
    job_id = submit(client, auth).get_json()["id"]
    streams = [open_stream(client, auth, job_id) for _ in range(2)]
    assert held(capped) == 2

    refused = client.get(f"/v1/jobs/{job_id}/events", headers={**auth, **STREAM})
    error = assert_error(refused, 503, "busy")
    assert refused.headers["Retry-After"] == "2"
    assert "limit of 2 open event streams" in error["message"] and "poll" in error["message"]
    # A job of another key is still a 404 first, not a 503.
    other = {"Authorization": f"Bearer {make_key(capped)}"}
    assert_error(client.get(f"/v1/jobs/{job_id}/events", headers={**other, **STREAM}), 404, "not_found")
    # Requests that hold nothing are answered as ever.
    assert client.get(f"/v1/jobs/{job_id}", headers=auth).status_code == 200
    assert client.get(f"/v1/jobs/{job_id}/events", headers=auth).status_code == 200

    # A submit asking to wait answers at once, without saying the wait was applied.
    before, started = job_count(capped), time.monotonic()
    waited = submit(client, {**auth, "Prefer": "wait=5"})
    assert waited.status_code == 202 and time.monotonic() - started < 2
    assert "Preference-Applied" not in waited.headers
    # A submit asking for its stream gets the job, whose Location serves the stream later.
    streamed = submit(client, auth, stream=True)
    assert streamed.status_code == 202 and streamed.headers["Content-Type"] == "application/json"
    assert streamed.headers["Location"] == f"/v1/jobs/{streamed.get_json()['id']}"
    assert job_count(capped) == before + 2  # each recorded once
    assert held(capped) == 2

    streams[0].close()
    assert held(capped) == 1
    open_stream(client, auth, job_id).close()
    streams[1].close()
    assert held(capped) == 0


def test_one_key_takes_at_most_its_share_of_the_places(database_url, redis_url, tmp_path, redis_client):
    """One key's streams took every place: every other key's streams were refused, and its
    `Prefer: wait` and `"stream": true` submits answered at once."""
    settings = load_settings(database_url=database_url, redis_url=redis_url, data_dir=tmp_path / "var",
                             max_held_requests=4, max_wait_s=5)
    assert settings.held_requests_per_key == 2  # half the process's places by default
    app = create_app(settings)
    try:
        client = app.test_client()
        hog, other = ({"Authorization": f"Bearer {make_key(app)}"} for _ in range(2))
        hogs_job, others_job = (submit(client, auth).get_json()["id"] for auth in (hog, other))
        streams = [open_stream(client, hog, hogs_job) for _ in range(2)]
        error = assert_error(client.get(f"/v1/jobs/{hogs_job}/events", headers={**hog, **STREAM}), 503, "busy")
        assert "already holds 2 open event streams" in error["message"] and "its share" in error["message"]
        assert submit(client, {**hog, "Prefer": "wait=0.2"}).headers.get("Preference-Applied") is None
        assert held(app) == 2
        # The other key still finds its places: a stream, and a wait that is applied.
        others = open_stream(client, other, others_job)
        waited = submit(client, {**other, "Prefer": "wait=0.2"})
        assert waited.headers["Preference-Applied"] == "wait=0.2"
        for response in [*streams, others]:
            response.close()
        assert held(app) == 0
        open_stream(client, hog, hogs_job).close()  # its places came back
    finally:
        app.extensions["gemma_jobs"].db.dispose()


def test_a_stream_closed_before_its_first_read_gives_its_place_back(capped):
    client = capped.test_client()
    auth = {"Authorization": f"Bearer {make_key(capped)}"}
    job_id = submit(client, auth).get_json()["id"]
    for _ in range(3):
        unread = [client.get(f"/v1/jobs/{job_id}/events", headers={**auth, **STREAM}) for _ in range(2)]
        assert [response.status_code for response in unread] == [200, 200] and held(capped) == 2
        for response in unread:
            response.close()
        assert held(capped) == 0


def test_a_wait_holds_a_place_only_while_it_waits(capped):
    client = capped.test_client()
    auth = {"Authorization": f"Bearer {make_key(capped)}"}
    waited = submit(client, {**auth, "Prefer": "wait=0.2"})
    assert waited.status_code == 202 and waited.headers["Preference-Applied"] == "wait=0.2"
    assert held(capped) == 0
    # A stream asked for in the submit holds its place until it is closed.
    streamed = submit(client, auth, stream=True)
    assert streamed.status_code == 200 and held(capped) == 1
    streamed.close()
    assert held(capped) == 0


def test_a_cap_that_leaves_no_thread_free_is_warned_of(database_url, redis_url, tmp_path):
    settings = load_settings(database_url=database_url, redis_url=redis_url, data_dir=tmp_path / "var",
                             gateway_threads=8, max_held_requests=8)
    with capture_logs() as logs:
        create_app(settings).extensions["gemma_jobs"].db.dispose()
    assert [(line["cap"], line["threads"]) for line in logs
            if line["event"] == "held_requests_cap_not_below_threads"] == [(8, 8)]


def test_the_cap_is_the_threads_less_four_unless_set(tmp_path):
    assert load_settings(data_dir=tmp_path).held_requests_cap == 12  # 16 threads by default
    assert load_settings(data_dir=tmp_path, gateway_threads=64).held_requests_cap == 60
    assert load_settings(data_dir=tmp_path, gateway_threads=3).held_requests_cap == 1
    assert load_settings(data_dir=tmp_path, gateway_threads=64, max_held_requests=8).held_requests_cap == 8
