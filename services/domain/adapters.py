"""Fine-tuned adapters: ids, ownership, listing and deletion."""

from __future__ import annotations

from sqlalchemy import event, select, update
from sqlalchemy.orm import Session

from services.domain.keys import Caller
from shared.db import get_by_id
from shared.errors import InvalidField, NotFound
from shared.models import Adapter, utcnow
from shared.registry import ModelRegistry
from shared.schemas import ModelInfo
from shared.storage import Storage

ADAPTER_PREFIX = "ft-"


def is_adapter_id(model_id: str) -> bool:
    """Return whether a model id names a fine-tuned adapter rather than a base model."""
    return model_id.startswith(ADAPTER_PREFIX)


def adapter_id_for(job_id: str, suffix: str | None) -> str:
    """Return the adapter id a fine-tune job will register: ft-[<suffix>-]<job id's unique part>."""
    unique = job_id.split("_", 1)[1]
    return f"{ADAPTER_PREFIX}{suffix}-{unique}" if suffix else f"{ADAPTER_PREFIX}{unique}"


def get_adapter(session: Session, caller: Caller, adapter_id: str) -> Adapter:
    """Return one of the caller's live adapters; another key's, or a deleted one, is not found."""
    row = get_by_id(session, Adapter, adapter_id)
    if row is None or row.owner_key_id != caller.key_id or row.deleted_at is not None:
        raise NotFound(f"no model {adapter_id!r}; GET /v1/models lists yours")
    return row


def list_adapters(session: Session, caller: Caller) -> list[Adapter]:
    """Return the caller's live adapters, newest first."""
    query = select(Adapter).where(Adapter.owner_key_id == caller.key_id, Adapter.deleted_at.is_(None))
    return list(session.scalars(query.order_by(Adapter.created_at.desc(), Adapter.id.desc())))


def delete_adapter(session: Session, caller: Caller, adapter_id: str, storage: Storage) -> None:
    """Mark an adapter deleted (later jobs naming it fail clearly); its files go after the commit."""
    if not is_adapter_id(adapter_id):
        raise InvalidField(
            f"only your fine-tuned adapters (ft-…) can be deleted; {adapter_id!r} is not one",
            details=[{"field": "model_id", "message": "not an adapter"}],
        )
    row = get_adapter(session, caller, adapter_id)
    # Conditional, so that of two concurrent deletes one wins and the other is a 404.
    deleted = session.execute(
        update(Adapter)
        .where(Adapter.id == row.id, Adapter.deleted_at.is_(None))
        .values(deleted_at=utcnow())
        .execution_options(synchronize_session=False)
    ).rowcount
    if not deleted:
        raise NotFound(f"no model {adapter_id!r}; GET /v1/models lists yours")
    event.listen(session, "after_commit", lambda _session: storage.remove_adapter(adapter_id), once=True)


def adapter_info(row: Adapter, registry: ModelRegistry) -> ModelInfo:
    """Return the public view of an adapter, as a model its owner may name."""
    base = registry.get(row.base_model)
    return ModelInfo(
        id=row.id,
        kind="adapter",
        description=f"LoRA adapter on {row.base_model}",
        context_length=base.context_length if base else 0,
        base_model=row.base_model,
        created_at=row.created_at,
        job_id=row.job_id,
        hyperparameters=row.hyperparameters,
        metrics=row.metrics,
        size_bytes=row.size_bytes,
    )
