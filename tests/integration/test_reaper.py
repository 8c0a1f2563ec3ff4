"""The reaper against a real database and Redis: lost messages, lost workers, TTLs."""

from __future__ import annotations

import json
import time
from datetime import timedelta

import pytest
from sqlalchemy import insert, select, update

from shared import job_store, publish
from shared import reaper as reaper_module
from shared.celery_app import make_celery
from shared.db import Database
from shared.models import Job, RateLimitWindow, UsageRecord, utcnow
from shared.publish import UNACKED_INDEX_KEY, UNACKED_KEY, job_ids_in_redis, publish_job
from shared.reaper import SCAN_TURN_KEY, Reaper
from shared.storage import Storage
from tests.integration.helpers import USAGE, claim, lapse_lease, queued_job

QUEUE = "generation.gemma-3-270m"


@pytest.fixture()
def reaper(settings, redis_client):
    settings = settings.model_copy(update={"republish_after_s": 5, "max_attempts": 2})
    db = Database(settings.database_url_or_default)
    yield Reaper(settings, db, make_celery(settings.redis_url), redis_client)
    db.dispose()


def next_scan_period(redis_client):
    """Let the next pass look for lost messages, as it may once republish_after_s has passed."""
    redis_client.delete(SCAN_TURN_KEY)


def published_long_ago(db, job_id):
    with db.session_scope() as session:
        session.execute(update(Job).where(Job.id == job_id).values(enqueued_at=utcnow() - timedelta(minutes=5)))


def test_a_job_whose_message_never_reached_redis_is_republished(reaper, redis_client):
    job_id = queued_job(reaper.db)
    published_long_ago(reaper.db, job_id)
    assert reaper.run_once()["republished"] == 1
    assert job_ids_in_redis(redis_client, {QUEUE}, time.time()) == {job_id}
    assert reaper.run_once()["republished"] == 0  # just published: not stale
    published_long_ago(reaper.db, job_id)
    next_scan_period(redis_client)
    assert reaper.run_once()["republished"] == 0  # stale but its message is waiting
    assert redis_client.llen(QUEUE) == 1


def test_one_turn_republishes_every_lost_message_page_by_page(reaper, redis_client):
    """Redis lost a backlog larger than a page (1,000): one turn sends all of it again, once."""
    template = queued_job(reaper.db)
    with reaper.db.session_scope() as session:
        owner = session.get(Job, template).owner_key_id
        session.execute(insert(Job), [
            {"id": f"job_lost{index:05d}", "owner_key_id": owner, "kind": "generation", "model": "gemma-3-270m",
             "queue": QUEUE, "status": "queued", "params": {"prompt": "x"}, "enqueued_at": utcnow() - timedelta(minutes=5)}
            for index in range(reaper_module.STALE_PAGE + 4)
        ])
    publish_job(reaper.celery, template, QUEUE)  # stale too, but its message is in Redis
    published_long_ago(reaper.db, template)
    assert reaper.run_once()["republished"] == reaper_module.STALE_PAGE + 4
    assert redis_client.llen(QUEUE) == reaper_module.STALE_PAGE + 5
    next_scan_period(redis_client)
    assert reaper.run_once()["republished"] == 0  # the republished ones are fresh; the other waits
    assert redis_client.llen(QUEUE) == reaper_module.STALE_PAGE + 5


def test_one_reaper_in_the_cluster_looks_for_lost_messages_per_period(reaper, redis_client):
    other = Reaper(reaper.settings, reaper.db, reaper.celery, redis_client)
    first, second = queued_job(reaper.db), queued_job(reaper.db)
    published_long_ago(reaper.db, first)
    assert reaper.run_once()["republished"] == 1
    # The turn is held for republish_after_s (5 s here): another worker's reaper skips the scan.
    assert 4000 < redis_client.pttl(SCAN_TURN_KEY) <= 5000
    published_long_ago(reaper.db, second)
    assert other.run_once()["republished"] == 0
    assert job_ids_in_redis(redis_client, {QUEUE}, time.time()) == {first}
    next_scan_period(redis_client)
    assert other.run_once()["republished"] == 1
    assert job_ids_in_redis(redis_client, {QUEUE}, time.time()) == {first, second}


def test_a_queue_longer_than_a_page_is_read_whole(settings, redis_client, monkeypatch):
    monkeypatch.setattr(publish, "SCAN_PAGE", 4)
    celery = make_celery(settings.redis_url)
    job_ids = {f"job-{index}" for index in range(10)}
    for job_id in sorted(job_ids):
        publish_job(celery, job_id, QUEUE)
    assert job_ids_in_redis(redis_client, {QUEUE}, time.time()) == job_ids


