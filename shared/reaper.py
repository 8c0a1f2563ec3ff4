"""The reaper: requeues jobs of lost workers, expires stale queued jobs, republishes lost messages."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import redis
import structlog
from celery import Celery

from shared import job_store
from shared.db import Database
from shared.models import utcnow
from shared.notify import announce_job_end
from shared.publish import job_ids_in_redis, publish_job
from shared.settings import Settings
from shared.storage import Storage

log = structlog.get_logger(__name__)

# Held for republish_after_s by the reaper that last looked for lost messages.
SCAN_TURN_KEY = "gemma-jobs:reaper:scan-turn"
# Stale queued jobs are read (and the lost ones republished) this many at a time; one turn goes
# through up to STALE_PER_TURN of them, so that a Redis that lost a large backlog has it back
# within a turn or two, not at a page per turn.
STALE_PAGE = 1000
STALE_PER_TURN = 200_000


class Reaper:
    """One pass at a time; every change is conditional, so any number may run at once."""

    def __init__(self, settings: Settings, db: Database, celery: Celery, client: redis.Redis):
        self.settings = settings
        self.db = db
        self.celery = celery
        self.redis = client
        self.storage = Storage(settings.storage_path)

    def run_once(self) -> dict[str, int]:
        """Do one pass; return how many jobs each step touched."""
        now = utcnow()
        # A transaction per step: each locks its job rows before counters and windows (the lock
        # order of job_store); two steps in one would lock job rows after windows, and deadlock
        # against a cancel or a worker's end of one of those jobs.
        with self.db.session_scope() as session:
            requeued, lost = job_store.recover_lapsed(session, now, self.settings.max_attempts)
        with self.db.session_scope() as session:
            expired = job_store.expire_queued(session, now)
        with self.db.session_scope() as session:
            abandoned = job_store.settle_abandoned_cancels(session, now)
        for job_id, queue in requeued:
            publish_job(self.celery, job_id, queue)
        for job_id in [*lost, *expired]:
            announce_job_end(self.redis, job_id, "failed")  # waiters fall back to the row
        self._remove_lost_training([*lost, *abandoned], [job_id for job_id, _ in requeued])
        republished = self._republish_lost(now)
        counts = {
            "requeued": len(requeued),
            "worker_lost": len(lost),
            "expired": len(expired),
            "republished": republished,
            "cancels_settled": len(abandoned),
        }
        if any(counts.values()):
            log.info("reaper_pass", **counts)
        return counts

    def _remove_lost_training(self, ended: list[str], requeued: list[str]) -> None:
        """Delete the partial adapters lost workers' fine-tunes left on storage: all of a job's
        that ended without one (failed `worker_lost`, or cancelled while its worker died), and
        the lost attempts' of a requeued one (its next attempt would remove them, but a cancel
        or expiry may come first)."""
        if not ended and not requeued:
            return
        with self.db.session_scope(read_only=True) as session:
            adapter_ids = job_store.fine_tune_adapter_ids(session, ended)
            attempts = job_store.queued_fine_tune_attempts(session, requeued)
        # Not mounted on this machine: nothing there to remove.
        for adapter_id in adapter_ids:
            self.storage.remove_adapter(adapter_id)
        # Only attempts up to those read: one claimed meanwhile trains into the next folder.
        for adapter_id, last in attempts:
            for attempt in range(1, last + 1):
                self.storage.remove_attempt(adapter_id, attempt)

    def _republish_lost(self, now) -> int:
        """Republish queued jobs whose message is in no Redis queue (never sent, or Redis lost it)."""
        published_before = now - timedelta(seconds=self.settings.republish_after_s)
        with self.db.session_scope() as session:
            if not job_store.stale_queued(session, published_before, limit=1):
                return 0
        try:
            if not self._take_scan_turn():
                return 0  # another reaper looked within this period; a lost message waits one more at most
            stale = self._stale_queued(published_before)
            present = job_ids_in_redis(
                self.redis,
                {queue for _, queue in stale},
                delivered_since=time.time() - self.settings.republish_after_s,
            )
        except redis.RedisError as exc:
            log.warning("reaper_redis_unavailable", error=str(exc))
            return 0
        # Those still in Redis are just waiting their turn: only the lost ones are sent again.
        lost = [(job_id, queue) for job_id, queue in stale if job_id not in present]
        republished = 0
        for start in range(0, len(lost), STALE_PAGE):
            page = lost[start:start + STALE_PAGE]
            with self.db.session_scope() as session:
                job_store.mark_published(session, [job_id for job_id, _ in page], now)
            republished += sum(publish_job(self.celery, job_id, queue) for job_id, queue in page)
        return republished

    def _stale_queued(self, published_before) -> list[tuple[str, str]]:
        """Read up to STALE_PER_TURN stale queued jobs, a page (one short query) at a time."""
        stale: list[tuple[str, str]] = []
        while len(stale) < STALE_PER_TURN:
            with self.db.session_scope(read_only=True) as session:
                page = job_store.stale_queued(session, published_before, STALE_PAGE, after=stale[-1][0] if stale else "")
            stale += page
            if len(page) < STALE_PAGE:
                break
        return stale

    def _take_scan_turn(self) -> bool:
        """Return whether this reaper may look for lost messages now: one reaper in the cluster
        per republish_after_s.

        Finding them reads every message waiting in the queues: with a backlog of 100,000 that
        is ~0.7 s of CPU (and the GIL, in a worker) and ~100 MB out of Redis. Every worker's
        reaper did so every reaper_interval_s whenever a queued job had waited longer than
        republish_after_s, which under a backlog is always.
        """
        period_ms = max(1, round(1000 * self.settings.republish_after_s))
        return bool(self.redis.set(SCAN_TURN_KEY, "taken", nx=True, px=period_ms))

    def run_forever(self, stop: threading.Event) -> None:
        """Run passes every reaper_interval_s until `stop` is set; a failed pass is retried."""
        while not stop.wait(self.settings.reaper_interval_s):
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 - the reaper must outlive a database or Redis hiccup
                log.exception("reaper_pass_failed")

    def start_thread(self) -> threading.Event:
        """Run in a daemon thread; return the event that stops it."""
        stop = threading.Event()
        threading.Thread(target=self.run_forever, args=(stop,), name="reaper", daemon=True).start()
        return stop
