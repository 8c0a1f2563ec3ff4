"""Cancel and Idempotency-Key through the gateway, on SQLite and PostgreSQL with real Redis."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import func, select, update

from services.domain.jobs import request_hash
from services.domain.keys import create_key
from shared import job_store
from shared.models import Job
from shared.schemas import GenerationRequest
from tests.integration.helpers import QUEUE, answers_at_once, assert_error, make_key, submit


def db_of(app):
    return app.extensions["gemma_jobs"].db


def test_cancel_a_queued_job_and_again(client, auth, app):
    job_id = submit(client, auth).get_json()["id"]
    first = client.post(f"/v1/jobs/{job_id}/cancel", headers=auth)
    assert first.status_code == 200 and first.get_json()["status"] == "cancelled"
    again = client.post(f"/v1/jobs/{job_id}/cancel", headers=auth)
    assert again.status_code == 200 and again.get_json()["status"] == "cancelled"
    assert client.get(f"/v1/jobs/{job_id}", headers=auth).get_json()["finished_at"] is not None


def test_cancel_a_finished_job_is_409(client, auth, app):
    job_id = submit(client, auth).get_json()["id"]
    held = job_store.claim(db_of(app), job_id, "w", device="cpu", lease_s=30, max_attempts=3)
    with db_of(app).session_scope() as session:
        job_store.finish(session, held, "w", result={"text": "x", "finish_reason": "stop", "token_ids": [1]},
                         usage={"prompt_tokens": 1, "completion_tokens": 1, "gpu_seconds": 0.1})
    error = assert_error(client.post(f"/v1/jobs/{job_id}/cancel", headers=auth), 409, "job_finished")
    assert "already succeeded" in error["message"]


def test_cancel_someone_elses_job_is_404(client, auth, app):
    job_id = submit(client, auth).get_json()["id"]
    other = {"Authorization": f"Bearer {make_key(app)}"}
    assert_error(client.post(f"/v1/jobs/{job_id}/cancel", headers=other), 404, "not_found")
    assert_error(client.post("/v1/jobs/job_nope/cancel", headers=auth), 404, "not_found")


def test_same_idempotency_key_and_body_gives_the_same_job(client, auth, app, redis_client):
    headers = {**auth, "Idempotency-Key": "order-17"}
    first = submit(client, headers)
    # Same meaning, different field order and explicit defaults.
    body = {"max_new_tokens": 4, "prompt": "Hello", "model": "gemma-3-270m", "temperature": 1.0}
    second = client.post("/v1/generations", json=body, headers=headers)
    assert first.status_code == second.status_code == 202
    assert first.get_json()["id"] == second.get_json()["id"]
    assert second.headers["Idempotent-Replayed"] == "true"
    assert redis_client.llen(QUEUE) == 1  # published once
    with db_of(app).session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 1


def test_the_servers_defaults_sent_explicitly_replay_the_same_job(client, auth, app):
    """`max_new_tokens` and `timeout_s` default to settings: sent equal to them, they mean the same."""
    settings = app.extensions["gemma_jobs"].settings
    headers = {**auth, "Idempotency-Key": "order-19"}
    body = {"model": "gemma-3-270m", "prompt": "Hello"}
    first = client.post("/v1/generations", json=body, headers=headers).get_json()["id"]
    for explicit in ({"max_new_tokens": settings.default_max_new_tokens}, {"timeout_s": settings.default_timeout_s},
                     {"max_new_tokens": settings.default_max_new_tokens, "timeout_s": int(settings.default_timeout_s)}):
        replay = client.post("/v1/generations", json={**body, **explicit}, headers=headers)
        assert replay.status_code == 202 and replay.get_json()["id"] == first, replay.get_json()
    other = {**body, "max_new_tokens": settings.default_max_new_tokens + 1}
    assert_error(client.post("/v1/generations", json=other, headers=headers), 409, "idempotency_key_reused")
    # The other way round: explicit first, then left out.
    headers = {**auth, "Idempotency-Key": "order-20"}
    explicit_first = client.post("/v1/generations", json={**body, "timeout_s": settings.default_timeout_s},
                                 headers=headers).get_json()["id"]
    assert client.post("/v1/generations", json=body, headers=headers).get_json()["id"] == explicit_first


def test_a_job_stored_with_the_body_as_sent_still_replays(client, auth, app):
    """Jobs recorded before explicit defaults counted as left out kept the hash of the body as sent."""
    settings = app.extensions["gemma_jobs"].settings
    headers = {**auth, "Idempotency-Key": "order-21"}
    body = {"model": "gemma-3-270m", "prompt": "Hello", "max_new_tokens": settings.default_max_new_tokens}
    job_id = client.post("/v1/generations", json=body, headers=headers).get_json()["id"]
    with db_of(app).session_scope() as session:
        session.get(Job, job_id).request_hash = request_hash(GenerationRequest(**body))
    assert client.post("/v1/generations", json=body, headers=headers).get_json()["id"] == job_id


def test_same_key_with_another_body_is_409(client, auth):
    headers = {**auth, "Idempotency-Key": "order-18"}
    submit(client, headers)
    error = assert_error(submit(client, headers, prompt="Something else"), 409, "idempotency_key_reused")
    assert "different request body" in error["message"]
    assert_error(submit(client, {**auth, "Idempotency-Key": "k" * 201}), 422, "invalid_field")


def test_idempotency_keys_belong_to_their_api_key(client, auth, app):
    other = {"Authorization": f"Bearer {make_key(app)}", "Idempotency-Key": "shared-name"}
    mine = submit(client, {**auth, "Idempotency-Key": "shared-name"}).get_json()["id"]
    theirs = submit(client, other).get_json()["id"]
    assert mine != theirs


def test_concurrent_submits_with_one_key_make_one_job(app, auth, redis_client):
    results = []

    def send():
        response = submit(app.test_client(), {**auth, "Idempotency-Key": "race"})
        results.append((response.status_code, response.get_json()["id"]))

    threads = [threading.Thread(target=send) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {status for status, _ in results} == {202}
    assert len({job_id for _, job_id in results}) == 1
    assert redis_client.llen(QUEUE) == 1


@pytest.mark.parametrize("limit", [{"max_concurrent": 1}, {"rpm": 1}])
def test_concurrent_retries_of_a_limited_keys_submit_get_its_job_not_a_429(app, redis_client, limit):
    """Each retry looked for the job before waiting on the key's lock; the first submit's job,
    committed meanwhile, then counted against the key, and the retry got a 429 for a job that exists."""
    with db_of(app).session_scope() as session:
        _, plaintext = create_key(session, role="user", **limit)
    headers = {"Authorization": f"Bearer {plaintext}", "Idempotency-Key": "limited-race"}
    results = answers_at_once(lambda: submit(app.test_client(), headers), 8)
    assert {status for status, _ in results} == {202}, results
    assert len({job_id for _, job_id in results}) == 1
    assert redis_client.llen(QUEUE) == 1
    # A new submit of the key is limited as ever.
    assert_error(submit(app.test_client(), {**headers, "Idempotency-Key": "another"}), 429, "rate_limited")


def test_deadline_fields_have_server_maxima(client, auth, app):
    settings = app.extensions["gemma_jobs"].settings
    error = assert_error(submit(client, auth, timeout_s=settings.max_timeout_s + 1), 422, "invalid_field")
    assert error["details"][0]["field"] == "timeout_s"
    error = assert_error(submit(client, auth, ttl_s=settings.max_ttl_s + 1), 422, "invalid_field")
    assert error["details"][0]["field"] == "ttl_s"
    assert_error(submit(client, auth, ttl_s=0), 422, "invalid_field")
    job_id = submit(client, auth, ttl_s=30, timeout_s=5).get_json()["id"]
    with db_of(app).session_scope() as session:
        job = session.get(Job, job_id)
        assert job.params["timeout_s"] == 5
        assert 29 <= (job.expires_at - job.created_at).total_seconds() <= 31


def test_cancel_waits_for_a_concurrent_writer_instead_of_failing(client, auth, app):
    """SQLite: a read-then-write transaction must queue behind another writer, not error out."""
    job_id = submit(client, auth).get_json()["id"]
    writer_has_lock = threading.Event()

    def slow_writer():
        with db_of(app).session_scope() as session:
            session.execute(update(Job).where(Job.id == job_id).values(metadata_={"touched": "yes"}))
            writer_has_lock.set()
            time.sleep(1.0)

    thread = threading.Thread(target=slow_writer)
    thread.start()
    writer_has_lock.wait(5)
    response = client.post(f"/v1/jobs/{job_id}/cancel", headers=auth)
    thread.join()
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json()["status"] == "cancelled"


def test_cancel_of_a_job_being_handed_back_cancels_it(client, auth, app):
    """A running job goes back to the queue (its worker stopping) while a cancel runs: the cancel
    must find it queued, not answer 409 "already queued" and let it run."""
    job_id = submit(client, auth).get_json()["id"]
    held = job_store.claim(db_of(app), job_id, "w", device="cpu", lease_s=30, max_attempts=3)
    handing_back = db_of(app).session_scope()
    session = handing_back.__enter__()
    assert job_store.hand_back(session, held, "w")  # running -> queued, not yet committed
    results = []
    cancelling = threading.Thread(target=lambda: results.append(client.post(f"/v1/jobs/{job_id}/cancel", headers=auth)))
    cancelling.start()
    time.sleep(0.5)  # the cancel's UPDATEs meet the uncommitted hand-back
    handing_back.__exit__(None, None, None)
    cancelling.join(30)
    assert results[0].status_code == 200, results[0].get_data(as_text=True)
    assert results[0].get_json()["status"] == "cancelled"


def test_deeply_nested_json_is_400(client, auth):
    response = client.post("/v1/generations", data="[" * 100_000, headers={**auth, "Content-Type": "application/json"})
    assert_error(response, 400, "malformed_request")
