"""Conditional job updates: second claims, stale workers and redeliveries change nothing."""

from __future__ import annotations

import json
from datetime import timedelta
from types import SimpleNamespace

import pytest
from sqlalchemy import func, select, update

from shared import job_store, token_stream
from shared.db import Database
from shared.models import Job, JobEvent, RateLimitWindow, UsageRecord, utcnow
from shared.notify import job_done_channel
from tests.integration.helpers import RESULT, USAGE, claim, lapse_lease, queued_job
from workers.job_guard import JobGuard, LeaseKeeper


def usage_rows(db) -> int:
    with db.session_scope() as session:
        return session.scalar(select(func.count()).select_from(UsageRecord))


def test_only_one_claim_wins(database_url):
    db = Database(database_url)
    job_id = queued_job(db)
    held = claim(db, job_id, "worker-a")
    assert held.attempt == 1 and held.queue == "generation.gemma-3-270m"
    assert claim(db, job_id, "worker-b") is None
    with db.session_scope() as session:
        row = session.get(Job, job_id)
        assert (row.status, row.worker_id, row.worker_device, row.attempts) == ("running", "worker-a", "cpu", 1)
        assert row.lease_expires_at > row.heartbeat_at
        # One status event (on PostgreSQL written by the claim's own statement).
        events = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.type == "status")).all()
        assert [event.data for event in events] == [{"status": "running", "worker_id": "worker-a", "attempt": 1}]
        assert events[0].created_at >= row.started_at


def test_a_lapsed_lease_can_be_claimed_and_fences_the_old_worker(database_url):
    db = Database(database_url)
    job_id = queued_job(db)
    old = claim(db, job_id, "worker-a")
    lapse_lease(db, job_id)
    new = claim(db, job_id, "worker-b")
    assert new.attempt == 2
    with db.session_scope() as session:
        assert job_store.renew_leases(session, [old], "worker-a", 30) == {job_id: "running"}  # not held any more
        assert not job_store.finish(session, old, "worker-a", result=RESULT, usage=USAGE)
    with db.session_scope() as session:
        assert job_store.renew_leases(session, [new], "worker-b", 30) == {}
        assert job_store.finish(session, new, "worker-b", result=RESULT, usage=USAGE)
    assert usage_rows(db) == 1


def test_one_statement_renews_every_lease_a_worker_holds_and_names_the_lost(database_url):
    db = Database(database_url)
    kept, cancelled, taken = (queued_job(db) for _ in range(3))
    held = [claim(db, job_id, "worker-a") for job_id in (kept, cancelled, taken)]
    with db.session_scope() as session:
        assert job_store.cancel(session, cancelled)
    lapse_lease(db, taken)
    claim(db, taken, "worker-b")
    with db.session_scope() as session:
        before = session.get(Job, kept).lease_expires_at
    with db.session_scope() as session:
        lost = job_store.renew_leases(session, held, "worker-a", 300)
    assert lost == {cancelled: "cancelled", taken: "running"}
    with db.session_scope() as session:
        assert session.get(Job, kept).lease_expires_at > before
        # worker-b's lease is its own: worker-a's renewal did not touch it.
        assert session.get(Job, taken).worker_id == "worker-b"
        assert job_store.renew_leases(session, [], "worker-a", 300) == {}


def test_out_of_attempts_a_lapsed_lease_is_not_claimable(database_url):
    db = Database(database_url)
    job_id = queued_job(db)
    claim(db, job_id, "worker-a", max_attempts=1)
    lapse_lease(db, job_id)
    assert claim(db, job_id, "worker-b", max_attempts=1) is None


