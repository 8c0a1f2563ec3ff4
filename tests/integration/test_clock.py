"""Every process keeps time on the database server's clock: a skewed host must not see live
leases as lapsed, nor have its own taken over."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from sqlalchemy import text

from shared import clock, job_store
from shared.db import Database
from shared.models import Job, utcnow
from tests.integration.helpers import claim, queued_job


@pytest.fixture(autouse=True)
def host_clock(monkeypatch):
    """Set how far this host's clock is from the truth (the clock is outside the product)."""
    skew = {"by": timedelta(0)}

    class SkewedDatetime(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.now(tz) + skew["by"]

    monkeypatch.setattr(clock, "datetime", SkewedDatetime)
    yield skew
    clock.set_offset(timedelta(0))


def server_now(db: Database) -> datetime:
    with db.engine.connect() as connection:
        return connection.scalar(text("SELECT clock_timestamp()"))


def test_a_host_whose_clock_is_behind_writes_leases_the_others_read_right(database_url, host_clock):
    """A worker host 90 s behind wrote leases 60 s in the past (lease_s 30): the first reaper
    pass on any other host took its running jobs over, and used up their attempts."""
    db = Database(database_url)
    if db.engine.dialect.name != "postgresql":
        pytest.skip("SQLite is one host's file: there is no other clock")
    job_id = queued_job(db)
    host_clock["by"] = timedelta(seconds=-90)  # the worker's host
    db.check_schema()  # as every process does at start; the worker's heartbeat does it again
    assert abs((clock.offset() - timedelta(seconds=90)).total_seconds()) < 1
    held = claim(db, job_id, "worker-behind", lease_s=30)
    assert held is not None
    with db.session_scope(read_only=True) as session:
        lease_left = session.get(Job, job_id).lease_expires_at - server_now(db)
    assert timedelta(seconds=28) < lease_left <= timedelta(seconds=30)

    host_clock["by"] = timedelta(0)  # another worker's host, on time, runs the reaper
    assert abs(db.sync_clock().total_seconds()) < 1
    with db.session_scope() as session:
        requeued, lost = job_store.recover_lapsed(session, utcnow(), max_attempts=3)
    assert (requeued, lost) == ([], [])
    with db.session_scope(read_only=True) as session:
        job = session.get(Job, job_id)
        assert (job.status, job.attempts, job.worker_id) == ("running", 1, "worker-behind")


def test_a_host_ahead_reads_time_on_the_database_clock(database_url, host_clock):
    db = Database(database_url)
    host_clock["by"] = timedelta(minutes=5)
    lead = db.sync_clock()
    if db.engine.dialect.name != "postgresql":
        assert lead is None and clock.offset() == timedelta(0)  # SQLite: the host's clock is the clock
        return
    assert abs((utcnow() - server_now(db)).total_seconds()) < 1
    # A schema check (start-up, /readyz) measures it again: the host's clock was set right.
    host_clock["by"] = timedelta(0)
    db.check_schema()
    assert abs(clock.offset().total_seconds()) < 1 and abs((utcnow() - server_now(db)).total_seconds()) < 1
