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