def test_result_and_usage_are_written_once_by_the_holder(database_url):
    db = Database(database_url)
    job_id = queued_job(db)
    held = claim(db, job_id, "worker-a")
    with db.session_scope() as session:
        assert not job_store.finish(session, held, "worker-b", result=RESULT, usage=USAGE)  # not the holder
    with db.session_scope() as session:
        assert job_store.finish(session, held, "worker-a", result=RESULT, usage=USAGE)
    with db.session_scope() as session:
        assert not job_store.finish(session, held, "worker-a", result=RESULT, usage=USAGE)  # a redelivery
        assert not job_store.fail(session, held, "worker-a", code="x", message="late failure")
    assert usage_rows(db) == 1
    with db.session_scope() as session:
        row = session.get(Job, job_id)
        assert (row.status, row.result, row.error) == ("succeeded", RESULT, None)


def test_finish_alone_writes_what_finish_writes_once(database_url):
    """The worker's own-transaction finish (on PostgreSQL a bare statement): same rows, same fence."""
    db = Database(database_url)
    job_id = queued_job(db)
    held = claim(db, job_id, "worker-a")
    assert not job_store.finish_alone(db, held, "worker-b", result=RESULT, usage=USAGE)  # not the holder
    assert job_store.finish_alone(db, held, "worker-a", result=RESULT, usage=USAGE)
    assert not job_store.finish_alone(db, held, "worker-a", result=RESULT, usage=USAGE)  # a redelivery
    assert usage_rows(db) == 1
    with db.session_scope() as session:
        row = session.get(Job, job_id)
        assert (row.status, row.result, row.reserved_tokens) == ("succeeded", RESULT, 0)
        assert row.finished_at >= row.started_at
        events = session.scalars(select(JobEvent.data).where(JobEvent.job_id == job_id).order_by(JobEvent.id)).all()
        assert [event["status"] for event in events] == ["running", "succeeded"]
        charge = session.scalars(select(UsageRecord).where(UsageRecord.job_id == job_id)).one()
        assert (charge.key_id, charge.completion_tokens) == (row.owner_key_id, USAGE["completion_tokens"])
        assert job_store.ended_counts(session) == [("generation", "gemma-3-270m", "succeeded", 1)]
        events = [event.data["status"] for event in session.scalars(select(JobEvent).order_by(JobEvent.id))]
        assert events == ["running", "succeeded"]
        charge = session.scalars(select(UsageRecord)).one()  # on PostgreSQL written by finish's one statement
        assert (charge.job_id, charge.key_id, charge.model, charge.status) == (
            job_id, held.owner_key_id, held.model, "succeeded")
        assert {name: getattr(charge, name) for name in USAGE} == USAGE


def test_a_failure_charges_only_tokens_produced(database_url):
    db = Database(database_url)
    job_id = queued_job(db)
    held = claim(db, job_id, "worker-a")
    with db.session_scope() as session:
        assert job_store.fail(session, held, "worker-a", code="model_unavailable", message="gone")
    assert usage_rows(db) == 0
    other = queued_job(db)
    held = claim(db, other, "worker-a")
    with db.session_scope() as session:
        assert job_store.fail(session, held, "worker-a", code="timeout", message="slow", usage=USAGE)
    assert usage_rows(db) == 1


def test_cancel_then_the_running_worker_charges_once(database_url):
    db = Database(database_url)
    job_id = queued_job(db)
    held = claim(db, job_id, "worker-a")
    with db.session_scope() as session:
        assert job_store.cancel(session, job_id)
    with db.session_scope() as session:
        assert not job_store.cancel(session, job_id)
        assert job_store.renew_leases(session, [held], "worker-a", 30) == {job_id: "cancelled"}
        assert not job_store.finish(session, held, "worker-a", result=RESULT, usage=USAGE)
        assert not job_store.charge_cancelled(session, held, "worker-b", USAGE)
    with db.session_scope() as session:
        assert job_store.charge_cancelled(session, held, "worker-a", USAGE)
    with db.session_scope() as session:
        assert not job_store.charge_cancelled(session, held, "worker-a", USAGE)
        row = session.get(Job, job_id)
        assert row.status == "cancelled" and row.result is None
    assert usage_rows(db) == 1


