"""The one place domain and HTTP errors become JSON error responses."""

from __future__ import annotations

import structlog
from flask import Flask, jsonify, request
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from shared.db import DATABASE_UNAVAILABLE, error_summary
from shared.errors import DomainError

log = structlog.get_logger(__name__)

# What an unexpected error answers (500), by the app or by a path before it.
INTERNAL_ERROR = {"error": {"code": "internal_error", "message": "internal server error; see gateway logs",
                            "details": None}}
DATABASE_RETRY_AFTER_S = 2


def error_response(status: int, code: str, message: str, details=None):
    """Return a Flask response in the error shape of the contract."""
    response = jsonify({"error": {"code": code, "message": message, "details": details}})
    response.status_code = status
    return response


def validation_details(exc: ValidationError) -> list[dict]:
    """Turn pydantic errors into `[{field, message}]`, fields as dotted paths."""
    return [
        {
            "field": ".".join(str(part) for part in error["loc"]) or "(body)",
            "message": error["msg"],
        }
        for error in exc.errors(include_url=False)
    ]


def database_unavailable_error(exc: Exception) -> tuple[dict, dict[str, str]]:
    """Log a database outage's error in one line; return the body and headers of its 503."""
    # One line, not a traceback per request: an outage fails every request alike.
    log.warning("database_unavailable", error_type=type(getattr(exc, "orig", None) or exc).__name__,
                error=error_summary(exc))
    message = (f"the job database is unavailable right now; retry in {DATABASE_RETRY_AFTER_S} s or more "
               "(a retried submit with the same Idempotency-Key is recorded once)")
    return ({"error": {"code": "database_unavailable", "message": message, "details": None}},
            {"Retry-After": str(DATABASE_RETRY_AFTER_S)})


def register_error_handlers(app: Flask) -> None:
    """Map every error to the JSON error shape with the right status."""

    @app.errorhandler(DomainError)
    def domain_error(exc: DomainError):
        response = error_response(exc.status, exc.code, exc.message, exc.details)
        response.headers.update(exc.headers)
        return response

    @app.errorhandler(ValidationError)
    def invalid_body(exc: ValidationError):
        details = validation_details(exc)
        # What is wrong with each field, in the message too: clients often show only the message.
        problems = "; ".join(f"{detail['field']}: {detail['message']}" for detail in details)
        return error_response(422, "invalid_field", f"invalid value for {problems}", details)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        codes = {
            404: "not_found",
            405: "method_not_allowed",
            413: "payload_too_large",
            415: "unsupported_media_type",
        }
        message = exc.description or exc.name
        if exc.code == 413:
            message = f"request body is over the limit of {app.config['MAX_CONTENT_LENGTH']} bytes"
        allowed = sorted(exc.valid_methods or []) if isinstance(exc, MethodNotAllowed) else []
        if allowed:
            message = f"{request.method} is not allowed here; use {', '.join(allowed)}"
        response = error_response(exc.code or 500, codes.get(exc.code, "http_error"), message)
        if allowed:
            response.headers["Allow"] = ", ".join(allowed)  # RFC 9110: a 405 says what is allowed
        return response

    def database_unavailable(exc: Exception):
        error, headers = database_unavailable_error(exc)
        response = error_response(503, **error["error"])
        response.headers.update(headers)
        return response

    for error_class in DATABASE_UNAVAILABLE:
        app.register_error_handler(error_class, database_unavailable)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        log.exception("unhandled_error")
        return error_response(500, **INTERNAL_ERROR["error"])
