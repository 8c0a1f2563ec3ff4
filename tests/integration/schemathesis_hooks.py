"""Schemathesis hooks for test_schemathesis.py (loaded through SCHEMATHESIS_HOOKS)."""

from __future__ import annotations

import schemathesis
from pydantic import TypeAdapter, ValidationError

_AS_BOOL = TypeAdapter(bool)


@schemathesis.hook
def map_case(context, case):
    """Submit without `stream`: a stream lasts until its job ends, and no worker runs there."""
    body = case.body
    if case.path == "/v1/generations" and isinstance(body, dict) and "stream" in body:
        try:
            # The gateway reads lax booleans ("true", 1, "on"): replace whatever it takes as true.
            if _AS_BOOL.validate_python(body["stream"]):
                body["stream"] = False
        except ValidationError:
            pass  # not a boolean: a 422 case, kept as generated
    return case
