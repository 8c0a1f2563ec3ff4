"""Worker ids on a real database: two workers with the same hostname and pid (containers on the
host network) still get different ids, so neither can store the other's job."""

from __future__ import annotations

import os
import socket

import pytest
import torch

from shared import job_store
from tests.integration.helpers import RESULT, USAGE, claim, queued_job
from workers.runtime import WorkerRuntime

pytestmark = pytest.mark.timeout(60)


def test_workers_with_the_same_host_and_pid_get_different_ids(settings, redis_client):
    first, second = (WorkerRuntime.create(settings, torch.device("cpu")) for _ in range(2))
    try:
        host, pid, device, _ = first.worker_id.split(":")
        assert (host, int(pid), device) == (socket.gethostname(), os.getpid(), "cpu")
        assert first.worker_id != second.worker_id
        held = claim(first.db, queued_job(first.db), first.worker_id)
        with second.db.session_scope() as session:
            assert not job_store.finish(session, held, second.worker_id, result=RESULT, usage=USAGE)
        with first.db.session_scope() as session:
            assert job_store.finish(session, held, first.worker_id, result=RESULT, usage=USAGE)
    finally:
        for runtime in (first, second):
            runtime.results.close()
            runtime.db.dispose()


def test_a_beat_that_lands_after_the_stop_leaves_the_worker_stopped(rt):
    """A heartbeat already under way when the worker stopped wrote `ready` over `stopped`."""
    from shared.models import WorkerRecord
    from workers.registration import Registration

    registration = Registration(rt, "generate", ["generation.gemma-3-270m"])
    registration.register()
    registration.serve(["generation.gemma-3-270m"])
    registration.stop()
    registration.state = "ready"  # as the late beat read it before stop() changed it
    registration.beat()
    with rt.db.session_scope() as session:
        assert session.get(WorkerRecord, rt.worker_id).state == "stopped"
