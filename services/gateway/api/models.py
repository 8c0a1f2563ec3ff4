"""The models a caller may name."""

from __future__ import annotations

from flask import Blueprint

from services.gateway.auth import require_key
from services.gateway.context import gateway
from shared.schemas import ModelInfo, ModelList

blueprint = Blueprint("models", __name__)


@blueprint.get("/v1/models")
@require_key()
def list_models():
    """List registered base models."""
    models = [
        ModelInfo(id=entry.id, description=entry.description, context_length=entry.context_length)
        for entry in gateway().registry.all()
    ]
    return ModelList(data=models).model_dump(mode="json")
