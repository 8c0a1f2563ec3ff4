"""Bearer-key authentication for routes."""

from __future__ import annotations

from functools import wraps

import structlog
from flask import g, request

from services.domain.keys import Caller
from services.gateway.context import gateway
from shared.errors import Forbidden


def require_key(role: str | None = None):
    """Authenticate the request's bearer key (and check its role) before the route runs."""

    def decorate(view):
        @wraps(view)
        def wrapper(*args, **kwargs):
            caller = gateway().keys.authenticate(bearer_token(request.headers.get("Authorization", "")))
            if role == "admin" and not caller.is_admin:
                raise Forbidden("this route needs an admin key")
            g.caller = caller
            structlog.contextvars.bind_contextvars(key_id=caller.key_id)
            return view(*args, **kwargs)

        return wrapper

    return decorate


def bearer_token(header: str) -> str | None:
    """Return the key of an `Authorization: Bearer <key>` header (None for any other scheme)."""
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def current_caller() -> Caller:
    """Return the authenticated caller of this request."""
    return g.caller