def test_a_cancelled_attempt_that_produced_nothing_is_settled_but_not_charged(database_url):
    """It wrote a ledger row of zeros, counted as a job in usage totals (a failure writes none)."""
    db = Database(database_url)
    job_id, key_id = reserved_job(db, 50)
    held = claim(db, job_id, "worker-a")
    with db.session_scope() as session:
        assert job_store.cancel(session, job_id)
    nothing = {"prompt_tokens": 3, "completion_tokens": 0, "gpu_seconds": 0.01}
    with db.session_scope() as session:
        assert job_store.charge_cancelled(session, held, "worker-a", nothing)
    with db.session_scope() as session:
        assert not job_store.charge_cancelled(session, held, "worker-a", nothing)
    assert usage_rows(db) == 0
    assert window_tokens(db, key_id) == 3  # the reservation became what the prompt used


def reserved_job(db, tokens: int) -> tuple[str, str]:
    """A queued job that reserved `tokens` in its key's current rate window; returns (job id, key id)."""
    window = utcnow().replace(second=0, microsecond=0)
    job_id = queued_job(db, reserved_tokens=tokens, rate_window_start=window)
    with db.session_scope() as session:
        key_id = session.get(Job, job_id).owner_key_id
        session.add(RateLimitWindow(key_id=key_id, window_start=window, requests=1, tokens=tokens))
    return job_id, key_id


def window_tokens(db, key_id: str) -> int:
    with db.session_scope() as session:
        return session.scalar(select(RateLimitWindow.tokens).where(RateLimitWindow.key_id == key_id))


@pytest.mark.parametrize("ending", ["finish", "fail"])
def test_the_reservation_is_settled_once_by_the_attempt_that_ends(database_url, ending):
    db = Database(database_url)
    job_id, key_id = reserved_job(db, tokens=50)
    old = claim(db, job_id, "worker-a")
    lapse_lease(db, job_id)
    new = claim(db, job_id, "worker-b")
    assert new.reserved_tokens == 50
    end = {
        "finish": lambda session, held, worker: job_store.finish(session, held, worker, result=RESULT, usage=USAGE),
        "fail": lambda session, held, worker: job_store.fail(session, held, worker, code="timeout", message="slow",
                                                             usage=USAGE),
    }[ending]
    with db.session_scope() as session:
        assert not end(session, old, "worker-a")  # fenced: the lapsed attempt settles nothing
    assert window_tokens(db, key_id) == 50
    with db.session_scope() as session:
        assert end(session, new, "worker-b")
    with db.session_scope() as session:
        assert not end(session, new, "worker-b")  # a redelivery
        assert session.get(Job, job_id).reserved_tokens == 0
    assert window_tokens(db, key_id) == 4  # 3 prompt + 1 completion tokens, once
    assert usage_rows(db) == 1


def test_finish_each_stores_a_group_once_as_finish_alone_stores_each(database_url):
    """The result writer's group statement: fenced per job, a repeat stores nothing, and the rate
    window and outcome counters get each job's share once."""
    db = Database(database_url)
    first, key_id = reserved_job(db, tokens=50)
    second = queued_job(db, reserved_tokens=50, rate_window_start=utcnow().replace(second=0, microsecond=0))
    with db.session_scope() as session:
        session.get(Job, second).owner_key_id = key_id
        session.execute(update(RateLimitWindow).where(RateLimitWindow.key_id == key_id).values(tokens=100))
    with db.session_scope() as session:
        session.get(Job, second).model = "ft-mine-1"  # counted under its queue's base model
    others = queued_job(db)
    held = [claim(db, job_id, "worker-a") for job_id in (first, second)] + [claim(db, others, "worker-b")]
    group = [(claim_, RESULT, USAGE) for claim_ in [*held, held[0]]]  # the last one: handed over twice

    assert job_store.finish_each(db, group, "worker-a") == [True, True, False, False]
    assert job_store.finish_each(db, group, "worker-a") == [False] * 4  # a redelivery
    assert window_tokens(db, key_id) == 100 + 2 * (4 - 50)  # each reservation settled to 4 used tokens, once
    assert usage_rows(db) == 2
    with db.session_scope() as session:
        for job_id in (first, second):
            row = session.get(Job, job_id)
            assert (row.status, row.result, row.reserved_tokens) == ("succeeded", RESULT, 0)
            events = session.scalars(select(JobEvent.data).where(JobEvent.job_id == job_id).order_by(JobEvent.id))
            assert [event["status"] for event in events] == ["running", "succeeded"]
            charge = session.scalars(select(UsageRecord).where(UsageRecord.job_id == job_id)).one()
            assert (charge.key_id, charge.status, charge.model) == (key_id, "succeeded", row.model)
            assert {name: getattr(charge, name) for name in USAGE} == USAGE
        assert session.get(Job, others).status == "running"  # worker-b's: not worker-a's to end
        assert job_store.ended_counts(session) == [("generation", "gemma-3-270m", "succeeded", 2)]


