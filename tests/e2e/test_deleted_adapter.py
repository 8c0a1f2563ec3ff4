"""An adapter deleted while one of its jobs waits in the batch engine fails that job as deleted."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from structlog.testing import capture_logs

from services.domain.adapters import delete_adapter
from services.domain.keys import Caller
from shared.models import Adapter, Job
from shared.registry import DEFAULT_MODEL_ID
from shared.settings import load_settings
from tests.integration.helpers import queued_job
from workers.generation_job import run_generation_job
from workers.runtime import WorkerRuntime

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


@pytest.mark.parametrize("cached", [False, True])
def test_a_job_whose_adapter_is_deleted_while_it_waits_in_the_engine_fails_adapter_not_found(
        database_url, redis_url, redis_client, model_cache_dir, tmp_path, cached):
    """It passed its check before the delete, then waited behind a base model batch: the batch
    reached it after the files were gone, and it failed `adapter_unavailable` (which a client
    may retry) where the docs promise `adapter_not_found`. An adapter still in the worker's
    memory (`cached`: it served a job before) ran the job, on a deleted adapter."""
    from peft import LoraConfig, get_peft_model

    if database_url.startswith("sqlite"):
        pytest.skip("one backend is enough: the race is in the worker")
    settings = load_settings(database_url=database_url, redis_url=redis_url, data_dir=tmp_path,
                             model_cache_dir=model_cache_dir, log_format="console")
    rt = WorkerRuntime.create(settings, torch.device("cpu"), concurrency=2)
    rt.results.start()
    # Captured, not rendered: structlog's default console renderer draws a traceback with every
    # frame's locals (the model's among them); and configuring the worker's logging here cached
    # module loggers that later tests' capture_logs could then no longer see.
    with capture_logs():
        try:
            engine = rt.engine(DEFAULT_MODEL_ID)
            base_job = queued_job(rt.db, params={"prompt": "Count: 1, 2, 3,", "max_new_tokens": 30, "temperature": 0})
            adapter_id, relative = "ft-gemma-3-270m-gone-1a2b3c", "adapters/ft-gemma-3-270m-gone-1a2b3c/attempt-1"
            peft_model = get_peft_model(engine.loaded.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
            peft_model.save_pretrained(rt.storage.resolve(relative))
            peft_model.unload()  # the base model's own modules back
            with rt.db.session_scope() as session:
                owner = session.get(Job, base_job).owner_key_id
                session.add(Adapter(id=adapter_id, owner_key_id=owner, base_model=DEFAULT_MODEL_ID, job_id=base_job,
                                    path=relative, hyperparameters={}, metrics={}, size_bytes=1))
            adapter_params = {"prompt": "Hello", "max_new_tokens": 4, "temperature": 0, "base_model": DEFAULT_MODEL_ID}
            if cached:
                served = queued_job(rt.db, model=adapter_id, adapter_id=adapter_id, params=adapter_params)
                run_generation_job(rt, served)
                assert rt.adapters.loaded_ids() == [adapter_id]
            adapter_job = queued_job(rt.db, model=adapter_id, adapter_id=adapter_id, params=adapter_params)

            base_run = threading.Thread(target=run_generation_job, args=(rt, base_job))
            base_run.start()
            _wait_for(lambda: engine.active)
            adapter_run = threading.Thread(target=run_generation_job, args=(rt, adapter_job))
            adapter_run.start()
            _wait_for(lambda: engine.waiting)  # checked and waiting for the base batch to drain
            with rt.db.session_scope() as session:
                delete_adapter(session, Caller(key_id=owner, role="user"), adapter_id, rt.storage)
            base_run.join(timeout=120)
            adapter_run.join(timeout=120)
            with rt.db.session_scope(read_only=True) as session:
                failed = session.get(Job, adapter_job)
                assert (failed.status, failed.error["code"]) == ("failed", "adapter_not_found"), failed.error
                assert "deleted" in failed.error["message"]
        finally:
            rt.results.close()
            rt.db.dispose()


def _wait_for(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
