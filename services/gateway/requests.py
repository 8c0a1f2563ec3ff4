"""Parsing of request bodies and headers into validated values, and JSON answers from schemas."""

from __future__ import annotations

import json
import re
from typing import TypeVar

from flask import Response, request
from pydantic import BaseModel, ConfigDict
from werkzeug.exceptions import RequestEntityTooLarge

from shared.errors import InvalidField, MalformedRequest

Schema = TypeVar("Schema", bound=BaseModel)

_PREFER_WAIT = re.compile(r"(?:^|[;,\s])wait\s*=\s*(\d+(?:\.\d+)?)", re.IGNORECASE)


def parse_body(schema: type[Schema]) -> Schema:
    """Parse the JSON body: malformed JSON is 400, a bad field is 422 (pydantic)."""
    raw = _read_body()
    if not raw:
        raise MalformedRequest("the request needs a JSON body")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedRequest(f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise MalformedRequest("the body is nested too deeply") from None
    if not isinstance(data, dict):
        raise MalformedRequest("the body must be a JSON object")
    return schema.model_validate(data)


def _read_body() -> bytes:
    """Read the body whole; over the size limit is a 413, also when it comes without a length."""
    raw = request.get_data(cache=False)
    limit = request.max_content_length
    # A chunked body (no Content-Length) werkzeug stops reading at the limit without a word, so
    # a longer one would be parsed cut short (a 400 that hides the cause): look one byte further.
    if request.content_length is None and limit is not None and len(raw) >= limit:
        if request.environ["wsgi.input"].read(1):
            raise RequestEntityTooLarge()
    return raw


def parse_query(schema: type[Schema]) -> Schema:
    """Validate query parameters with a schema (422 names the bad parameter)."""
    # `to_dict` keeps a repeated parameter's first value and drops the rest without a word.
    repeated = sorted(name for name, values in request.args.lists() if len(values) > 1)
    if repeated:
        raise InvalidField(
            f"query parameter {repeated[0]!r} is given more than once; give it once",
            details=[{"field": name, "message": "given more than once"} for name in repeated],
        )
    return schema.model_validate(request.args.to_dict())


class NoQuery(BaseModel):
    """The query of a route that takes no parameters."""

    model_config = ConfigDict(extra="forbid")


def refuse_query() -> None:
    """Refuse (422) any query parameter on a route that takes none: ignored, a client's
    `?limit=1` on a list seemed to page, and returned everything."""
    parse_query(NoQuery)


def prefer_wait_seconds(max_wait_s: float) -> float:
    """Return the seconds asked for by `Prefer: wait=N`, capped at the server maximum."""
    match = _PREFER_WAIT.search(request.headers.get("Prefer", ""))
    if not match:
        return 0.0
    return min(float(match.group(1)), max_wait_s)


def json_response(body: BaseModel, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """Answer with a schema serialized by pydantic in one step (no dict, no second JSON encoder)."""
    return Response(body.model_dump_json(), status, headers, mimetype="application/json")
