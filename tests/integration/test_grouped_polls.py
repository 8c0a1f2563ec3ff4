"""Concurrent polls on PostgreSQL share one read; each still gets its own job, as fresh as its request."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from services.domain import jobs as job_domain
from shared import job_store
from tests.integration.helpers import RESULT, USAGE, claim, make_key, submit


@pytest.fixture()
def context(app):
    context = app.extensions["gemma_jobs"]
    if context.poll_reads is None:
        pytest.skip("polls are grouped on PostgreSQL only (a SQLite read is local)")
    return context


def test_grouped_rows_come_back_in_order_and_none_for_unknown_ids(app, client, auth, context):
    first, second = (submit(client, auth).get_json()["id"] for _ in range(2))
    rows = job_domain.read_polled_rows(context.db, [second, "job_unknown", first, second])
    assert [row.id if row else None for row in rows] == [second, None, first, second]
    single = context.db.first(job_domain._POLL_JOB, {"job_id": first})
    assert rows[2] == single


def test_concurrent_polls_each_get_their_own_job_and_others_are_not_found(app, client, auth, context):
    ids = [submit(client, auth).get_json()["id"] for _ in range(6)]
    held = claim(context.db, ids[0], "w1")
    with context.db.session_scope() as session:
        job_store.finish(session, held, "w1", result=RESULT, usage=USAGE)
    stranger = {"Authorization": f"Bearer {make_key(app)}"}

    def poll(args):
        job_id, headers = args
        response = app.test_client().get(f"/v1/jobs/{job_id}", headers=headers)
        return response.status_code, response.get_json()

    requests = [(job_id, auth) for job_id in ids] * 8 + [(ids[1], stranger), ("job_unknown", auth)] * 4
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(poll, requests))
    for (job_id, headers), (status, body) in zip(requests, answers):
        if headers is stranger or job_id == "job_unknown":
            assert status == 404 and body["error"]["code"] == "not_found"
        else:
            assert status == 200 and body["id"] == job_id
            assert body["status"] == ("succeeded" if job_id == ids[0] else "queued")
    assert {body["usage"]["completion_tokens"] for (job_id, _), (_, body) in zip(requests, answers)
            if job_id == ids[0]} == {1}


def test_a_poll_sees_a_change_committed_before_it_was_sent(app, client, auth, context):
    job_id = submit(client, auth).get_json()["id"]
    assert client.get(f"/v1/jobs/{job_id}", headers=auth).get_json()["status"] == "queued"
    client.post(f"/v1/jobs/{job_id}/cancel", headers=auth)
    assert client.get(f"/v1/jobs/{job_id}", headers=auth).get_json()["status"] == "cancelled"