def hold_unacked(redis_client, job_id: str, delivered_at: float) -> None:
    """Park a message the way kombu does for a consumer that has not acknowledged it."""
    message = {"body": "", "headers": {"id": job_id, "task": "gemma_jobs.generate"}, "properties": {}}
    redis_client.hset(UNACKED_KEY, f"tag-{job_id}", json.dumps([message, "", QUEUE]))
    redis_client.zadd(UNACKED_INDEX_KEY, {f"tag-{job_id}": delivered_at})


def test_a_message_just_delivered_counts_as_present(reaper, redis_client):
    job_id = queued_job(reaper.db)
    published_long_ago(reaper.db, job_id)
    hold_unacked(redis_client, job_id, time.time())
    assert reaper.run_once()["republished"] == 0
    assert redis_client.llen(QUEUE) == 0


def test_a_delivery_to_a_consumer_that_died_before_claiming_is_republished(reaper, redis_client):
    job_id = queued_job(reaper.db)
    published_long_ago(reaper.db, job_id)
    hold_unacked(redis_client, job_id, time.time() - 600)
    assert reaper.run_once()["republished"] == 1
    assert redis_client.llen(QUEUE) == 1


def test_a_lost_worker_s_job_is_requeued_then_failed_after_the_cap(reaper, redis_client):
    job_id = queued_job(reaper.db)
    claim(reaper.db, job_id, "worker-a", max_attempts=2)
    lapse_lease(reaper.db, job_id)
    assert reaper.run_once()["requeued"] == 1
    assert job_ids_in_redis(redis_client, {QUEUE}, time.time()) == {job_id}
    claim(reaper.db, job_id, "worker-b", max_attempts=2)
    lapse_lease(reaper.db, job_id)
    assert reaper.run_once()["worker_lost"] == 1
    with reaper.db.session_scope() as session:
        assert session.get(Job, job_id).error["code"] == "worker_lost"


def test_a_fine_tune_failed_worker_lost_leaves_no_partial_adapter(reaper):
    """Its attempts' folders would otherwise stay: no later attempt runs to remove them."""
    lost, running = (
        queued_job(reaper.db, kind="fine_tune", queue="fine_tune.gemma-3-270m", adapter_id=adapter_id)
        for adapter_id in ("ft-lost", "ft-running")
    )
    storage = Storage(reaper.settings.storage_path)
    for adapter_id in ("ft-lost", "ft-running"):
        storage.write_atomic(f"{storage.adapter_relative(adapter_id, 1)}/adapter_model.safetensors", b"partial")
    claim(reaper.db, lost, "worker-a", max_attempts=1)
    claim(reaper.db, running, "worker-b", max_attempts=1)
    lapse_lease(reaper.db, lost)
    reaper.settings = reaper.settings.model_copy(update={"max_attempts": 1})
    assert reaper.run_once()["worker_lost"] == 1
    assert not storage.resolve("adapters/ft-lost").exists()
    assert storage.resolve(storage.adapter_relative("ft-running", 1)).is_dir()  # still training: kept


def test_a_fine_tune_failed_worker_lost_is_charged_what_it_trained(reaper):
    """A fine-tune that fails midway is charged the steps it trained; one whose worker died (a
    SIGKILL, the kernel's out-of-memory kill) was charged nothing, as was a lost generation."""
    tuned = queued_job(reaper.db, kind="fine_tune", queue="fine_tune.gemma-3-270m", adapter_id="ft-charged")
    generated = queued_job(reaper.db)
    held = claim(reaper.db, tuned, "worker-a", max_attempts=1)
    claim(reaper.db, generated, "worker-a", max_attempts=1)
    with reaper.db.session_scope() as session:
        job_store.record_progress(session, held, "worker-a", {"step": 6, "train_tokens": 470})
        started = session.get(Job, tuned).started_at
        session.execute(update(Job).where(Job.id == tuned).values(heartbeat_at=started + timedelta(seconds=12)))
    for job_id in (tuned, generated):
        lapse_lease(reaper.db, job_id)
    reaper.settings = reaper.settings.model_copy(update={"max_attempts": 1})
    assert reaper.run_once()["worker_lost"] == 2
    assert reaper.run_once()["worker_lost"] == 0
    with reaper.db.session_scope() as session:
        charges = session.execute(select(UsageRecord.job_id, UsageRecord.status, UsageRecord.train_tokens,
                                         UsageRecord.gpu_seconds)).all()
    assert [tuple(row) for row in charges] == [(tuned, "failed", 470, 12.0)]


