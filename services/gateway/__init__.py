"""The Flask gateway: validates, authenticates, records jobs and enqueues them."""

from __future__ import annotations

import structlog
from flask import Flask, g, request
from sqlalchemy.exc import SQLAlchemyError

from services.gateway.context import GatewayContext
from services.gateway.errors import register_error_handlers
from services.gateway.request_ids import RequestIds
from shared.settings import Settings, get_settings


def create_app(settings: Settings | None = None, *, check_schema: bool = True) -> Flask:
    """Build the gateway app; refuses to start on an out-of-date database schema."""
    settings = settings or get_settings()
    app = Flask("gemma_jobs_gateway")
    # Werkzeug refuses larger bodies with 413 before anything parses them.
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    context = GatewayContext.create(settings)
    if context.held.cap >= settings.gateway_threads:
        # Streams and waits could then take every thread: polls and health checks would wait.
        structlog.get_logger(__name__).warning(
            "held_requests_cap_not_below_threads", cap=context.held.cap, threads=settings.gateway_threads)
    if check_schema:
        try:
            context.db.check_schema()
        except SQLAlchemyError as exc:
            # A database that cannot be reached now (gunicorn replacing a worker mid-outage) must
            # not stop the process: gunicorn shuts the whole gateway down when a worker cannot
            # boot. `gemma-jobs gateway` checked the schema before forking; /readyz tells the rest.
            structlog.get_logger(__name__).warning("schema_not_checked", error=str(exc))
    app.extensions["gemma_jobs"] = context

    register_error_handlers(app)
    request_ids = RequestIds()
    _register_request_context(app, request_ids)
    from services.gateway.metrics import install_metrics

    install_metrics(app, context)
    from services.gateway.handed_over import install_error_replay

    install_error_replay(app)

    from services.gateway.api import admin, files, fine_tunes, jobs, models, system, usage

    for module in (system, jobs, fine_tunes, files, models, usage, admin):
        app.register_blueprint(module.blueprint)
    from services.gateway.fast_polls import FastPolls
    from services.gateway.fast_submits import FastSubmits

    app.wsgi_app = FastSubmits(FastPolls(app.wsgi_app, context, request_ids), context, request_ids)
    return app


def _register_request_context(app: Flask, request_ids: RequestIds) -> None:
    """Bind a request id to every log line of a request and echo it back."""

    @app.before_request
    def bind_request_id() -> None:
        g.request_id = request_ids.for_request(request.headers.get("X-Request-ID", ""))
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(
            request_id=g.request_id, method=request.method, path=request.path
        )

    @app.after_request
    def add_request_id(response):
        response.headers["X-Request-ID"] = g.get("request_id", "")
        return response