def test_hand_back_requeues_without_a_result(database_url):
    db = Database(database_url)
    job_id = queued_job(db)
    held = claim(db, job_id, "worker-a")
    with db.session_scope() as session:
        assert job_store.hand_back(session, held, "worker-a")
    with db.session_scope() as session:
        row = session.get(Job, job_id)
        assert (row.status, row.worker_id, row.lease_expires_at) == ("queued", None, None)
    assert claim(db, job_id, "worker-b").attempt == 2


def test_recover_lapsed_requeues_then_gives_up(database_url):
    db = Database(database_url)
    job_id = queued_job(db)
    claim(db, job_id, "worker-a")
    with db.session_scope() as session:
        assert job_store.recover_lapsed(session, utcnow(), max_attempts=2) == ([], [])  # lease still valid
    lapse_lease(db, job_id)
    with db.session_scope() as session:
        requeued, lost = job_store.recover_lapsed(session, utcnow(), max_attempts=2)
    assert requeued == [(job_id, "generation.gemma-3-270m")] and lost == []
    claim(db, job_id, "worker-b", max_attempts=2)
    lapse_lease(db, job_id)
    with db.session_scope() as session:
        requeued, lost = job_store.recover_lapsed(session, utcnow(), max_attempts=2)
    assert requeued == [] and lost == [job_id]
    with db.session_scope() as session:
        row = session.get(Job, job_id)
        assert row.status == "failed" and row.error["code"] == "worker_lost" and row.attempts == 2


def test_hand_backs_do_not_use_up_attempts(database_url):
    """Rolling restarts hand a job back; only workers lost count toward max_attempts."""
    db = Database(database_url)
    job_id = queued_job(db)
    for worker in ("worker-a", "worker-b", "worker-c"):  # three shutdowns: attempts 1-3 handed back
        held = claim(db, job_id, worker, max_attempts=2)
        with db.session_scope() as session:
            assert job_store.hand_back(session, held, worker)
    assert claim(db, job_id, "worker-d", max_attempts=2).attempt == 4  # the fence still grows
    lapse_lease(db, job_id)  # worker-d lost: the first loss
    assert claim(db, job_id, "worker-e", max_attempts=2).attempt == 5  # a lapsed lease is claimable
    lapse_lease(db, job_id)  # worker-e lost: the second
    assert claim(db, job_id, "worker-f", max_attempts=2) is None
    with db.session_scope() as session:
        assert job_store.recover_lapsed(session, utcnow(), max_attempts=3)[0] == [(job_id, "generation.gemma-3-270m")]
    claim(db, job_id, "worker-g", max_attempts=3)
    lapse_lease(db, job_id)
    with db.session_scope() as session:
        assert job_store.recover_lapsed(session, utcnow(), max_attempts=3) == ([], [job_id])
    with db.session_scope() as session:
        row = session.get(Job, job_id)
        assert (row.status, row.attempts, row.hand_backs) == ("failed", 6, 3)
        assert row.error["message"] == "the worker running this job was lost 3 times; giving up"


