"""The caller's own usage."""

from __future__ import annotations

from flask import Blueprint

from services.domain.usage import usage_totals
from services.gateway.auth import current_caller, require_key
from services.gateway.context import gateway
from services.gateway.requests import parse_query
from shared.schemas import UsageRange

blueprint = Blueprint("usage", __name__)


@blueprint.get("/v1/usage")
@require_key()
def own_usage():
    """Totals of the caller's key over an optional [from, to) range."""
    query = parse_query(UsageRange)
    with gateway().db.session_scope(read_only=True) as session:
        totals = usage_totals(session, current_caller().key_id, query.start, query.end)
    return totals.model_dump(mode="json")
