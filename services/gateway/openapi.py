"""The OpenAPI 3.1 document, generated from the pydantic schemas of the API."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from shared import schemas
from shared.settings import Settings

REF = "#/components/schemas/{model}"

# (method, path) -> (summary, request schema, {status: response schema}, authenticated)
ROUTES: dict[tuple[str, str], tuple[str, type[BaseModel] | None, dict[int, type[BaseModel]], bool]] = {
    ("post", "/v1/generations"): (
        "Create a generation job (with `stream: true`, answer with its Server-Sent Events)",
        schemas.GenerationRequest,
        {200: schemas.Job, 202: schemas.Job, 400: schemas.ErrorResponse, 401: schemas.ErrorResponse,
         404: schemas.ErrorResponse, 409: schemas.ErrorResponse, 413: schemas.ErrorResponse,
         422: schemas.ErrorResponse, 429: schemas.ErrorResponse},
        True,
    ),
    ("post", "/v1/jobs/{job_id}/cancel"): (
        "Cancel a queued or running job (idempotent)",
        None,
        {200: schemas.Job, 401: schemas.ErrorResponse, 404: schemas.ErrorResponse, 409: schemas.ErrorResponse},
        True,
    ),
    ("get", "/v1/jobs/{job_id}"): (
        "Get one of your jobs",
        None,
        {200: schemas.Job, 401: schemas.ErrorResponse, 404: schemas.ErrorResponse},
        True,
    ),
    ("get", "/v1/jobs"): (
        "List your jobs, newest first",
        None,
        {200: schemas.JobList, 401: schemas.ErrorResponse, 422: schemas.ErrorResponse},
        True,
    ),
    ("get", "/v1/jobs/{job_id}/events"): (
        "A job's events (status changes, training progress and losses), oldest first; with "
        "`Accept: text/event-stream`, a live Server-Sent Events stream with tokens, ending with `done`",
        None,
        {200: schemas.JobEventList, 401: schemas.ErrorResponse, 404: schemas.ErrorResponse,
         422: schemas.ErrorResponse, 503: schemas.ErrorResponse},
        True,
    ),
    ("get", "/v1/models"): (
        "List the base models and your adapters",
        None,
        {200: schemas.ModelList, 401: schemas.ErrorResponse, 422: schemas.ErrorResponse},
        True,
    ),
    ("delete", "/v1/models/{model_id}"): (
        "Delete one of your fine-tuned adapters",
        None,
        {200: schemas.FileDeleted, 401: schemas.ErrorResponse, 404: schemas.ErrorResponse,
         422: schemas.ErrorResponse},
        True,
    ),
    ("post", "/v1/files"): (
        "Upload a JSONL training file (multipart: `file`, `purpose=fine-tune`; 409 past the key's file quota)",
        None,  # multipart, described in MULTIPART_BODIES
        {201: schemas.FileInfo, 400: schemas.ErrorResponse, 401: schemas.ErrorResponse, 409: schemas.ErrorResponse,
         413: schemas.ErrorResponse, 422: schemas.ErrorResponse, 503: schemas.ErrorResponse},
        True,
    ),
    ("get", "/v1/files"): (
        "List your files, newest first",
        None,
        {200: schemas.FileList, 401: schemas.ErrorResponse, 422: schemas.ErrorResponse},
        True,
    ),
    ("get", "/v1/files/{file_id}"): (
        "Get one of your files",
        None,
        {200: schemas.FileInfo, 401: schemas.ErrorResponse, 404: schemas.ErrorResponse},
        True,
    ),
    ("delete", "/v1/files/{file_id}"): (
        "Delete one of your files (409 while a fine-tune that has not ended names it)",
        None,
        {200: schemas.FileDeleted, 401: schemas.ErrorResponse, 404: schemas.ErrorResponse,
         409: schemas.ErrorResponse},
        True,
    ),
    ("post", "/v1/fine-tunes"): (
        "Create a LoRA fine-tuning job",
        schemas.FineTuneRequest,
        {202: schemas.Job, 400: schemas.ErrorResponse, 401: schemas.ErrorResponse, 409: schemas.ErrorResponse,
         413: schemas.ErrorResponse, 422: schemas.ErrorResponse, 429: schemas.ErrorResponse},
        True,
    ),
    ("get", "/v1/usage"): (
        "Your own usage totals",
        None,
        {200: schemas.UsageTotals, 401: schemas.ErrorResponse, 422: schemas.ErrorResponse},
        True,
    ),
    ("post", "/v1/admin/keys"): (
        "Create an API key (admin); the plaintext is shown once",
        schemas.KeyCreate,
        {201: schemas.KeyCreated, 400: schemas.ErrorResponse, 401: schemas.ErrorResponse,
         403: schemas.ErrorResponse, 422: schemas.ErrorResponse},
        True,
    ),
    ("get", "/v1/admin/keys"): (
        "List API keys (admin)",
        None,
        {200: schemas.KeyList, 401: schemas.ErrorResponse, 403: schemas.ErrorResponse, 422: schemas.ErrorResponse},
        True,
    ),
    ("delete", "/v1/admin/keys/{key_id}"): (
        "Revoke an API key (admin)",
        None,
        {200: schemas.KeyInfo, 401: schemas.ErrorResponse, 403: schemas.ErrorResponse, 404: schemas.ErrorResponse},
        True,
    ),
    ("get", "/v1/admin/usage"): (
        "Usage of all keys grouped by key, model or day (admin)",
        None,
        {200: schemas.UsageReport, 401: schemas.ErrorResponse, 403: schemas.ErrorResponse,
         422: schemas.ErrorResponse},
        True,
    ),
    ("get", "/v1/admin/workers"): (
        "Live workers; with include_gone, then those gone in the last hour (admin)",
        None,
        {200: schemas.WorkerList, 401: schemas.ErrorResponse, 403: schemas.ErrorResponse,
         422: schemas.ErrorResponse},
        True,
    ),
    ("get", "/v1/admin/queues"): (
        "Queues: depth, oldest waiting job, live consumers (admin)",
        None,
        {200: schemas.QueueList, 401: schemas.ErrorResponse, 403: schemas.ErrorResponse,
         422: schemas.ErrorResponse},
        True,
    ),
    ("get", "/healthz"): ("Liveness", None, {200: schemas.Health}, False),
    ("get", "/readyz"): ("Readiness: database and Redis", None, {200: schemas.Health, 503: schemas.Health}, False),
}

# Routes whose answer is not one of the schemas: (summary, content type, schema of the body).
OTHER_ROUTES = {
    ("get", "/metrics"): ("Prometheus metrics of the gateway and the queues (no key)", "text/plain",
                          {"type": "string"}),
    ("get", "/openapi.json"): ("This document", "application/json", {"type": "object"}),
}

# Response headers, by status (any route) or by (method, path, status).
_HEADER = {
    "Retry-After": {"description": "seconds to wait before trying again", "schema": {"type": "integer"}},
    "RateLimit-Policy": {"description": "the key's limits (IETF RateLimit headers draft)", "schema": {"type": "string"}},
    "RateLimit": {"description": "what is left of each limit and when it resets", "schema": {"type": "string"}},
    "Location": {"description": "where the created resource is read", "schema": {"type": "string"}},
    "Idempotent-Replayed": {"description": "`true`: an earlier submit with this Idempotency-Key made the job",
                            "schema": {"type": "string", "enum": ["true"]}},
    "Preference-Applied": {"description": "`wait=N`: the request was held up to N seconds (Prefer: wait)",
                           "schema": {"type": "string"}},
    "WWW-Authenticate": {"description": "how to authenticate: `Bearer`", "schema": {"type": "string"}},
}
HEADERS_BY_STATUS = {401: ["WWW-Authenticate"], 429: ["Retry-After", "RateLimit-Policy", "RateLimit"],
                     503: ["Retry-After"]}
_SUBMIT_HEADERS = ["Location", "Idempotent-Replayed", "Preference-Applied", "RateLimit-Policy", "RateLimit"]
HEADERS_BY_ROUTE = {
    ("post", "/v1/generations", 200): _SUBMIT_HEADERS,
    ("post", "/v1/generations", 202): _SUBMIT_HEADERS,
    ("post", "/v1/fine-tunes", 202): _SUBMIT_HEADERS,
    ("post", "/v1/files", 201): ["Location"],
}

# This server's caps on a generation request (settings), put on the schema's fields.
GENERATION_CAPS = {
    "max_new_tokens": ("maximum", "max_new_tokens"),
    "timeout_s": ("maximum", "max_timeout_s"),
    "ttl_s": ("maximum", "max_ttl_s"),
    "messages": ("maxItems", "max_messages"),
    "prompt": ("maxLength", "max_prompt_chars"),
}

_RANGE = [
    {"name": "from", "in": "query", "schema": {"type": "string", "format": "date-time"}},
    {"name": "to", "in": "query", "schema": {"type": "string", "format": "date-time"}},
]

MULTIPART_BODIES = {
    ("post", "/v1/files"): {
        "type": "object",
        "required": ["file", "purpose"],
        "properties": {
            "file": {"type": "string", "format": "binary", "description": "JSONL, UTF-8, one row per line"},
            "purpose": {"type": "string", "enum": ["fine-tune"]},
        },
    },
}

QUERY_PARAMETERS = {
    "/v1/usage": _RANGE,
    "/v1/admin/usage": [
        *_RANGE,
        {"name": "group_by", "in": "query", "schema": {"type": "string", "enum": ["key", "model", "day"]}},
        {"name": "key_id", "in": "query", "schema": {"type": "string", "maxLength": 40}},
    ],
    "/v1/admin/workers": [{"name": "include_gone", "in": "query", "schema": {"type": "boolean"}}],
    "/v1/jobs/{job_id}/events": [
        {"name": "after", "in": "query", "schema": {"type": "integer", "minimum": 0}},
        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
    ],
    "/v1/jobs": [
        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
        {"name": "after", "in": "query", "schema": {"type": "string", "maxLength": 40, "pattern": "^[0-9A-Za-z_-]+$"}},
        {"name": "status", "in": "query", "schema": {"type": "string", "enum": ["queued", "running", "succeeded", "failed", "cancelled"]}},
        {"name": "kind", "in": "query", "schema": {"type": "string", "enum": ["generation", "fine_tune"]}},
    ],
}

# 200 answers that are Server-Sent Events when asked for (see docs/usage.md, Streaming).
EVENT_STREAM_ANSWERS = {("post", "/v1/generations"), ("get", "/v1/jobs/{job_id}/events")}
EVENT_STREAM_CONTENT = {
    "schema": {"type": "string"},
    "example": 'id: 0:1718000000000-1\nevent: token\ndata: {"text":" Paris","token_ids":[9079],"attempt":1}\n\n',
}

OPERATION_IDS = {
    ("get", "/v1/jobs/{job_id}"): "get_job",
    ("post", "/v1/jobs/{job_id}/cancel"): "cancel_job",
}

IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key", "in": "header", "schema": {"type": "string", "minLength": 1, "maxLength": 200},
    "description": "same key and body: the same job again; same key, other body: 409",
}

HEADER_PARAMETERS = {
    ("get", "/v1/jobs/{job_id}/events"): [
        {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string"},
         "description": "event stream only: resume after this event id (`<event id>:<stream entry id>`)"},
    ],
    ("post", "/v1/generations"): [
        {"name": "Prefer", "in": "header", "schema": {"type": "string"},
         "description": "`wait=N`: hold the request up to N seconds for the finished job"},
        IDEMPOTENCY_KEY,
    ],
    ("post", "/v1/fine-tunes"): [IDEMPOTENCY_KEY],
}


def openapi_document(settings: Settings) -> dict[str, Any]:
    """Return the document, with this server's caps on generation requests."""
    return _document(tuple((field, keyword, getattr(settings, setting))
                           for field, (keyword, setting) in GENERATION_CAPS.items()))