def test_expire_queued_fails_only_jobs_past_their_ttl(database_url):
    db = Database(database_url)
    stale = queued_job(db, expires_at=utcnow() - timedelta(seconds=1))
    fresh = queued_job(db, expires_at=utcnow() + timedelta(hours=1))
    forever = queued_job(db)
    assert claim(db, stale, "worker-a") is None  # a worker will not run it either
    with db.session_scope() as session:
        assert job_store.expire_queued(session, utcnow()) == [stale]
    with db.session_scope() as session:
        assert session.get(Job, stale).error["code"] == "expired"
        assert session.get(Job, fresh).status == session.get(Job, forever).status == "queued"


def test_the_ttl_bounds_only_the_first_wait(database_url):
    """A job that started in time and then lost its worker is retried, not expired."""
    db = Database(database_url)
    job_id = queued_job(db, expires_at=utcnow() + timedelta(seconds=30))
    claim(db, job_id, "worker-a")
    lapse_lease(db, job_id)
    with db.session_scope() as session:
        requeued, _ = job_store.recover_lapsed(session, utcnow(), max_attempts=3)
        assert job_store.expire_queued(session, utcnow() + timedelta(hours=1)) == []
    assert requeued == [(job_id, "generation.gemma-3-270m")]
    assert claim(db, job_id, "worker-b").attempt == 2


def test_every_job_end_is_counted_once_by_kind_model_and_status(database_url):
    """Counted by base model: an adapter's jobs count under the model of their queue."""
    db = Database(database_url)
    finished, failed, cancelled_running = (claim(db, queued_job(db, model="ft-mine-1"), "worker-a") for _ in range(3))
    cancelled_queued = queued_job(db, model="ft-mine-1")
    with db.session_scope() as session:
        assert job_store.finish(session, finished, "worker-a", result=RESULT, usage=USAGE)
        assert job_store.fail(session, failed, "worker-a", code="timeout", message="slow")
        assert job_store.cancel(session, cancelled_running.job_id)
        assert job_store.cancel(session, cancelled_queued)
    with db.session_scope() as session:  # redeliveries and late writers add nothing
        assert not job_store.finish(session, finished, "worker-a", result=RESULT, usage=USAGE)
        assert not job_store.fail(session, failed, "worker-a", code="timeout", message="slow")
        assert not job_store.cancel(session, cancelled_running.job_id)
        assert job_store.charge_cancelled(session, cancelled_running, "worker-a", USAGE)
    expired = queued_job(db, model="ft-mine-1", expires_at=utcnow() - timedelta(seconds=1))
    lost = queued_job(db, model="ft-mine-1")
    claim(db, lost, "worker-a", max_attempts=1)
    lapse_lease(db, lost)
    with db.session_scope() as session:
        assert job_store.expire_queued(session, utcnow()) == [expired]
        assert job_store.recover_lapsed(session, utcnow(), max_attempts=1) == ([], [lost])
    with db.session_scope() as session:
        assert job_store.ended_counts(session) == [
            ("generation", "gemma-3-270m", "cancelled", 2),
            ("generation", "gemma-3-270m", "failed", 3),  # timeout, expired, worker_lost
            ("generation", "gemma-3-270m", "succeeded", 1),
        ]
        charge = session.scalars(select(UsageRecord).where(UsageRecord.job_id == finished.job_id)).one()
        assert charge.model == "ft-mine-1"  # usage is by what the caller asked for


