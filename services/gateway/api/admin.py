"""Admin routes: API keys, usage of every key, workers and queues."""

from __future__ import annotations

from flask import Blueprint

from services.domain import keys as key_domain
from services.domain import operations
from services.domain.usage import usage_report
from services.gateway.auth import require_key
from services.gateway.context import gateway
from services.gateway.requests import parse_body, parse_query, refuse_query
from shared.models import ApiKey, utcnow
from shared.schemas import (
    KeyCreate, KeyCreated, KeyInfo, KeyList, QueueList, UsageQuery, UsageReport, WorkerList, WorkerQuery,
)

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
    refuse_query()
    with gateway().db.session_scope(read_only=True) as session:
        keys = [key_info(row) for row in key_domain.list_keys(session)]
    return KeyList(data=keys).model_dump(mode="json")


@blueprint.delete("/v1/admin/keys/<key_id>")
@require_key(role="admin")
def revoke_key(key_id: str):
    """Revoke a key; it fails authentication from the next request on (in other gateway
    processes within `KEY_CACHE_TTL_S`)."""
    context = gateway()
    with context.db.session_scope() as session:
        info = key_info(key_domain.revoke_key(session, key_id))
    context.keys.forget(key_id)
    return info.model_dump(mode="json")


@blueprint.get("/v1/admin/usage")
@require_key(role="admin")
def admin_usage():
    """Usage of all keys grouped by key, model or day, summed in SQL."""
    query = parse_query(UsageQuery)
    with gateway().db.session_scope(read_only=True) as session:
        rows = usage_report(session, query.group_by, query.start, query.end, query.key_id)
    return UsageReport(group_by=query.group_by, data=rows).model_dump(mode="json")


@blueprint.get("/v1/admin/workers")
@require_key(role="admin")
def list_workers():
    """Live workers; with `?include_gone=true`, then those that stopped or died in the last hour."""
    query = parse_query(WorkerQuery)
    context = gateway()
    with context.db.session_scope(read_only=True) as session:
        workers = operations.list_workers(session, utcnow(), context.settings.worker_dead_after_s)
    if not query.include_gone:
        workers = [worker for worker in workers if worker.alive]
    return WorkerList(data=workers).model_dump(mode="json")


@blueprint.get("/v1/admin/queues")
@require_key(role="admin")
def list_queues():
    """Depth, running jobs, oldest waiting job and live consumers of every queue in use."""
    refuse_query()
    context = gateway()
    with context.db.session_scope(read_only=True) as session:
        queues = operations.queue_stats(session, utcnow(), context.settings.worker_dead_after_s)
    return QueueList(data=queues).model_dump(mode="json")
