"""A fine-tuning job run: claim, train a LoRA adapter, then register it and charge usage once."""

from __future__ import annotations

import gc
import time
from typing import Any

import structlog
from sqlalchemy.exc import SQLAlchemyError

from shared import job_store
from shared.job_store import Claim
from shared.models import Adapter
from shared.storage import Storage
from workers.fine_tuning import FineTuneError, FineTuneSpec, TrainingReport, train_adapter
from workers.job_guard import JobGuard
from workers.job_runs import claim_job, fail_attempt, retry_while_unreachable, store_attempt
from workers.model_loader import ModelUnavailable
from workers.runtime import WorkerRuntime

log = structlog.get_logger(__name__)


def run_fine_tune_job(rt: WorkerRuntime, job_id: str) -> bool:
    """Claim the job, train without holding a DB connection, then store the outcome once;
    return whether the job was this worker's to run (a redelivery of one taken or ended is not)."""
    held = claim_job(rt, job_id)
    if held is None:
        return False
    # Folders left by earlier attempts (a worker died mid-training) are partial: a retry
    # starts over from the base model.
    for attempt in range(1, held.attempt):
        rt.storage.remove_attempt(held.adapter_id, attempt)
    relative = Storage.adapter_relative(held.adapter_id, held.attempt)
    timeout_s = held.params.get("timeout_s", rt.settings.fine_tune_timeout_s)
    report, trained = TrainingReport(), False
    with JobGuard(rt, held, timeout_s) as guard:
        try:
            train_adapter(
                _spec(rt, held),
                rt.settings.model_cache_path,
                rt.device,
                rt.storage.resolve(relative),
                should_stop=guard.should_stop,
                on_log=lambda progress, point: _record_progress(rt, held, progress, point),
                report=report,
            )
            trained = True
        except FineTuneError as exc:
            code, message = exc.code, exc.message
        except ModelUnavailable as exc:
            code, message = "model_unavailable", str(exc)
        except Exception as exc:  # noqa: BLE001 - one job's crash must not stop the worker
            log.exception("job_crashed")
            code, message = "internal_error", f"{exc.__class__.__name__}: {exc}"
    gc.collect()  # the training copy of the base model is garbage now; free it before the next job
    if not trained:
        rt.storage.remove_attempt(held.adapter_id, held.attempt)
        fail_attempt(rt, held, code, message, report.usage())  # what it trained before it failed
        return True
    _store_outcome(rt, held, report, relative, guard.reason, timeout_s)
    return True


def _spec(rt: WorkerRuntime, held: Claim) -> FineTuneSpec:
    params = held.params
    base = rt.models.registry.get(held.model)
    if base is None:
        raise ModelUnavailable(f"model {held.model!r} is not registered on this worker")
    validation = params.get("validation_path")
    return FineTuneSpec(
        base=base,
        training_file=rt.storage.resolve(params["training_path"]),
        validation_file=rt.storage.resolve(validation) if validation else None,
        hyperparameters=params["hyperparameters"],
        quantization=params.get("quantization", "none"),
        max_rows=rt.settings.max_file_rows,
    )


def _record_progress(rt: WorkerRuntime, held: Claim, report: TrainingReport, point: dict[str, Any]) -> None:
    """Store progress and one loss point as an event; a failed write only costs that point."""
    try:
        with rt.db.session_scope() as session:
            # The attempt too: a retried run's loss curve starts again at step 0.
            event = {**point, "attempt": held.attempt}
            job_store.record_progress(session, held, rt.worker_id, report.progress(), event=event)
    except SQLAlchemyError as exc:
        log.warning("progress_not_recorded", error=str(exc))
    log.info("training_progress", **point)


def _store_outcome(
    rt: WorkerRuntime, held: Claim, report: TrainingReport, relative: str, reason: str | None, timeout_s: float
) -> None:
    """Register the adapter (success) or record why not; partial output is always removed."""
    usage = report.usage()
    if reason is None:
        rt.storage.make_durable(relative)  # once, before the durable commit and any of its retries
    outcome = store_attempt(
        rt,
        held,
        reason,
        usage,
        timeout_message=f"training ran past the fine-tune time limit of {timeout_s:g} s and was stopped",
        # While the database is away the adapter's registration is tried again for up to half a
        # lease (nothing renews it now): one failed try threw the whole training run away.
        finish=lambda: retry_while_unreachable(
            lambda: _register_adapter(rt, held, report, relative, usage),
            time.monotonic() + rt.settings.lease_s / 2, "adapter_register_retrying"),
    )
    if outcome != "finished":
        rt.storage.remove_attempt(held.adapter_id, held.attempt)
    log.info(f"job_{outcome or 'result_discarded'}", reason=reason, steps=report.step, **usage)


def _register_adapter(rt: WorkerRuntime, held: Claim, report: TrainingReport, relative: str, usage) -> bool:
    """Finish the job and insert its adapter in one transaction, if this worker still holds it."""
    folder = rt.storage.resolve(relative)
    size = sum(path.stat().st_size for path in folder.iterdir() if path.is_file())
    metrics = {
        "steps": report.step,
        "epochs": round(report.epoch, 4),
        "train_loss": report.train_loss,
        "eval_loss": report.eval_loss,
        "train_tokens": report.train_tokens,
        "train_rows": report.train_rows,
        "rows_skipped": report.rows_skipped,
        "validation_rows": report.validation_rows,
        "validation_rows_skipped": report.validation_rows_skipped,
    }
    result = {"adapter_id": held.adapter_id, "base_model": held.model, "size_bytes": size, **metrics}
    with rt.db.session_scope() as session:
        if not job_store.finish(session, held, rt.worker_id, result=result, usage=usage):
            return False
        session.add(
            Adapter(
                id=held.adapter_id,
                owner_key_id=held.owner_key_id,
                base_model=held.model,
                job_id=held.job_id,
                path=relative,
                hyperparameters=held.params["hyperparameters"],
                metrics=metrics,
                size_bytes=size,
            )
        )
    return True
