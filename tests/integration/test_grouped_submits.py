"""Submits of keys without limits share inserts, commits and publishes; each still gets its own job."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import redis
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError, OperationalError

from services.domain import jobs as job_domain
from services.domain.keys import Caller
from shared.db import Database
from shared.models import Job
from shared.publish import JobPublisher
from shared.schemas import GenerationRequest
from tests.integration.helpers import QUEUE, submit


def _queued_messages(redis_client) -> list[str]:
    return [json.loads(raw)["headers"]["id"] for raw in redis_client.lrange(QUEUE, 0, -1)]


def _plan(app, key_id: str) -> job_domain.NewGeneration:
    time.sleep(0.002)  # ids order by millisecond: planned later, queued later
    context = app.extensions["gemma_jobs"]
    request = GenerationRequest(model="gemma-3-270m", prompt="Hello", max_new_tokens=4)
    return job_domain.plan_generation(Caller(key_id=key_id, role="user"), request, adapter=None,
                                      registry=context.registry, settings=context.settings)


def test_concurrent_submits_are_each_recorded_and_published_once(app, auth, redis_client):
    def post(_):
        return submit(app.test_client(), auth).get_json()

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(post, range(48)))
    ids = [answer["id"] for answer in answers]
    assert len(set(ids)) == 48 and all(answer["status"] == "queued" for answer in answers)
    assert all(0 <= answer["queue_position"] < 48 for answer in answers)
    with app.extensions["gemma_jobs"].db.session_scope(read_only=True) as session:
        assert session.scalar(select(func.count()).select_from(Job).where(Job.id.in_(ids))) == 48
    # One message per job; the queue's consumer end (the list's tail) holds the oldest.
    assert sorted(_queued_messages(redis_client)) == sorted(ids)
    app.extensions["gemma_jobs"].queue_positions.max_age_s = 0
    client = app.test_client()
    polled = {job_id: client.get(f"/v1/jobs/{job_id}", headers=auth).get_json()["queue_position"] for job_id in ids}
    assert sorted(polled.values()) == list(range(48))
    assert [polled[job_id] for job_id in sorted(ids)] == list(range(48))


def test_a_bad_row_fails_only_its_own_submit(app, auth, redis_client):
    context = app.extensions["gemma_jobs"]
    key_id = client_key_id(app, auth)
    good = [_plan(app, key_id) for _ in range(3)]
    orphan = _plan(app, "key_that_does_not_exist")  # breaks the foreign key to api_keys
    outcomes = job_domain.record_generations(context.db, context.publisher, [good[0], orphan, good[1], good[2]])
    assert isinstance(outcomes[1], IntegrityError)
    assert [outcomes[0], outcomes[2], outcomes[3]] == [0, 1, 2]
    assert sorted(_queued_messages(redis_client)) == sorted(job.id for job in good)
    with context.db.session_scope(read_only=True) as session:
        assert session.get(Job, orphan.id) is None
        assert all(session.get(Job, job.id).status == "queued" for job in good)


def test_a_queue_whose_insert_fails_leaves_another_queues_committed_jobs_recorded(app, auth, redis_client):
    """A group spans two queues, one INSERT each: the first commits, the second fails. The
    first queue's job is recorded and published once; it used to be inserted again alone,
    failing as a duplicate: a 500 for a job that runs, and a retry that made a second one."""
    context = app.extensions["gemma_jobs"]
    good = _plan(app, client_key_id(app, auth))
    orphan = _plan(app, "key_that_does_not_exist")  # breaks the foreign key to api_keys
    orphan.row.update(model="gemma-3-270m-other", queue="generation.gemma-3-270m-other")  # an INSERT of its own
    outcomes = job_domain.record_generations(context.db, context.publisher, [good, orphan])
    assert outcomes[0] == 0 and isinstance(outcomes[1], IntegrityError)
    assert _queued_messages(redis_client) == [good.id]
    with context.db.session_scope(read_only=True) as session:
        assert session.get(Job, good.id).status == "queued" and session.get(Job, orphan.id) is None


def test_a_group_meets_a_database_that_is_down_once_not_once_a_job(app, auth, redis_client):
    """Each job was tried alone after the group failed: N+1 failed connections in a row, each up
    to the connect timeout, while every later group of the process waited."""
    context = app.extensions["gemma_jobs"]
    jobs = [_plan(app, client_key_id(app, auth)) for _ in range(4)]
    with socket.create_server(("127.0.0.1", 0)) as server:  # a database that hangs up on every client
        accepted = []

        def hang_up() -> None:
            while True:
                try:
                    client, _ = server.accept()
                except OSError:  # closed: the test is over
                    return
                accepted.append(1)
                client.close()

        threading.Thread(target=hang_up, daemon=True).start()
        down = Database(f"postgresql://gemma@127.0.0.1:{server.getsockname()[1]}/gemma_jobs?sslmode=disable")
        try:
            outcomes = job_domain.record_generations(down, context.publisher, jobs)
        finally:
            down.dispose()
    assert all(isinstance(outcome, OperationalError) for outcome in outcomes)
    assert len(accepted) == 1 and _queued_messages(redis_client) == []


def test_jobs_stay_recorded_when_redis_is_unreachable(app, auth):
    context = app.extensions["gemma_jobs"]
    jobs = [_plan(app, client_key_id(app, auth)) for _ in range(2)]
    unreachable = JobPublisher(redis.Redis(port=1, socket_connect_timeout=0.5))
    assert job_domain.record_generations(context.db, unreachable, jobs) == [0, 1]
    with context.db.session_scope(read_only=True) as session:
        # Queued and committed: the reaper publishes them once Redis is back.
        assert [session.get(Job, job.id).status for job in jobs] == ["queued", "queued"]


def client_key_id(app, auth) -> str:
    return app.extensions["gemma_jobs"].keys.authenticate(auth["Authorization"].split()[1]).key_id