@lru_cache(maxsize=4)
def _document(caps: tuple[tuple[str, str, float], ...]) -> dict[str, Any]:
    """Build the document once per process (and set of caps)."""
    models = {model for _, request, responses, _ in ROUTES.values() for model in [request, *responses.values()] if model}
    _, definitions = models_json_schema(
        [(model, "validation") for model in sorted(models, key=lambda m: m.__name__)],
        ref_template=REF,
    )
    paths: dict[str, dict[str, Any]] = {}
    for (method, path), (summary, request, responses, authenticated) in ROUTES.items():
        operation: dict[str, Any] = {
            "summary": summary,
            "responses": {
                str(status): {
                    "description": summary if status < 300 else "error",
                    "content": {"application/json": {"schema": {"$ref": REF.format(model=model.__name__)}}},
                }
                for status, model in responses.items()
            },
        }
        parameters = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in _path_parameters(path)
        ] + QUERY_PARAMETERS.get(path, []) + HEADER_PARAMETERS.get((method, path), [])
        if parameters:
            operation["parameters"] = parameters
        if (method, path) in MULTIPART_BODIES:
            operation["requestBody"] = {
                "required": True,
                "content": {"multipart/form-data": {"schema": MULTIPART_BODIES[(method, path)]}},
            }
        elif request is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": REF.format(model=request.__name__)}}},
            }
        if authenticated:
            operation["security"] = [{"bearer": []}]
            # Every authenticated route reads the database: while it is down, 503 `database_unavailable`.
            operation["responses"].setdefault("503", {
                "description": "error",
                "content": {"application/json": {"schema": {"$ref": REF.format(model="ErrorResponse")}}},
            })
        for status, response in operation["responses"].items():
            names = HEADERS_BY_STATUS.get(int(status), []) + HEADERS_BY_ROUTE.get((method, path, int(status)), [])
            if names:
                response["headers"] = {name: _HEADER[name] for name in names}
        if (method, path) in EVENT_STREAM_ANSWERS:
            operation["responses"]["200"]["content"]["text/event-stream"] = EVENT_STREAM_CONTENT
        if (method, path) == ("post", "/v1/generations"):
            # The job a submit returns can be read and cancelled (lets fuzzers chain calls).
            links = {
                "GetJob": {"operationId": "get_job", "parameters": {"job_id": "$response.body#/id"}},
                "CancelJob": {"operationId": "cancel_job", "parameters": {"job_id": "$response.body#/id"}},
            }
            for status in ("200", "202"):
                operation["responses"][status]["links"] = links
        operation["operationId"] = OPERATION_IDS.get((method, path), f"{method}_{path.strip('/').replace('/', '_')}")
        paths.setdefault(path, {})[method] = operation
    for (method, path), (summary, content_type, body) in OTHER_ROUTES.items():
        paths.setdefault(path, {})[method] = {
            "summary": summary,
            "operationId": f"{method}_{path.strip('/').replace('.', '_')}",
            "responses": {"200": {"description": summary, "content": {content_type: {"schema": body}}}},
        }
    generation = definitions["$defs"]["GenerationRequest"]["properties"]
    for field, keyword, cap in caps:
        _cap(generation[field], keyword, cap)
    return {
        "openapi": "3.1.0",
        "info": {"title": "gemma-jobs", "version": "1"},
        "paths": paths,
        "components": {
            "schemas": definitions.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _cap(schema: dict[str, Any], keyword: str, cap: float) -> None:
    """Put a server cap on a field's schema (on each non-null branch of an optional field)."""
    for branch in schema.get("anyOf", [schema]):
        if branch.get("type") != "null":
            branch[keyword] = min(branch.get(keyword, cap), cap)


def _path_parameters(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{")]
