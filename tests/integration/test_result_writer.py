"""The worker's result writer on a real database (SQLite and PostgreSQL) and real Redis: groups
of finished jobs stored once, streamed before and announced after their commit; a job
cancelled meanwhile, or whose result the database refuses, does not hold back the others; the
writer's own process, replaced when it dies, writing what it has when the worker goes."""

from __future__ import annotations

import json
import os
import signal
import time

import psutil
import psycopg
import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, insert, select, text
from sqlalchemy.exc import IntegrityError
from structlog.testing import capture_logs

from services.domain.jobs import cancel_job
from services.domain.keys import Caller
from shared import job_store, token_stream
from shared.db import Database
from shared.models import Job, UsageRecord, utcnow
from shared.notify import job_done_channel
from tests.integration.helpers import USAGE, claim, down_for, queued_job
from workers import result_process
from workers.job_runs import fail_attempt
from workers.result_writer import FinishedJob, ResultWriter
from workers.runtime import WorkerRuntime
from workers.token_publisher import StreamTail, TokenPublisher

pytestmark = pytest.mark.timeout(60)


@pytest.fixture()
def writer(rt):
    """The group writer its process runs, here in the test's process."""
    return ResultWriter(rt)


def finished(rt: WorkerRuntime, job_id: str, words: str) -> FinishedJob:
    """Claim a queued job as this worker and return it as a generation task hands it over."""
    held = claim(rt.db, job_id, rt.worker_id)
    assert held is not None
    token_ids = list(range(len(words.split())))
    tail = StreamTail()
    TokenPublisher(rt.redis, None, job_id, held.attempt, []).finish(words, token_ids, tail)
    result = {"text": words, "finish_reason": "length", "token_ids": token_ids}
    return FinishedJob(held, tail.writes, result, USAGE, {})


def stored(db: Database, job_id: str) -> tuple[Job, list[UsageRecord]]:
    with db.session_scope(read_only=True) as session:
        job = session.get(Job, job_id)
        return job, list(session.scalars(select(UsageRecord).where(UsageRecord.job_id == job_id)))


def test_the_writer_process_stores_streams_and_announces_once_each_then_stops_when_closed(rt, redis_client):
    job_ids = [queued_job(rt.db) for _ in range(3)]
    listener = redis_client.pubsub()
    listener.subscribe(*(job_done_channel(job_id) for job_id in job_ids))
    for index, job_id in enumerate(job_ids):
        rt.results.put(finished(rt, job_id, f"answer number {index}"))
    writer_pid = rt.results.pid
    assert writer_pid != os.getpid()
    assert rt.results.close()
    assert not psutil.pid_exists(writer_pid) or psutil.Process(writer_pid).status() == psutil.STATUS_ZOMBIE

    for index, job_id in enumerate(job_ids):
        job, usage = stored(rt.db, job_id)
        assert job.status == "succeeded" and job.result["text"] == f"answer number {index}"
        assert [row.completion_tokens for row in usage] == [USAGE["completion_tokens"]]
        entries = token_stream.read_entries(redis_client, job_id)
        assert [entry["type"] for entry in entries] == ["attempt", "token", "end"]
        assert entries[1]["text"] == f"answer number {index}" and entries[2]["status"] == "succeeded"
    announced = set()
    while (message := listener.get_message(timeout=1)) is not None:
        if message["type"] == "message":
            announced.add(json.loads(message["data"])["job_id"])
    assert announced == set(job_ids)


def test_a_job_cancelled_meanwhile_is_charged_as_cancelled_and_the_others_stored(rt, writer):
    kept, cancelled = (finished(rt, queued_job(rt.db), "some words") for _ in range(2))
    with rt.db.session_scope() as session:
        owner = session.get(Job, cancelled.held.job_id).owner_key_id
        cancel_job(session, Caller(key_id=owner, role="user"), cancelled.held.job_id)
    assert writer.write([kept, cancelled], []) == [kept]

    job, usage = stored(rt.db, kept.held.job_id)
    assert job.status == "succeeded" and len(usage) == 1
    job, usage = stored(rt.db, cancelled.held.job_id)
    assert job.status == "cancelled" and job.result is None
    assert [row.status for row in usage] == ["cancelled"]  # what it produced, charged once


