"""A job whose round raises fails alone, and the batching engine goes on serving the next."""

from __future__ import annotations

import threading

import pytest
import torch
from structlog.testing import capture_logs

from shared.registry import DEFAULT_MODEL_ID, ModelRegistry
from workers.batch_engine import BatchEngine
from workers.generation import GenerationError
from workers.model_loader import load_model

pytestmark = pytest.mark.e2e


def test_an_error_at_the_end_of_a_round_fails_its_job_and_the_engine_serves_on(model_cache_dir):
    loaded = load_model(ModelRegistry.load(None).get(DEFAULT_MODEL_ID), model_cache_dir, torch.device("cpu"),
                        torch.float32)
    engine = BatchEngine(loaded, max_batch=2)
    checks = []

    def stop_check_that_breaks() -> bool:
        """A job's stop check raising on its third call: the check after the round's decode,
        which ran outside the round's error handling and ended the engine's thread."""
        checks.append(1)
        if len(checks) == 3:
            raise RuntimeError("the job's guard broke")
        return False

    # Captured, not rendered: structlog's default console renderer draws the traceback with
    # every frame's locals (the model's among them), ~16 s here.
    with capture_logs() as logs:
        broken = _generate(engine, {"prompt": "Hello", "max_new_tokens": 8, "temperature": 0},
                           should_stop=stop_check_that_breaks)
    assert isinstance(broken, GenerationError) and "the job's guard broke" in str(broken)
    # What it produced before its round failed is charged (the job fails with this usage).
    assert broken.usage["prompt_tokens"] > 0 and broken.usage["completion_tokens"] == 2
    assert broken.usage["gpu_seconds"] > 0
    assert [entry["event"] for entry in logs] == ["batch_step_failed"]
    after = _generate(engine, {"prompt": "Hello", "max_new_tokens": 3, "temperature": 0})
    assert len(after.token_ids) == 3


def test_a_storage_error_checking_an_adapters_files_fails_its_job_not_hangs_it(model_cache_dir, tmp_path,
                                                                              monkeypatch):
    """The check ran after the jobs left the waiting line and before the round knew them: an
    error there (a stale NFS handle) left their threads waiting for good."""
    import errno
    from pathlib import Path

    from workers.adapter_cache import AdapterCache

    loaded = load_model(ModelRegistry.load(None).get(DEFAULT_MODEL_ID), model_cache_dir, torch.device("cpu"),
                        torch.float32)
    engine = BatchEngine(loaded, max_batch=2, adapters=AdapterCache(2))
    folder = tmp_path / "adapters" / "ft-stale"
    is_file = Path.is_file

    def stale(path: Path) -> bool:
        if folder in path.parents:
            raise OSError(errno.ESTALE, "Stale file handle")
        return is_file(path)

    monkeypatch.setattr(Path, "is_file", stale)
    failed = _generate(engine, {"prompt": "Hello", "max_new_tokens": 2, "temperature": 0},
                       adapter_id="ft-stale", adapter_path=folder)
    assert isinstance(failed, GenerationError) and failed.code == "adapter_unavailable"
    assert len(_generate(engine, {"prompt": "Hello", "max_new_tokens": 2, "temperature": 0}).token_ids) == 2


def _generate(engine: BatchEngine, params: dict, **kwargs):
    """Run a job as a task thread does; return its output or error (fail, not hang, if it never ends)."""
    outcome = []

    def job() -> None:
        try:
            outcome.append(engine.generate(params, **kwargs))
        except GenerationError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=job, daemon=True)
    thread.start()
    thread.join(120)
    assert outcome, "the job never ended: the engine's thread is gone"
    return outcome[0]
