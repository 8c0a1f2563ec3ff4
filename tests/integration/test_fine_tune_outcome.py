"""A trained adapter is registered once, also across a brief database outage."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from shared.models import Adapter, Job, UsageRecord
from shared.storage import Storage
from tests.integration.helpers import claim, down_for, queued_job
from workers.fine_tune_job import _store_outcome
from workers.fine_tuning import TrainingReport


def test_an_adapter_is_registered_once_the_database_is_back_within_half_a_lease(rt, postgres_admin_url):
    """One failed try of the registration crashed the task: the lease lapsed, and the next attempt
    trained again from the start (a day's run lost to a one-second outage)."""
    if rt.db.engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL's backends")
    adapter_id = "ft-gemma-3-270m-outage-1a2b3c"
    job_id = queued_job(rt.db, kind="fine_tune", queue="fine_tune.gemma-3-270m", adapter_id=adapter_id,
                        params={"hyperparameters": {"epochs": 1}})
    held = claim(rt.db, job_id, rt.worker_id)
    relative = Storage.adapter_relative(adapter_id, held.attempt)
    folder = rt.storage.resolve(relative)
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    with down_for(1.0, rt.db.url, postgres_admin_url), capture_logs() as logs:
        _store_outcome(rt, held, TrainingReport(), relative, None, 60)
    assert "adapter_register_retrying" in [entry["event"] for entry in logs]
    with rt.db.session_scope(read_only=True) as session:
        job = session.get(Job, job_id)
        assert (job.status, job.attempts, job.result["adapter_id"]) == ("succeeded", 1, adapter_id)
        assert session.get(Adapter, adapter_id).path == relative
        assert session.query(UsageRecord).filter(UsageRecord.job_id == job_id).count() == 1
    assert (folder / "adapter_config.json").is_file()
