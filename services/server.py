"""Serving the gateway app with gunicorn, configured in code."""

from __future__ import annotations

import os
import shutil
import tempfile

from gunicorn.app.base import BaseApplication


class _GatewayServer(BaseApplication):
    """A gunicorn application whose workers each build their own app (fresh DB pool per fork)."""

    def __init__(self, options: dict):
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self):
        from services.gateway import create_app

        return create_app()


def serve_gateway(host: str, port: int, *, workers: int, threads: int, timeout_s: int) -> None:
    """Serve until stopped; threads let `Prefer: wait` requests wait without blocking others."""
    # Set before any worker forks: each process then writes its Prometheus samples there.
    metrics_dir = tempfile.mkdtemp(prefix="gemma-jobs-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        _serve(host, port, workers=workers, threads=threads, timeout_s=timeout_s)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _child_exit(_server, worker) -> None:
    """Drop a dead gunicorn worker's live gauges from the merged metrics."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def _serve(host: str, port: int, *, workers: int, threads: int, timeout_s: int) -> None:
    _GatewayServer(
        {
            "bind": f"{host}:{port}",
            "workers": workers,
            "worker_class": "gthread",
            "threads": threads,
            "timeout": timeout_s,
            "graceful_timeout": 10,
            "accesslog": None,
            "errorlog": "-",
            "loglevel": "warning",
            "child_exit": _child_exit,
        }
    ).run()