def test_a_retry_lost_before_its_first_report_is_not_charged_the_attempt_before(reaper):
    """Progress outlived its attempt: a retry lost while it loaded was charged what the lost
    attempt before it had trained (which the docs say is not charged)."""
    tuned = queued_job(reaper.db, kind="fine_tune", queue="fine_tune.gemma-3-270m", adapter_id="ft-retried")
    held = claim(reaper.db, tuned, "worker-a", max_attempts=2)
    with reaper.db.session_scope() as session:
        job_store.record_progress(session, held, "worker-a", {"step": 6, "train_tokens": 470})
    lapse_lease(reaper.db, tuned)
    assert reaper.run_once()["requeued"] == 1
    claim(reaper.db, tuned, "worker-b", max_attempts=2)
    with reaper.db.session_scope() as session:
        assert session.get(Job, tuned).progress is None  # the retry's own, none yet
    lapse_lease(reaper.db, tuned)
    assert reaper.run_once()["worker_lost"] == 1
    with reaper.db.session_scope() as session:
        assert session.scalar(select(UsageRecord.id).where(UsageRecord.job_id == tuned)) is None


def test_a_fine_tune_cancelled_while_its_worker_died_leaves_no_partial_adapter(reaper):
    """Nothing removed its attempt's folder: its worker was gone, and no attempt came after."""
    job_id = queued_job(reaper.db, kind="fine_tune", queue="fine_tune.gemma-3-270m", adapter_id="ft-abandoned")
    storage = Storage(reaper.settings.storage_path)
    storage.write_atomic(f"{storage.adapter_relative('ft-abandoned', 1)}/adapter_model.safetensors", b"partial")
    claim(reaper.db, job_id, "worker-a")
    with reaper.db.session_scope() as session:
        assert job_store.cancel(session, job_id)
    assert reaper.run_once()["cancels_settled"] == 0  # its worker has its lease's time to stop
    assert storage.resolve(storage.adapter_relative("ft-abandoned", 1)).is_dir()
    lapse_lease(reaper.db, job_id)
    assert reaper.run_once()["cancels_settled"] == 1
    assert not storage.resolve("adapters/ft-abandoned").exists()


def test_queued_jobs_past_ttl_expire(reaper):
    job_id = queued_job(reaper.db, expires_at=utcnow() - timedelta(seconds=1))
    assert reaper.run_once()["expired"] == 1
    with reaper.db.session_scope() as session:
        job = session.get(Job, job_id)
        assert (job.status, job.error["code"], job.attempts) == ("failed", "expired", 0)


def test_a_requeued_fine_tune_keeps_no_partial_adapter_if_cancelled_before_its_next_attempt(reaper):
    """Its next attempt would remove the lost one's folder; a cancel while it waits left it for good."""
    job_id = queued_job(reaper.db, kind="fine_tune", queue="fine_tune.gemma-3-270m", adapter_id="ft-requeued")
    storage = Storage(reaper.settings.storage_path)
    lost_folder = storage.adapter_relative("ft-requeued", 1)
    storage.write_atomic(f"{lost_folder}/adapter_model.safetensors", b"partial")
    claim(reaper.db, job_id, "worker-a")
    lapse_lease(reaper.db, job_id)
    assert reaper.run_once()["requeued"] == 1
    assert not storage.resolve("adapters/ft-requeued").exists()
    # A claim between the requeue and the removal: the new attempt's folder is left alone.
    claim(reaper.db, job_id, "worker-b")
    storage.write_atomic(f"{storage.adapter_relative('ft-requeued', 2)}/adapter_model.safetensors", b"training")
    reaper._remove_lost_training([], [job_id])
    assert storage.resolve(storage.adapter_relative("ft-requeued", 2)).is_dir()


def test_a_job_cancelled_while_running_whose_worker_died_has_its_reservation_settled(reaper):
    """Only the worker settled a running job's cancel; one that died left the key's tokens reserved."""
    window = utcnow().replace(second=0, microsecond=0)
    job_id = queued_job(reaper.db, reserved_tokens=50, rate_window_start=window)
    held = claim(reaper.db, job_id, "worker-a")
    with reaper.db.session_scope() as session:
        key_id = session.get(Job, job_id).owner_key_id
        session.execute(insert(RateLimitWindow).values(key_id=key_id, window_start=window, requests=1, tokens=50))
        assert job_store.cancel(session, job_id)

    def reserved_and_window() -> tuple[int, int]:
        with reaper.db.session_scope(read_only=True) as session:
            return session.get(Job, job_id).reserved_tokens, session.get(RateLimitWindow, (key_id, window)).tokens

    assert reaper.run_once()["cancels_settled"] == 0  # its worker has its lease's time to charge it
    assert reserved_and_window() == (50, 50)
    lapse_lease(reaper.db, job_id)
    assert reaper.run_once()["cancels_settled"] == 1
    assert reserved_and_window() == (0, 0)
    assert reaper.run_once()["cancels_settled"] == 0
    # A worker that was only slow still records its usage once; the reservation is not settled twice.
    with reaper.db.session_scope() as session:
        assert job_store.charge_cancelled(session, held, "worker-a", USAGE)
    with reaper.db.session_scope(read_only=True) as session:
        assert [row.status for row in session.scalars(select(UsageRecord).where(UsageRecord.job_id == job_id))] == [
            "cancelled"]
    assert reserved_and_window() == (0, 0)
