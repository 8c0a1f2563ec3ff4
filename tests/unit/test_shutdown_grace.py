"""A worker's shutdown grace runs from the first stop signal, however many follow."""

from __future__ import annotations

import time
from types import SimpleNamespace

from celery import signals

from workers.main import _hand_back_on_shutdown


def test_a_second_sigterm_does_not_put_the_hand_back_off():
    """Celery sends worker_shutting_down at each signal: each one restarted the grace, so a
    supervisor repeating SIGTERM kept the running job from being handed back."""
    # What the handler reads and sets of a worker's runtime: its settings and its deadline.
    runtime = SimpleNamespace(shutdown_deadline=None, settings=SimpleNamespace(shutdown_grace_s=30.0))
    handler = _hand_back_on_shutdown(runtime)
    try:
        signals.worker_shutting_down.send(sender="worker", sig="SIGTERM", how="Warm", exitcode=0)
        first = runtime.shutdown_deadline
        assert first is not None and first - time.monotonic() > 29
        time.sleep(0.05)
        signals.worker_shutting_down.send(sender="worker", sig="SIGTERM", how="Warm", exitcode=0)
        assert runtime.shutdown_deadline == first
    finally:
        signals.worker_shutting_down.disconnect(handler)
