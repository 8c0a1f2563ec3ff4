"""POST /v1/generations answered before Flask, for the common submit: a key without limits, no
`Prefer`, no `Idempotency-Key`, no stream, a base model."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterable

import structlog

from services.domain import jobs as job_domain
from services.domain import limits
from services.domain.adapters import is_adapter_id
from services.gateway.api.jobs import announce_submitted, job_path
from services.gateway.auth import bearer_token
from services.gateway.context import GatewayContext
from services.gateway.errors import INTERNAL_ERROR, database_unavailable_error
from services.gateway.handed_over import hand_over
from services.gateway.metrics import observe_request
from services.gateway.request_ids import RequestIds
from shared.db import DATABASE_UNAVAILABLE
from shared.schemas import GenerationRequest

log = structlog.get_logger(__name__)

SUBMIT_PATH = "/v1/generations"
# Headers whose meaning only the Flask route implements.
_FLASK_ONLY = ("HTTP_PREFER", "HTTP_IDEMPOTENCY_KEY")


class FastSubmits:
    """WSGI middleware: records and answers a plain submit without Flask.

    Flask's request context, routing, four hooks and a Response object were ~20% of a submit's
    GIL time in the gateway (py-spy, docs/benchmarks.md, twelfth session). Until the job is
    recorded nothing has happened, so whatever this path does not take — a key with limits,
    any header or body it leaves to the route, every invalid request — goes to the Flask app
    with the body put back, and is answered there. Once recording has begun it answers every
    outcome itself (a retry through Flask could record the job twice).
    """

    def __init__(self, wsgi_app: Callable, context: GatewayContext, request_ids: RequestIds):
        self.wsgi_app = wsgi_app
        self.context = context
        self.request_ids = request_ids

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        if (environ.get("REQUEST_METHOD") != "POST" or environ.get("PATH_INFO") != SUBMIT_PATH
                or any(header in environ for header in _FLASK_ONLY)):
            return self.wsgi_app(environ, start_response)
        started = time.perf_counter()
        raw = self._body(environ)
        planned = self._plan(environ, raw, started) if raw else None
        if planned is None:
            return self.wsgi_app(environ, start_response)
        caller, job = planned
        request_id = self.request_ids.for_request(environ.get("HTTP_X_REQUEST_ID", ""))
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id, method="POST", path=SUBMIT_PATH,
                                               key_id=caller.key_id)
        try:
            status, body, headers = self._record(job)
        finally:
            structlog.contextvars.clear_contextvars()
        start_response(status, [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            *headers,
            ("X-Request-ID", request_id),
        ])
        observe_request("POST", SUBMIT_PATH, int(status[:3]), time.perf_counter() - started)
        return [body]

    def _body(self, environ: dict) -> bytes | None:
        """Read the body and put it back for Flask; None if Flask should read it (no length, or
        over the limit: Flask answers 413)."""
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            return None
        if not 0 < length <= self.context.settings.max_body_bytes:
            return None
        raw = environ["wsgi.input"].read(length)
        environ["wsgi.input"] = io.BytesIO(raw)
        return raw

    def _plan(self, environ: dict, raw: bytes, started: float):
        """Return (caller, planned job) for a submit this path takes; None for the route's."""
        context = self.context
        try:
            caller = context.keys.authenticate(bearer_token(environ.get("HTTP_AUTHORIZATION", "")))
        except Exception as exc:  # noqa: BLE001 - the route answers it: the key is checked first there too
            hand_over(environ, started, exc)
            return None
        hand_over(environ, started)
        try:
            if limits.applies(caller, context.settings):
                return None
            data = json.loads(raw)
            if not isinstance(data, dict):
                return None
            body = GenerationRequest.model_validate(data)
            if body.stream or is_adapter_id(body.model):
                return None
            return caller, job_domain.plan_generation(
                caller, body, adapter=None, registry=context.registry, settings=context.settings,
                prompt_tokens=context.token_counter.at_submit(body, context.settings))
        except Exception:  # noqa: BLE001 - the route answers (and logs) what this path does not
            return None

    def _record(self, job) -> tuple[str, bytes, list[tuple[str, str]]]:
        """Record and publish the job as the route does; answer 202 with it, else 503 or 500 as
        the app's error handlers would."""
        context = self.context
        try:
            position = context.submits.run(job)
            announce_submitted(job)
            structlog.contextvars.bind_contextvars(job_id=job.id)
            described = job_domain.describe_new_job(job, position, context.live_queues.after_commit(context.db))
        except DATABASE_UNAVAILABLE as exc:
            error, headers = database_unavailable_error(exc)
            return "503 SERVICE UNAVAILABLE", _as_flask_json(error), list(headers.items())
        except Exception:  # noqa: BLE001 - as the app's last error handler answers
            log.exception("unhandled_error")
            return "500 INTERNAL SERVER ERROR", _as_flask_json(INTERNAL_ERROR), []
        return "202 ACCEPTED", described.model_dump_json().encode(), [("Location", job_path(job.id))]


def _as_flask_json(body: dict) -> bytes:
    """Serialize an error body byte for byte as the app's `jsonify` does."""
    return (json.dumps(body, separators=(",", ":"), sort_keys=True) + "\n").encode()
