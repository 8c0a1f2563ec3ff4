"""A worker's shutdown grace runs from the first stop signal, however many follow."""

from __future__ import annotations

import time
from types import SimpleNamespace

from celery import signals

from workers.main import _hand_back_on_shutdown
from workers.runtime import WorkerRuntime


def test_a_second_sigterm_does_not_put_the_hand_back_off():
    """Celery sends worker_shutting_down at each signal: each one restarted the grace, so a
    supervisor repeating SIGTERM kept the running job from being handed back."""
    runtime = _runtime()
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


def test_a_cold_shutdown_ends_the_grace_at_once():
    """A second Ctrl-C or SIGQUIT after a SIGTERM: the running jobs go back now, not at the grace's end."""
    runtime = _runtime()
    handler = _hand_back_on_shutdown(runtime)
    try:
        signals.worker_shutting_down.send(sender="worker", sig="SIGINT", how="Warm", exitcode=1)
        assert runtime.shutdown_deadline - time.monotonic() > 29
        signals.worker_shutting_down.send(sender="worker", sig="SIGINT", how="Cold", exitcode=1)
        assert runtime.shutdown_deadline <= time.monotonic()
        signals.worker_shutting_down.send(sender="worker", sig="SIGTERM", how="Warm", exitcode=0)
        assert runtime.shutdown_deadline <= time.monotonic()  # a later signal never lengthens it
    finally:
        signals.worker_shutting_down.disconnect(handler)


def _runtime() -> SimpleNamespace:
    """What the handler uses of a worker's runtime: its settings, its deadline, `start_shutdown`."""
    runtime = SimpleNamespace(shutdown_deadline=None, settings=SimpleNamespace(shutdown_grace_s=30.0))
    runtime.start_shutdown = lambda grace_s: WorkerRuntime.start_shutdown(runtime, grace_s)
    return runtime
