"""Liveness, readiness and the OpenAPI document."""

from __future__ import annotations

import redis
from flask import Blueprint, jsonify
from sqlalchemy.exc import SQLAlchemyError

from services.gateway.context import gateway
from services.gateway.openapi import openapi_document
from shared.db import SchemaOutOfDate

blueprint = Blueprint("system", __name__)


@blueprint.get("/healthz")
def healthz():
    """Answer while the process is alive."""
    return jsonify({"status": "ok", "checks": {}})


@blueprint.get("/readyz")
def readyz():
    """Answer 200 only when the database (at the right schema) and Redis answer."""
    context = gateway()
    checks: dict[str, str] = {}
    try:
        context.db.check_schema()  # a query of its own: it also proves the database answers
        checks["database"] = "ok"
    except (SQLAlchemyError, SchemaOutOfDate) as exc:
        checks["database"] = f"error: {exc.__class__.__name__}: {str(exc)[:200]}"
    try:
        context.redis.ping()
        checks["redis"] = "ok"
    except redis.RedisError as exc:
        checks["redis"] = f"error: {exc.__class__.__name__}: {str(exc)[:200]}"
    if all(value == "ok" for value in checks.values()):
        return jsonify({"status": "ok", "checks": checks}), 200
    failing = "; ".join(f"{name}: {value}" for name, value in checks.items() if value != "ok")
    # The contract's error shape as well, for clients that read every non-2xx as one.
    error = {"code": "not_ready", "message": f"not ready: {failing}", "details": checks}
    return jsonify({"status": "unavailable", "checks": checks, "error": error}), 503


@blueprint.get("/openapi.json")
def openapi():
    """Serve the OpenAPI 3.1 document generated from the pydantic schemas."""
    return jsonify(openapi_document(gateway().settings))
