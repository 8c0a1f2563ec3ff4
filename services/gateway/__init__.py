"""The Flask gateway: validates, authenticates, records jobs and enqueues them."""

from __future__ import annotations

import itertools
import secrets

import structlog
from flask import Flask, g, request

from services.gateway.context import GatewayContext
from services.gateway.errors import register_error_handlers
from shared.settings import Settings, get_settings


def create_app(settings: Settings | None = None, *, check_schema: bool = True) -> Flask:
    """Build the gateway app; refuses to start on an out-of-date database schema."""
    settings = settings or get_settings()
    app = Flask("gemma_jobs_gateway")
    # Werkzeug refuses larger bodies with 413 before anything parses them.
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    context = GatewayContext.create(settings)
    if check_schema:
        context.db.check_schema()
    app.extensions["gemma_jobs"] = context

    register_error_handlers(app)
    _register_request_context(app)
    from services.gateway.metrics import install_metrics

    install_metrics(app, context)

    from services.gateway.api import admin, files, fine_tunes, jobs, models, system, usage

    for module in (system, jobs, fine_tunes, files, models, usage, admin):
        app.register_blueprint(module.blueprint)
    return app


def _register_request_context(app: Flask) -> None:
    """Bind a request id to every log line of a request and echo it back."""

    # A random prefix per process and a counter: unique like a UUID, without a system call per request.
    prefix = secrets.token_hex(8)
    counter = itertools.count()

    @app.before_request
    def bind_request_id() -> None:
        incoming = request.headers.get("X-Request-ID", "")
        g.request_id = incoming if 0 < len(incoming) <= 100 else f"{prefix}{next(counter):016x}"
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(
            request_id=g.request_id, method=request.method, path=request.path
        )

    @app.after_request
    def add_request_id(response):
        response.headers["X-Request-ID"] = g.get("request_id", "")
        return response
