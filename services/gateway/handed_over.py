"""What a fast path (FastPolls, FastSubmits) hands the Flask app with a request it did not answer."""

from __future__ import annotations

from flask import Flask, request

from shared.db import DATABASE_UNAVAILABLE
from shared.errors import DomainError

# When the request reached the gateway: its latency metric starts there, not at Flask.
STARTED = "gemma_jobs.started"
# An error the fast path met that Flask answers as if its route had met it: a key that does not
# authenticate, a job that is not the caller's, the database down. Doing the work again there
# read the key or the job twice, and during an outage waited out two failed connections.
ERROR = "gemma_jobs.error"
ANSWERED_BY_FLASK = (DomainError, *DATABASE_UNAVAILABLE)


def hand_over(environ: dict, started: float, error: Exception | None = None) -> None:
    """Note on the request when it started and, if Flask can answer it as it is, its error."""
    environ[STARTED] = started
    if isinstance(error, ANSWERED_BY_FLASK):
        environ[ERROR] = error


def install_error_replay(app: Flask) -> None:
    """Answer an error a fast path handed over with the app's own handlers (after the request
    id and the timer hooks, so it is logged, counted and timed as any request)."""

    @app.before_request
    def raise_handed_over_error() -> None:
        error = request.environ.pop(ERROR, None)
        if error is not None:
            raise error
