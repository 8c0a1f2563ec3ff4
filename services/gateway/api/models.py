"""The models a caller may name: registered base models and the caller's own adapters."""

from __future__ import annotations

import structlog
from flask import Blueprint

from services.domain import adapters as adapter_domain
from services.gateway.auth import current_caller, require_key
from services.gateway.context import gateway
from services.gateway.requests import refuse_query
from shared.schemas import FileDeleted, ModelInfo, ModelList

log = structlog.get_logger(__name__)
blueprint = Blueprint("models", __name__)


@blueprint.get("/v1/models")
@require_key()
def list_models():
    """List registered base models, then the caller's adapters (newest first)."""
    refuse_query()
    context = gateway()
    models = [
        ModelInfo(id=entry.id, description=entry.description, context_length=entry.context_length)
        for entry in context.registry.all()
    ]
    with context.db.session_scope(read_only=True) as session:
        adapters = adapter_domain.list_adapters(session, current_caller())
        models += [adapter_domain.adapter_info(row, context.registry) for row in adapters]
    return ModelList(data=models).model_dump(mode="json")


@blueprint.delete("/v1/models/<model_id>")
@require_key()
def delete_model(model_id: str):
    """Delete one of the caller's adapters; jobs that name it afterwards fail with a clear error."""
    context = gateway()
    with context.db.session_scope() as session:
        adapter_domain.delete_adapter(session, current_caller(), model_id, context.storage)
    log.info("adapter_deleted", adapter_id=model_id)
    return FileDeleted(id=model_id, object="model").model_dump(mode="json")
