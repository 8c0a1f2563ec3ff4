"""Writers that meet on a key's rate window lock shared rows in one order (real PostgreSQL, real
concurrent transactions): a reaper step against a user's cancel, and against a worker's end.

Each test holds the window row from a third connection until both writers wait, then lets go.
A reaper pass used to lock job rows after the window of an earlier job, so the cancel or the
worker's end of a later job deadlocked with it, and PostgreSQL failed one of them.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Callable
from datetime import timedelta

import psycopg
import pytest
from sqlalchemy import select

from services.domain.keys import create_key
from shared import job_store
from shared.db import Database
from shared.ids import new_id
from shared.models import Job, RateLimitWindow, utcnow

pytestmark = pytest.mark.timeout(60)

RESERVED = 100


@pytest.fixture()
def db(database_url):
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite writes one transaction at a time: nothing to deadlock")
    database = Database(database_url)
    yield database
    database.dispose()


def _key_and_window(db: Database):
    now = utcnow()
    window = now.replace(second=0, microsecond=0)
    with db.session_scope() as session:
        key, _ = create_key(session, role="user", tpm=1_000_000)
        session.add(RateLimitWindow(key_id=key.id, window_start=window, requests=3, tokens=3 * RESERVED))
    return key.id, window


def _job(db: Database, key_id: str, window, job_id: str | None = None, **values) -> str:
    with db.session_scope() as session:
        job = Job(id=job_id or new_id("job"), owner_key_id=key_id, kind="generation", model="gemma-3-270m",
                  queue="generation.gemma-3-270m", status="queued", params={"prompt": "x"}, enqueued_at=utcnow(),
                  reserved_tokens=RESERVED, rate_window_start=window, **values)
        session.add(job)
    return job.id


def _expired(db: Database, key_id: str, window, job_id: str | None = None) -> str:
    return _job(db, key_id, window, job_id, expires_at=utcnow() - timedelta(seconds=1))


def _in_thread(work: Callable[[], object]) -> Callable[[], object]:
    """Run work in a thread; return a join that gives back what it returned or raised."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["value"] = work()
        except Exception as exc:  # handed to the test by join()
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join() -> object:
        thread.join(timeout=30)
        assert not thread.is_alive()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    return join


def _wait_for_lock_waits(admin_url: str, database: str, count: int) -> None:
    """Wait until `count` transactions of the database wait on a lock."""
    deadline = time.monotonic() + 10
    with psycopg.connect(admin_url, autocommit=True) as admin:
        while time.monotonic() < deadline:
            waiting = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'", (database,)
            ).fetchone()[0]
            if waiting >= count:
                return
            time.sleep(0.02)
    pytest.fail(f"{count} transactions never waited on a lock")


def _with_window_held(database_url: str, admin_url: str, key_id: str, window, first, second):
    """Hold the window row; start `first`, then (once it waits) `second`; let go once both wait.
    Return what each returned."""
    name = database_url.rsplit("/", 1)[1]
    with psycopg.connect(database_url.replace("+psycopg", "")) as holder:
        holder.execute("SELECT 1 FROM rate_limit_windows WHERE key_id = %s AND window_start = %s FOR UPDATE",
                       (key_id, window))
        join_first = _in_thread(first)
        _wait_for_lock_waits(admin_url, name, 1)
        join_second = _in_thread(second)
        _wait_for_lock_waits(admin_url, name, 2)
        holder.commit()
    return join_first(), join_second()


def _window_tokens(db: Database, key_id: str, window) -> int:
    with db.session_scope(read_only=True) as session:
        return session.scalar(select(RateLimitWindow.tokens).where(
            RateLimitWindow.key_id == key_id, RateLimitWindow.window_start == window))


def _status(db: Database, job_id: str) -> str:
    with db.session_scope(read_only=True) as session:
        return session.scalar(select(Job.status).where(Job.id == job_id))


def _reap_expired(db: Database) -> Callable[[], list[str]]:
    def reap() -> list[str]:
        with db.session_scope() as session:
            return job_store.expire_queued(session, utcnow())
    return reap


def test_a_reaper_step_and_a_cancel_of_one_of_its_jobs(db, database_url, postgres_admin_url):
    key_id, window = _key_and_window(db)
    first, second = _expired(db, key_id, window), _expired(db, key_id, window)

    def cancel() -> bool:
        with db.session_scope() as session:
            return job_store.cancel(session, second)

    expired, cancelled = _with_window_held(database_url, postgres_admin_url, key_id, window, _reap_expired(db), cancel)
    # The reaper had both rows first: the cancel then finds the job ended.
    assert (sorted(expired), cancelled) == (sorted([first, second]), False)
    assert _status(db, second) == "failed"
    assert _window_tokens(db, key_id, window) == RESERVED  # two reservations given back, once each


def test_a_reaper_step_and_a_worker_ending_another_job_of_the_key(db, database_url, postgres_admin_url):
    key_id, window = _key_and_window(db)
    running = _job(db, key_id, window)
    held = job_store.claim(db, running, "worker-1", device="cpu", lease_s=30, max_attempts=3)
    # The expired job counts into the same outcome counter row as the worker's failure.
    shard = zlib.crc32(running.encode()) % job_store.OUTCOME_SHARDS
    job_id = next(candidate for candidate in iter(lambda: new_id("job"), None)
                  if zlib.crc32(candidate.encode()) % job_store.OUTCOME_SHARDS == shard)
    expired_job = _expired(db, key_id, window, job_id)

    def fail() -> bool:
        with db.session_scope() as session:
            return job_store.fail(session, held, "worker-1", code="internal_error", message="it broke")

    expired, failed = _with_window_held(database_url, postgres_admin_url, key_id, window, _reap_expired(db), fail)
    assert (expired, failed) == ([expired_job], True)
    assert (_status(db, expired_job), _status(db, running)) == ("failed", "failed")
    assert _window_tokens(db, key_id, window) == RESERVED
