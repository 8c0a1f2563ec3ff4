"""Per-key limits through the gateway: headers, refusals, settling, on SQLite and PostgreSQL."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from services.domain.keys import create_key
from shared import job_store
from shared.models import Job, RateLimitWindow
from tests.integration.helpers import assert_error, submit


def key_with(app, **limits) -> dict[str, str]:
    with app.extensions["gemma_jobs"].db.session_scope() as session:
        _, plaintext = create_key(session, role="user", **limits)
    return {"Authorization": f"Bearer {plaintext}"}


def remaining(response, name: str) -> int:
    return int(re.search(rf'"{name}";r=(\d+)', response.headers["RateLimit"]).group(1))


def test_requests_per_minute_are_counted_and_refused_with_headers(client, app):
    headers = key_with(app, rpm=3)
    accepted = [submit(client, headers) for _ in range(3)]
    assert [response.status_code for response in accepted] == [202, 202, 202]
    assert accepted[0].headers["RateLimit-Policy"] == '"requests";q=3;w=60'
    assert [remaining(response, "requests") for response in accepted] == [2, 1, 0]
    refused = submit(client, headers)
    error = assert_error(refused, 429, "rate_limited")
    assert "3 requests per minute" in error["message"]
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert remaining(refused, "requests") == 0
    assert refused.headers["RateLimit-Policy"] == '"requests";q=3;w=60'


def test_a_key_without_limits_gets_no_limit_headers(client, auth, app):
    response = submit(client, auth)
    assert response.status_code == 202 and "RateLimit" not in response.headers
    # Nothing to enforce, so nothing is counted (and the key's row is not locked).
    with app.extensions["gemma_jobs"].db.session_scope() as session:
        assert session.scalars(select(RateLimitWindow)).all() == []
        assert session.get(Job, response.get_json()["id"]).rate_window_start is None


def test_server_default_limits_apply_to_keys_without_their_own(settings, redis_client):
    from services.gateway import create_app

    app = create_app(settings.model_copy(update={"default_rpm": 1}))
    client = app.test_client()
    headers = key_with(app)
    assert submit(client, headers).status_code == 202
    assert_error(submit(client, headers), 429, "rate_limited")
    own = key_with(app, rpm=5)
    assert submit(client, own).status_code == 202 and submit(client, own).status_code == 202


def test_tokens_are_reserved_then_settled_to_what_was_used(client, app):
    headers = key_with(app, tpm=100)
    first = submit(client, headers, max_new_tokens=60)  # reserves 3 ("Hello", estimated) + 60
    assert first.status_code == 202 and remaining(first, "tokens") == 37
    error = assert_error(submit(client, headers, max_new_tokens=60), 429, "rate_limited")
    assert "100 tokens per minute" in error["message"]
    assert_error(submit(client, headers, max_new_tokens=101), 422, "invalid_field")
    # The first job ends having used 3 + 7 tokens: the budget gets the difference back.
    db = app.extensions["gemma_jobs"].db
    held = job_store.claim(db, first.get_json()["id"], "w", device="cpu", lease_s=30, max_attempts=3)
    with db.session_scope() as session:
        job_store.finish(session, held, "w", result={"text": ""},
                         usage={"prompt_tokens": 3, "completion_tokens": 7, "gpu_seconds": 0.1})
    with db.session_scope() as session:
        assert session.scalars(select(RateLimitWindow.tokens)).one() == 10
    second = submit(client, headers, max_new_tokens=60)
    assert second.status_code == 202 and remaining(second, "tokens") == 27


@pytest.mark.parametrize("ending", ["finish", "finish_each", "fail"])
def test_an_overage_counts_in_the_minute_the_job_ends_and_a_refund_in_its_own(client, app, ending):
    """Prompts estimated low (digits, CJK, emoji: 3-16x) used more than they reserved, and the
    difference went to the minute of their submit, long over: a key used several times its
    tokens per minute, every minute."""
    second = job_store.utcnow().second
    if second >= 55:  # all of it within one minute: the settlement's and the next submits'
        time.sleep(61 - second)
    headers = key_with(app, tpm=1000)
    db = app.extensions["gemma_jobs"].db
    earlier = job_store.window_start_of(job_store.utcnow()) - timedelta(minutes=2)
    over, under = (submit(client, headers, max_new_tokens=60).get_json()["id"] for _ in range(2))  # 63 each
    with db.session_scope() as session:  # as if submitted two minutes ago
        session.execute(update(Job).where(Job.id.in_([over, under])).values(rate_window_start=earlier))
        session.execute(update(RateLimitWindow).values(window_start=earlier))
    ends = {over: {"prompt_tokens": 700, "completion_tokens": 60, "gpu_seconds": 0.1},  # 697 over
            under: {"prompt_tokens": 3, "completion_tokens": 10, "gpu_seconds": 0.1}}  # 50 back
    held = [job_store.claim(db, job_id, "w", device="cpu", lease_s=30, max_attempts=3) for job_id in ends]
    if ending == "finish_each":
        assert job_store.finish_each(db, [(claim, {"text": ""}, ends[claim.job_id]) for claim in held], "w") == [
            True, True]
    for claim in held if ending != "finish_each" else []:
        with db.session_scope() as session:
            if ending == "finish":
                assert job_store.finish(session, claim, "w", result={"text": ""}, usage=ends[claim.job_id])
            else:
                assert job_store.fail(session, claim, "w", code="timeout", message="slow", usage=ends[claim.job_id])
    with db.session_scope() as session:
        windows = {start.replace(tzinfo=None): tokens for start, tokens in session.execute(
            select(RateLimitWindow.window_start, RateLimitWindow.tokens)).all()}
    now = job_store.window_start_of(job_store.utcnow())
    assert windows == {earlier.replace(tzinfo=None): 126 - 50, now.replace(tzinfo=None): 697}, windows
    # This minute's admissions count the overage: the key has 1000 - 697 left.
    error = assert_error(submit(client, headers, max_new_tokens=310), 429, "rate_limited")
    assert "697 reserved or used this minute" in error["message"]
    assert submit(client, headers, max_new_tokens=300).status_code == 202


def test_a_settlement_during_a_submit_of_the_same_key_is_not_lost(client, app):
    """A worker settles a reservation into the minute's row while a submit of the key is being
    admitted: the submit must count on top of the settled tokens, not write back what it read
    before (PostgreSQL: the window row was read unlocked and written back whole)."""
    headers = key_with(app, tpm=1000)
    first = submit(client, headers, max_new_tokens=60)  # reserves 63
    db = app.extensions["gemma_jobs"].db
    held = job_store.claim(db, first.get_json()["id"], "w", device="cpu", lease_s=30, max_attempts=3)
    settling = db.session_scope()
    session = settling.__enter__()
    # A failure before any output releases all 63 (a success's usage row would lock the key row
    # too, through its foreign key, and so wait for the submit anyway).
    job_store.fail(session, held, "w", code="model_unavailable", message="no model")  # 63 -> 0, not committed
    with ThreadPoolExecutor(1) as pool:
        second = pool.submit(submit, client, headers, max_new_tokens=60)
        time.sleep(0.5)  # the submit reaches the window row while the settlement holds it
        settling.__exit__(None, None, None)  # commit
        assert second.result(timeout=30).status_code == 202
    with db.session_scope() as session:
        assert session.scalars(select(RateLimitWindow.tokens)).one() == 0 + 63


def test_cancelling_a_queued_job_releases_its_tokens_and_its_slot(client, app):
    headers = key_with(app, tpm=100, max_concurrent=1)
    job_id = submit(client, headers, max_new_tokens=80).get_json()["id"]
    refused = assert_error(submit(client, headers, max_new_tokens=10), 429, "rate_limited")
    assert "1 concurrent jobs" in refused["message"]
    client.post(f"/v1/jobs/{job_id}/cancel", headers=headers)
    response = submit(client, headers, max_new_tokens=80)
    assert response.status_code == 202
    assert remaining(response, "concurrent") == 0 and remaining(response, "tokens") == 17


def test_concurrent_jobs_count_queued_and_running(client, app):
    headers = key_with(app, max_concurrent=2)
    ids = [submit(client, headers).get_json()["id"] for _ in range(2)]
    refused = submit(client, headers)
    assert_error(refused, 429, "rate_limited")
    assert refused.headers["RateLimit-Policy"] == '"concurrent";q=2'
    assert refused.headers["Retry-After"] == "1"
    db = app.extensions["gemma_jobs"].db
    held = job_store.claim(db, ids[0], "w", device="cpu", lease_s=30, max_attempts=3)
    assert submit(client, headers).status_code == 429  # running still counts
    with db.session_scope() as session:
        job_store.fail(session, held, "w", code="x", message="y")
    assert submit(client, headers).status_code == 202


@pytest.mark.parametrize("limit", [{"rpm": 0}, {"tpm": -1}, {"max_concurrent": 0}])
def test_limits_must_be_positive(client, app, limit):
    with app.extensions["gemma_jobs"].db.session_scope() as session:
        _, admin = create_key(session, role="admin")
    response = client.post("/v1/admin/keys", json=limit, headers={"Authorization": f"Bearer {admin}"})
    assert_error(response, 422, "invalid_field")


def test_limits_beyond_32_bits_are_422_not_500(client, app):
    """Found by schemathesis: a huge tpm overflowed PostgreSQL's integer column."""
    with app.extensions["gemma_jobs"].db.session_scope() as session:
        _, admin = create_key(session, role="admin")
    response = client.post("/v1/admin/keys", json={"tpm": 5496872403655857}, headers={"Authorization": f"Bearer {admin}"})
    assert_error(response, 422, "invalid_field")


def test_a_submit_counts_in_the_minute_it_is_admitted_in(client, app, settings):
    """One planned before a minute's end that waited for the key's lock past it counted in the
    minute before, beyond that minute's allowance."""
    from services.domain import limits
    from services.domain.keys import caller_for, find_key, hash_key

    headers = key_with(app, rpm=5)
    plaintext = headers["Authorization"].split()[1]
    db = app.extensions["gemma_jobs"].db
    planned = job_store.utcnow() - timedelta(minutes=2)
    with db.session_scope() as session:
        digest = hash_key(plaintext)
        admission = limits.admit(session, caller_for(find_key(session, digest), digest), settings, 10, planned)
    assert admission.window_start >= job_store.window_start_of(planned) + timedelta(minutes=2)
