"""Admin routes: API keys and usage of every key."""

from __future__ import annotations

from flask import Blueprint

from services.domain import keys as key_domain
from services.domain.usage import usage_report
from services.gateway.auth import require_key
from services.gateway.context import gateway
from services.gateway.requests import parse_body, parse_query
from shared.models import ApiKey
from shared.schemas import KeyCreate, KeyCreated, KeyInfo, KeyList, UsageQuery, UsageReport

blueprint = Blueprint("admin", __name__)


def key_info(row: ApiKey) -> KeyInfo:
    """Return the public view of a key row (never its hash)."""
    return KeyInfo.model_validate(row, from_attributes=True)


@blueprint.post("/v1/admin/keys")
@require_key(role="admin")
def create_key():
    """Create a key; the plaintext is in this response only."""
    body = parse_body(KeyCreate)
    with gateway().db.session_scope() as session:
        row, plaintext = key_domain.create_key(session, **body.model_dump())
        created = KeyCreated(**key_info(row).model_dump(), key=plaintext)
    return created.model_dump(mode="json"), 201


@blueprint.get("/v1/admin/keys")
@require_key(role="admin")
def list_keys():
    """List every key, newest first."""
    with gateway().db.session_scope(read_only=True) as session:
        keys = [key_info(row) for row in key_domain.list_keys(session)]
    return KeyList(data=keys).model_dump(mode="json")


@blueprint.delete("/v1/admin/keys/<key_id>")
@require_key(role="admin")
def revoke_key(key_id: str):
    """Revoke a key; it fails authentication from the next request on."""
    with gateway().db.session_scope() as session:
        info = key_info(key_domain.revoke_key(session, key_id))
    return info.model_dump(mode="json")


@blueprint.get("/v1/admin/usage")
@require_key(role="admin")
def admin_usage():
    """Usage of all keys grouped by key, model or day, summed in SQL."""
    query = parse_query(UsageQuery)
    with gateway().db.session_scope(read_only=True) as session:
        rows = usage_report(session, query.group_by, query.start, query.end, query.key_id)
    return UsageReport(group_by=query.group_by, data=rows).model_dump(mode="json")
