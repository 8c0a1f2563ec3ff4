"""Serving the gateway app with gunicorn, configured in code."""

from __future__ import annotations

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
        }
    ).run()
