"""A generation job run: claim, generate (with the job's adapter, if any), store the outcome once."""

from __future__ import annotations

from pathlib import Path

import structlog
from sqlalchemy.exc import SQLAlchemyError

from shared.celery_app import model_of_queue
from shared.models import Adapter
from workers.generation import GenerationError, GenerationOutput
from workers.job_guard import JobGuard, StopReason
from workers.job_runs import claim_job, fail_attempt, settle_unfinished
from workers.metrics import TOKENS_GENERATED, TOKENS_PER_SECOND
from workers.model_loader import ModelUnavailable
from workers.result_writer import FinishedJob
from workers.runtime import WorkerRuntime
from workers.token_publisher import StreamTail, TokenPublisher

log = structlog.get_logger(__name__)


def run_generation_job(rt: WorkerRuntime, job_id: str) -> bool:
    """Claim the job, generate without holding a DB connection, then store the outcome once;
    return whether the job was this worker's to run (a redelivery of one taken or ended is not)."""
    held = claim_job(rt, job_id)
    if held is None:
        return False
    timeout_s = held.params.get("timeout_s", rt.settings.default_timeout_s)
    output: GenerationOutput | None = None
    publisher: TokenPublisher | None = None
    usage = None  # what a failed attempt had used (its charge)
    interrupted: BaseException | None = None
    with JobGuard(rt, held, timeout_s) as guard:
        try:
            engine = rt.engine(held.params.get("base_model", held.model))
            adapter_path = _adapter_path(rt, held.adapter_id) if held.adapter_id else None
            publisher = TokenPublisher(
                rt.redis,
                engine.loaded.tokenizer,
                job_id,
                held.attempt,
                held.params.get("stop") or [],
                step_writes=engine.step_writes,
            )
            output = engine.generate(
                held.params,
                should_stop=guard.should_stop,
                on_tokens=publisher.update,
                adapter_id=held.adapter_id,
                adapter_path=adapter_path,
            )
        except GenerationError as exc:
            code, message, usage = exc.code, exc.message, exc.usage
            if code == "adapter_unavailable" and _deleted(rt, held.adapter_id):
                # Deleted after this job passed its check: its files went before the batch got to it.
                code, message = "adapter_not_found", _deleted_message(held.adapter_id)
        except ModelUnavailable as exc:
            code, message = "model_unavailable", str(exc)
        except Exception as exc:  # noqa: BLE001 - one job's crash must not stop the worker
            if rt.shutdown_deadline is not None:
                # Raised into the job by Celery's cold shutdown (a second Ctrl-C): in the solo
                # pool the job waits in the thread that takes signals. Not the job's failure.
                interrupted = exc
            else:
                log.exception("job_crashed")
            code, message = "internal_error", f"{exc.__class__.__name__}: {exc}"
    if interrupted is not None:
        settle_unfinished(rt, held, StopReason.SHUTDOWN, {})  # handed back, for another worker
        raise interrupted
    if output is None:
        if publisher is not None:
            publisher.ensure_started()  # readers drop what an earlier attempt streamed
        fail_attempt(rt, held, code, message, usage)
        return True
    _store_outcome(rt, held, output, publisher, guard.reason, timeout_s)
    return True


def _adapter_path(rt: WorkerRuntime, adapter_id: str) -> Path:
    """Return where a live adapter's files are; a deleted adapter fails the job clearly."""
    relative = _live_adapter_folder(rt, adapter_id)
    if relative is None:
        rt.adapters.forget(adapter_id)
        raise GenerationError("adapter_not_found", _deleted_message(adapter_id))
    return rt.storage.resolve(relative)


def _live_adapter_folder(rt: WorkerRuntime, adapter_id: str) -> str | None:
    """Return an adapter's folder in storage, or None if it was deleted."""
    with rt.db.session_scope(read_only=True) as session:
        adapter = session.get(Adapter, adapter_id)
        return None if adapter is None or adapter.deleted_at is not None else adapter.path


def _deleted(rt: WorkerRuntime, adapter_id: str | None) -> bool:
    """Whether a job's adapter was deleted (a failed read says no: the job keeps its own error)."""
    if adapter_id is None:
        return False
    try:
        return _live_adapter_folder(rt, adapter_id) is None
    except SQLAlchemyError:
        return False


def _deleted_message(adapter_id: str) -> str:
    return f"adapter {adapter_id!r} was deleted; fine-tune again to use it"


def _store_outcome(
    rt: WorkerRuntime, held, output: GenerationOutput, publisher: TokenPublisher, reason: str | None, timeout_s: float
) -> None:
    """Write what this attempt earned: a result (behind this task, with other jobs' results), or
    at once a timeout, a hand-back, or a cancel charge."""
    usage = {
        "prompt_tokens": output.prompt_tokens,
        "completion_tokens": output.completion_tokens,
        "gpu_seconds": round(output.gpu_seconds, 4),
    }
    result = {"text": output.text, "finish_reason": output.finish_reason, "token_ids": output.token_ids}
    tokens_per_s = round(output.completion_tokens / max(output.seconds, 1e-9), 1)
    TOKENS_GENERATED.labels(model_of_queue(held.queue)).inc(output.completion_tokens)
    TOKENS_PER_SECOND.labels(model_of_queue(held.queue)).observe(tokens_per_s)
    log_fields = {"reason": reason, "tokens_per_s": tokens_per_s, **usage}
    if reason is None:
        tail = StreamTail()  # the stream's last writes go with the result, in the writer's round trip
        publisher.finish(output.text, output.token_ids, tail)
        rt.results.put(FinishedJob(held, tail.writes, result, usage, log_fields))
        return
    if reason != StopReason.LEASE_LOST:  # a later attempt owns the job's stream now
        publisher.finish(output.text, output.token_ids)
    outcome = settle_unfinished(
        rt, held, reason, usage, timeout_message=f"the job ran past its timeout_s of {timeout_s:g} s and was stopped")
    log.info(f"job_{outcome or 'result_discarded'}", **log_fields)
