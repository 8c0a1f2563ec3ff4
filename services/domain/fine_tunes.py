"""Creating fine-tuning jobs: checked at submit so that a queued fine-tune can run."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy.orm import Session

from services.domain import limits
from services.domain.adapters import adapter_id_for, is_adapter_id
from services.domain.files import get_file
from services.domain.jobs import Submission, request_hash
from services.domain.keys import Caller
from shared.celery_app import queue_for
from shared.errors import InvalidField, NotFound
from shared.ids import new_id
from shared.jobs import JobKind, JobStatus
from shared.models import Job, TrainingFile, utcnow
from shared.registry import ModelRegistry
from shared.schemas import FineTuneRequest, training_passes
from shared.settings import Settings


def create_fine_tune(
    session: Session,
    caller: Caller,
    request: FineTuneRequest,
    *,
    registry: ModelRegistry,
    settings: Settings,
    idempotency_key: str | None = None,
) -> Submission:
    """Validate a fine-tune, admit it against the key's limits and record it as queued.

    It reserves no tokens against the per-minute budget (its size is known only as it
    trains); it counts as a request and as a concurrent job, and its trained tokens are
    charged to the key's usage when it ends.
    """
    entry = registry.get(request.base_model)
    if entry is None:
        hint = "fine-tuning an adapter is not supported; " if is_adapter_id(request.base_model) else ""
        known = ", ".join(model.id for model in registry.all())
        raise _invalid("base_model", f"unknown base_model {request.base_model!r}; {hint}base models: {known}")
    training = _own_file(session, caller, request.training_file, "training_file")
    validation = (
        _own_file(session, caller, request.validation_file, "validation_file") if request.validation_file else None
    )
    hp = request.hyperparameters
    if hp.max_seq_length > entry.context_length:
        raise _invalid(
            "hyperparameters.max_seq_length",
            f"max_seq_length {hp.max_seq_length} is over {entry.id}'s context of {entry.context_length} tokens",
        )
    if hp.lora_alpha > 64 * hp.lora_r:
        raise _invalid(
            "hyperparameters.lora_alpha", f"lora_alpha {hp.lora_alpha} is over 64 x lora_r: updates would blow up"
        )
    batch_tokens = hp.batch_size * hp.max_seq_length
    if batch_tokens > settings.max_train_batch_tokens:
        # Past the workers' memory a CPU worker is killed (and the retries kill others), a GPU
        # one fails: refused here, with the way to the same effective batch.
        raise _invalid(
            "hyperparameters.batch_size",
            f"batch_size x max_seq_length is {batch_tokens} tokens a micro-batch; the limit on this server is "
            f"{settings.max_train_batch_tokens}: lower batch_size and raise gradient_accumulation_steps to keep "
            "the effective batch",
        )
    # Micro-batches, not optimizer steps: gradient_accumulation_steps 256 passed a run 256 times
    # the limit's size.
    passes = training_passes(training.rows, hp)
    if passes > settings.max_train_steps:
        raise _invalid(
            "hyperparameters",
            f"this run would take {passes} micro-batches (forward and backward passes: optimizer steps x "
            f"gradient_accumulation_steps); the limit on this server is {settings.max_train_steps}",
        )
    if (request.ttl_s or 0) > settings.max_ttl_s:
        raise _invalid("ttl_s", f"ttl_s is at most {settings.max_ttl_s:g} on this server")
    now = utcnow()
    admission = limits.admit(session, caller, settings, 0, now)
    job_id = new_id("job")
    job = Job(
        id=job_id,
        owner_key_id=caller.key_id,
        kind=JobKind.FINE_TUNE,
        model=entry.id,
        # Its own queue: only workers that take fine-tunes (--role finetune|all) receive it.
        queue=queue_for(JobKind.FINE_TUNE, entry.id),
        status=JobStatus.QUEUED,
        params={
            "training_file": training.id,
            "training_path": training.path,
            "validation_file": validation.id if validation else None,
            "validation_path": validation.path if validation else None,
            "hyperparameters": hp.model_dump(),
            "quantization": request.quantization,
            "timeout_s": settings.fine_tune_timeout_s,
        },
        metadata_=request.metadata,
        created_at=now,
        attempts=0,
        enqueued_at=now,
        expires_at=now + timedelta(seconds=request.ttl_s) if request.ttl_s else None,
        rate_window_start=admission.window_start,
        adapter_id=adapter_id_for(job_id, request.suffix),
        idempotency_key=idempotency_key,
        request_hash=request_hash(request) if idempotency_key else None,
    )
    session.add(job)
    session.flush()
    return Submission(job, admission)


def _own_file(session: Session, caller: Caller, file_id: str, field: str) -> TrainingFile:
    """Return one of the caller's files for a field; anything else is a 422 on that field."""
    try:
        return get_file(session, caller, file_id, lock="share")  # a delete waits for this job's commit
    except NotFound:
        raise _invalid(field, f"{field} {file_id!r} is not one of your files; upload it with POST /v1/files") from None


def _invalid(field: str, message: str) -> InvalidField:
    return InvalidField(message, details=[{"field": field, "message": message}])
