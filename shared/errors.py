"""Domain errors: each carries a stable code and the HTTP status it maps to."""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    """A failure the caller can act on, with a machine-readable code."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, code: str | None = None, details: Any = None):
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        self.details = details
        # Extra response headers (e.g. Retry-After on 429).
        self.headers: dict[str, str] = {}


class MalformedRequest(DomainError):
    status, code = 400, "malformed_request"


class Unauthenticated(DomainError):
    status, code = 401, "unauthenticated"

    def __init__(self, message: str, **kwargs: Any):
        super().__init__(message, **kwargs)
        self.headers["WWW-Authenticate"] = 'Bearer realm="gemma-jobs"'  # RFC 9110: a 401 names its scheme


class Forbidden(DomainError):
    status, code = 403, "forbidden"


class NotFound(DomainError):
    status, code = 404, "not_found"


class Conflict(DomainError):
    status, code = 409, "conflict"


class QuotaExceeded(DomainError):
    status, code = 409, "quota_exceeded"


class InvalidField(DomainError):
    status, code = 422, "invalid_field"


class TooManyRequests(DomainError):
    status, code = 429, "rate_limited"


class ServiceBusy(DomainError):
    status, code = 503, "busy"


class StorageUnavailable(DomainError):
    status, code = 503, "storage_unavailable"
