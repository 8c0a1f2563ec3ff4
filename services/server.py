"""Serving the gateway app with gunicorn, configured in code."""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
from collections.abc import Callable

from gunicorn.app.base import BaseApplication
from gunicorn.glogging import Logger


class GunicornApp(BaseApplication):
    """A gunicorn application whose workers each build their own app (fresh DB pool per fork)."""

    def __init__(self, options: dict, load_app: Callable):
        self.options = options
        self.load_app = load_app
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self):
        app = self.load_app()
        # What the worker holds now lives as long as it does: keep it out of the garbage
        # collector's full passes, which otherwise walk it all (~200 ms for the gateway on a
        # 2-core machine) and stall whichever request triggers one; frozen, a pass takes ~10 ms.
        gc.freeze()
        return app


class RootHandlerLogger(Logger):
    """gunicorn's own lines (a worker that exited or timed out) through the root logger's
    handler, rendered as every other line of the gateway (JSON by default), not in gunicorn's
    plain-text format."""

    def setup(self, cfg) -> None:
        super().setup(cfg)
        for log in (self.error_log, self.access_log):
            for handler in list(log.handlers):
                log.removeHandler(handler)
            log.propagate = True


def gunicorn_options(host: str, port: int, *, workers: int, threads: int, timeout_s: int) -> dict:
    """Return the gateway's gunicorn settings (benchmarks serve their baseline with the same)."""
    return {
        "bind": f"{host}:{port}",
        "workers": workers,
        "worker_class": "gthread",
        "threads": threads,
        "timeout": timeout_s,
        "graceful_timeout": 10,
        "accesslog": None,
        "errorlog": "-",
        "loglevel": "warning",
        "logger_class": RootHandlerLogger,
    }


def serve_gateway(host: str, port: int, *, workers: int, threads: int, timeout_s: int) -> None:
    """Serve until stopped; threads let `Prefer: wait` requests wait without blocking others."""
    # Set before any worker forks: each process then writes its Prometheus samples there.
    metrics_dir = tempfile.mkdtemp(prefix="gemma-jobs-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        options = gunicorn_options(host, port, workers=workers, threads=threads, timeout_s=timeout_s)
        GunicornApp({**options, "child_exit": _child_exit}, _gateway_app).run()
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _gateway_app():
    from services.gateway import create_app

    return create_app()


def _child_exit(_server, worker) -> None:
    """Drop a dead gunicorn worker's live gauges from the merged metrics."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