def test_a_group_is_written_in_key_order_and_answered_in_its_own(rt):
    """Groups lock the keys' window rows in key order (no two groups wait on each other); each
    job's outcome still comes back in the place it was handed over in."""
    first_key, second_key = (finished(rt, queued_job(rt.db), "words") for _ in range(2))  # keys made in order
    with rt.db.session_scope() as session:
        cancel_job(session, Caller(key_id=second_key.held.owner_key_id, role="user"), second_key.held.job_id)
    group = [(job.held, job.result, job.usage) for job in (second_key, first_key)]
    assert job_store.finish_each(rt.db, group, rt.worker_id) == [False, True]


def test_a_result_handed_over_after_close_is_refused(rt):
    job = finished(rt, queued_job(rt.db), "late")
    rt.results.start()
    assert rt.results.close()
    with pytest.raises(RuntimeError, match="closed"):
        rt.results.put(job)


@pytest.fixture()
def refused_job(rt):
    """A PostgreSQL trigger that refuses one job's success, as a database may refuse a write."""
    if rt.db.engine.dialect.name != "postgresql":
        pytest.skip("the trigger is PostgreSQL's")
    job_id = queued_job(rt.db)
    with rt.db.engine.begin() as connection:
        connection.execute(text(
            "CREATE FUNCTION refuse_success() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "RAISE EXCEPTION 'refused for the test'; END $$"))
        connection.execute(text(
            "CREATE TRIGGER refuse_success BEFORE UPDATE ON jobs FOR EACH ROW "
            f"WHEN (NEW.id = '{job_id}' AND NEW.status = 'succeeded') EXECUTE FUNCTION refuse_success()"))
    return job_id


def test_a_result_the_database_refuses_fails_its_job_alone(rt, writer, refused_job):
    before, after = (finished(rt, queued_job(rt.db), "fine") for _ in range(2))
    # One group: its transaction fails as a whole, then each job is stored alone.
    assert writer.write([before, finished(rt, refused_job, "refused"), after], []) == [before, after]

    for job_id in (before.held.job_id, after.held.job_id):
        job, usage = stored(rt.db, job_id)
        assert job.status == "succeeded" and len(usage) == 1
    job, usage = stored(rt.db, refused_job)
    assert job.status == "failed" and job.error["code"] == "internal_error"
    assert "could not be stored" in job.error["message"] and "refused for the test" in job.error["message"]
    # The tokens were made all the same: charged once, as a failed job's are.
    assert [(row.status, row.completion_tokens) for row in usage] == [("failed", USAGE["completion_tokens"])]


def test_an_attempt_that_fails_after_its_job_was_cancelled_settles_it(rt):
    """The cancel of a running job leaves its charge and its reservation to the attempt; one that
    then fails (a model that would not load, say) left both undone: the minute's tokens stayed
    reserved. Having produced nothing, it is not charged (as a failure would not be)."""
    job_id = queued_job(rt.db, reserved_tokens=50, rate_window_start=utcnow().replace(second=0, microsecond=0))
    held = claim(rt.db, job_id, rt.worker_id)
    with rt.db.session_scope() as session:
        cancel_job(session, Caller(key_id=held.owner_key_id, role="user"), job_id)
    fail_attempt(rt, held, "model_unavailable", "no such model")
    job, usage = stored(rt.db, job_id)
    assert job.status == "cancelled" and job.error is None
    assert job.reserved_tokens == 0  # settled
    assert usage == []


def test_first_each_runs_every_statement_in_one_transaction(database_url):
    db = Database(database_url)
    table = Table("first_each_rows", MetaData(), Column("id", Integer, primary_key=True), Column("word", String(20)))
    table.create(db.engine)
    add = insert(table).returning(table.c.id, table.c.word)
    try:
        rows = db.first_each(add, [{"id": 1, "word": "one"}, {"id": 2, "word": "two"}])
        assert [(row.id, row.word) for row in rows] == [(1, "one"), (2, "two")]
        with pytest.raises(IntegrityError):
            db.first_each(add, [{"id": 3, "word": "three"}, {"id": 1, "word": "again"}])
        with db.engine.connect() as connection:
            assert connection.execute(select(table.c.id).order_by(table.c.id)).scalars().all() == [1, 2]
        assert db.first(add, {"id": 3, "word": "three"}).id == 3  # the connection is fine afterwards
    finally:
        db.dispose()


def test_a_connection_lost_under_a_group_is_not_lost_twice(rt, writer, postgres_admin_url):
    if rt.db.engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL's backends")
    first, second = (finished(rt, queued_job(rt.db), "words") for _ in range(2))
    assert writer.write([first], []) == [first]  # leaves a connection for the next group
    with psycopg.connect(postgres_admin_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
                      "AND pid <> pg_backend_pid()", (rt.db.engine.url.database,))
    rt.db.engine.dispose()  # the test's own reads below use the engine's pool
    # The group's statement fails on the dead connection; alone, on a new one, it is stored.
    assert writer.write([second], [first]) == [second]
    job, usage = stored(rt.db, second.held.job_id)
    assert job.status == "succeeded" and len(usage) == 1


def test_a_result_is_stored_once_the_database_is_back_within_half_a_lease(rt, writer, postgres_admin_url):
    """One failed try left the job to its lease: a second's outage cost it a whole new attempt
    (and, on its last one, a `worker_lost` failure of a job that had run)."""
    if rt.db.engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL's backends")
    job = finished(rt, queued_job(rt.db), "words")
    with down_for(1.0, rt.db.url, postgres_admin_url), capture_logs() as logs:
        assert writer.write([job], []) == [job]
    assert any(entry["event"] == "result_store_retrying" for entry in logs)
    row, usage = stored(rt.db, job.held.job_id)
    assert row.status == "succeeded" and len(usage) == 1


def test_the_writer_process_runs_behind_the_job_path(rt):
    """A batch process at a lower priority: woken by a finished job, it does not take the core
    from the worker, PostgreSQL or Redis (docs/benchmarks.md, twelfth session)."""
    worker_nice = psutil.Process().nice()
    rt.results.start()
    # Lowered by the worker as it starts it: its imports already run behind the model load.
    writer = psutil.Process(rt.results.pid)
    expected_nice = min(worker_nice + result_process.WRITER_NICENESS, 19)
    assert (os.sched_getscheduler(writer.pid), writer.nice()) == (os.SCHED_BATCH, expected_nice)
    assert (os.sched_getscheduler(os.getpid()), psutil.Process().nice()) == (os.SCHED_OTHER, worker_nice)  # unchanged


def test_a_worker_waits_for_its_writer_process_to_be_ready(rt):
    """A worker that took jobs before its writer was up filled the pipe and stopped at the next
    hand-over for most of a second (docs/benchmarks.md, thirteenth session)."""
    rt.results.start()
    started = time.monotonic()
    assert rt.results.wait_ready(60)
    assert time.monotonic() - started < 60
    job = finished(rt, queued_job(rt.db), "ready")
    rt.results.put(job)
    assert rt.results.close()
    assert stored(rt.db, job.held.job_id)[0].status == "succeeded"


def test_a_writer_process_that_dies_while_starting_is_not_waited_for(rt):
    rt.results.start()
    psutil.Process(rt.results.pid).kill()
    started = time.monotonic()
    assert not rt.results.wait_ready(60)
    assert time.monotonic() - started < 10


def test_a_writer_process_that_died_is_replaced(rt):
    first = finished(rt, queued_job(rt.db), "before")
    rt.results.put(first)
    deadline = time.monotonic() + 30
    while stored(rt.db, first.held.job_id)[0].status != "succeeded":
        assert time.monotonic() < deadline, "the writer process stored nothing"
        time.sleep(0.05)
    dead_pid = rt.results.pid
    os.kill(dead_pid, signal.SIGKILL)
    dead = psutil.Process(dead_pid)
    while dead.status() != psutil.STATUS_ZOMBIE:  # dead, and left for the worker to reap, as in life
        time.sleep(0.01)

    second = finished(rt, queued_job(rt.db), "after")
    with capture_logs() as logs:
        rt.results.put(second)
    assert rt.results.pid != dead_pid
    # Said, as operations.md promises: it was silent when the death was seen before sending.
    assert [entry["event"] for entry in logs] == ["result_writer_lost"]
    assert rt.results.close()
    job, usage = stored(rt.db, second.held.job_id)
    assert job.status == "succeeded" and job.result["text"] == "after" and len(usage) == 1


def test_the_writer_process_writes_what_it_has_when_the_worker_is_gone(rt):
    job = finished(rt, queued_job(rt.db), "orphaned")
    rt.results.put(job)
    writer = psutil.Process(rt.results.pid)
    rt.results._conn.close()  # as when the worker dies: the pipe's end, with no word to stop

    assert writer.wait(30) == 0
    stored_job, usage = stored(rt.db, job.held.job_id)
    assert stored_job.status == "succeeded" and len(usage) == 1