def test_the_lease_keeper_renews_watched_jobs_and_stops_only_those_it_lost(database_url, redis_client):
    db = Database(database_url)
    kept_id, cancelled_id, done_id = (queued_job(db) for _ in range(3))
    keeper = LeaseKeeper(db, redis_client, "worker-a", lease_s=300, poll_s=3600)  # rounds run by hand here
    rt = SimpleNamespace(leases=keeper, shutdown_deadline=None)
    guards = {job_id: JobGuard(rt, claim(db, job_id, "worker-a"), timeout_s=60)
              for job_id in (kept_id, cancelled_id, done_id)}
    for guard in guards.values():
        guard.__enter__()
    guards[done_id].__exit__(None, None, None)  # its attempt ended: the keeper lets it be
    with db.session_scope() as session:
        assert job_store.cancel(session, cancelled_id)
        assert job_store.cancel(session, done_id)
        before = session.get(Job, kept_id).lease_expires_at
    keeper.renew_once()
    assert guards[cancelled_id].should_stop() and guards[cancelled_id].reason == "cancelled"
    assert not guards[kept_id].should_stop()
    assert guards[done_id].reason is None
    with db.session_scope() as session:
        assert session.get(Job, kept_id).lease_expires_at > before
    keeper.renew_once()  # the lost job is no longer renewed, the kept one still is
    assert not guards[kept_id].should_stop()


def test_a_worker_that_claims_a_job_again_stops_its_earlier_attempt(database_url, redis_client):
    """Its renewals failed past the lease, its reaper requeued the job and it took the message
    again: the earlier attempt was never told, and ran to its end beside the new one."""
    db = Database(database_url)
    job_id = queued_job(db)
    keeper = LeaseKeeper(db, redis_client, "worker-a", lease_s=300, poll_s=3600)  # rounds run by hand here
    rt = SimpleNamespace(leases=keeper, shutdown_deadline=None)
    first = JobGuard(rt, claim(db, job_id, "worker-a"), timeout_s=60).__enter__()
    lapse_lease(db, job_id)
    with db.session_scope() as session:
        assert job_store.recover_lapsed(session, utcnow(), max_attempts=3)[0] == [(job_id, "generation.gemma-3-270m")]
    second = JobGuard(rt, claim(db, job_id, "worker-a"), timeout_s=60).__enter__()
    assert first.should_stop() and first.reason == "lease_lost"
    keeper.renew_once()
    assert not second.should_stop()
    first.__exit__(None, None, None)  # the earlier attempt's end leaves the new one watched
    keeper.renew_once()
    assert not second.should_stop()


def test_an_attempt_stuck_past_its_time_limit_is_ended_by_its_lease_keeper(database_url, redis_client):
    """One stuck in a call that never returns had its lease renewed for ever: the job never ended.
    Its end is announced, as any end is: its waiters waited out their whole Prefer: wait."""
    db = Database(database_url)
    stuck_id, fine_id = queued_job(db), queued_job(db)
    keeper = LeaseKeeper(db, redis_client, "worker-a", lease_s=30, poll_s=3600)  # rounds run by hand here
    rt = SimpleNamespace(leases=keeper, shutdown_deadline=None)
    stuck = JobGuard(rt, claim(db, stuck_id, "worker-a"), timeout_s=-keeper.overdue_after_s - 1).__enter__()
    fine = JobGuard(rt, claim(db, fine_id, "worker-a"), timeout_s=60).__enter__()
    listener = redis_client.pubsub()
    listener.subscribe(job_done_channel(stuck_id))
    keeper.renew_once()
    assert stuck.reason == "timeout" and not fine.should_stop()
    announced = [json.loads(message["data"]) for message in iter(lambda: listener.get_message(timeout=1), None)
                 if message["type"] == "message"]
    assert announced == [{"job_id": stuck_id, "status": "failed"}]
    assert token_stream.read_entries(redis_client, stuck_id)[-1]["type"] == "end"
    assert token_stream.read_entries(redis_client, fine_id) == []
    with db.session_scope() as session:
        job = session.get(Job, stuck_id)
        assert (job.status, job.error["code"]) == ("failed", "timeout") and "stuck" in job.error["message"]
        assert session.get(Job, fine_id).status == "running"
    # The stuck attempt's own end, once it comes, changes nothing.
    with db.session_scope() as session:
        assert not job_store.fail(session, stuck.held, "worker-a", code="timeout", message="late")
    keeper.renew_once()
    assert not fine.should_stop()
