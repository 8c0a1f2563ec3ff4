"""Conditional job updates: a second claim or a stale worker's write changes nothing."""

from __future__ import annotations

from sqlalchemy import func, select

from services.domain.keys import create_key
from shared import job_store
from shared.db import Database
from shared.ids import new_id
from shared.models import Job, JobEvent, UsageRecord


def queued_job(db: Database) -> Job:
    with db.session_scope() as session:
        key, _ = create_key(session, role="user")
        job = Job(
            id=new_id("job"), owner_key_id=key.id, kind="generation", model="gemma-3-270m",
            queue="generation.gemma-3-270m", status="queued", params={"prompt": "x"},
        )
        session.add(job)
    return job


def test_only_one_claim_wins(database_url):
    db = Database(database_url)
    job = queued_job(db)
    with db.session_scope() as session:
        assert job_store.claim(session, job.id, "worker-a")
    with db.session_scope() as session:
        assert not job_store.claim(session, job.id, "worker-b")
        row = session.get(Job, job.id)
        assert (row.status, row.worker_id, row.attempts) == ("running", "worker-a", 1)


def test_result_and_usage_are_written_once_by_the_holder(database_url):
    db = Database(database_url)
    job = queued_job(db)
    with db.session_scope() as session:
        job_store.claim(session, job.id, "worker-a")
    outcome = {"result": {"text": "hi"}, "usage": {"prompt_tokens": 3, "completion_tokens": 1, "gpu_seconds": 0.1}}
    with db.session_scope() as session:
        assert not job_store.finish(session, job, "worker-b", **outcome)  # not the holder
    with db.session_scope() as session:
        assert job_store.finish(session, job, "worker-a", **outcome)
    with db.session_scope() as session:
        assert not job_store.finish(session, job, "worker-a", **outcome)  # a redelivery
        assert not job_store.fail(session, job.id, "worker-a", code="x", message="late failure")
    with db.session_scope() as session:
        assert session.scalar(select(func.count()).select_from(UsageRecord)) == 1
        row = session.get(Job, job.id)
        assert (row.status, row.result, row.error) == ("succeeded", {"text": "hi"}, None)
        events = [event.data["status"] for event in session.scalars(select(JobEvent).order_by(JobEvent.id))]
        assert events == ["running", "succeeded"]


def test_a_failure_is_recorded_without_a_charge(database_url):
    db = Database(database_url)
    job = queued_job(db)
    with db.session_scope() as session:
        job_store.claim(session, job.id, "worker-a")
    with db.session_scope() as session:
        assert job_store.fail(session, job.id, "worker-a", code="model_unavailable", message="gone")
    with db.session_scope() as session:
        row = session.get(Job, job.id)
        assert row.status == "failed" and row.error == {"code": "model_unavailable", "message": "gone"}
        assert session.scalar(select(func.count()).select_from(UsageRecord)) == 0
