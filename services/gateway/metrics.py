"""Prometheus metrics of the gateway: requests, latency, submits; queue depth and ended jobs from SQL.

gunicorn runs several worker processes; each writes its samples to files under
PROMETHEUS_MULTIPROC_DIR (set by `gemma-jobs gateway` before forking), and /metrics merges
them, so a scrape sees the whole gateway whichever process answers it.
"""

from __future__ import annotations

import os
import time

import structlog
from flask import Flask, Response, g, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from sqlalchemy.exc import SQLAlchemyError

from services.domain.operations import queue_stats
from services.gateway.handed_over import STARTED
from shared.job_store import ended_counts
from shared.models import utcnow

log = structlog.get_logger(__name__)

REQUESTS = Counter(
    "gemma_jobs_http_requests_total", "HTTP requests answered", ["method", "route", "status"]
)
LATENCY = Histogram(
    "gemma_jobs_http_request_duration_seconds",
    "HTTP request latency",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
JOBS_SUBMITTED = Counter("gemma_jobs_jobs_submitted_total", "Jobs accepted", ["kind", "model"])
HELD_REFUSED = Counter(
    "gemma_jobs_held_requests_refused_total",
    "Event streams refused (stream) and `Prefer: wait` waits skipped (wait) at a process's cap of held requests",
    ["kind"],
)


class DatabaseCollector:
    """Queue depth and running jobs per queue, and jobs ended by status, read from the database at scrape time.

    Ended jobs are counted where they end (a worker, the reaper, a cancel), in the same
    transaction, so the counter is the whole system's, whichever process ended the job.
    """

    def __init__(self, context):
        self.context = context

    def collect(self):
        queued = GaugeMetricFamily("gemma_jobs_queue_depth", "Jobs queued per queue", labels=["queue"])
        running = GaugeMetricFamily("gemma_jobs_jobs_running", "Jobs running per queue", labels=["queue"])
        oldest = GaugeMetricFamily(
            "gemma_jobs_queue_oldest_wait_seconds", "Wait of the oldest queued job", labels=["queue"]
        )
        consumers = GaugeMetricFamily("gemma_jobs_queue_live_workers", "Live workers consuming", labels=["queue"])
        ended = CounterMetricFamily(
            "gemma_jobs_jobs_finished", "Jobs that ended, by status", labels=["kind", "model", "status"]
        )
        database_up = GaugeMetricFamily("gemma_jobs_database_up", "1 if this scrape could read the database")
        settings = self.context.settings
        try:
            with self.context.db.session_scope(read_only=True) as session:
                for queue in queue_stats(session, utcnow(), settings.worker_dead_after_s):
                    queued.add_metric([queue.name], queue.queued)
                    running.add_metric([queue.name], queue.running)
                    oldest.add_metric([queue.name], queue.oldest_wait_s or 0.0)
                    consumers.add_metric([queue.name], queue.live_workers)
                for kind, model, status, jobs in ended_counts(session):
                    ended.add_metric([kind, model, status], jobs)
        except SQLAlchemyError as exc:
            # The request metrics still come: an outage is when they matter most.
            log.warning("metrics_database_unavailable", error=str(exc))
            database_up.add_metric([], 0)
            yield database_up
            return
        database_up.add_metric([], 1)
        yield from (queued, running, oldest, consumers, ended, database_up)


# Each (method, route, status)'s two series, looked up once: `labels` takes a lock and builds a
# key at every call, and this runs on every request.
_SERIES: dict[tuple[str, str, int], tuple] = {}
# The method label's values. gunicorn passes any token as a method, and this page needs no key:
# a label per made-up method let anyone add series without end (2 MB of page per 1,000).
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def observe_request(method: str, route: str, status: int, seconds: float) -> None:
    """Count one answered request and its latency, under its route's template."""
    key = (method, route, status)
    counter, latency = _SERIES.get(key) or _SERIES.setdefault(
        key, (REQUESTS.labels(method, route, str(status)), LATENCY.labels(method, route)))
    counter.inc()
    latency.observe(seconds)


def install_metrics(app: Flask, context) -> None:
    """Time and count every request, and serve GET /metrics."""

    @app.before_request
    def start_timer() -> None:
        # From when a fast path first took the request, if one handed it over.
        g.metrics_started = request.environ.get(STARTED) or time.perf_counter()

    @app.after_request
    def observe(response):
        # The route template, not the path: one series per endpoint, not per job id.
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        if route != "/metrics":
            method = request.method if request.method in METHODS else "other"
            observe_request(method, route, response.status_code,
                            time.perf_counter() - g.get("metrics_started", 0.0))
        return response

    @app.get("/metrics")
    def metrics() -> Response:
        registry = CollectorRegistry()
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            multiprocess.MultiProcessCollector(registry)
        else:
            from prometheus_client import REGISTRY

            registry = REGISTRY
        scrape = CollectorRegistry()
        scrape.register(DatabaseCollector(context))
        body = generate_latest(registry) + generate_latest(scrape)
        return Response(body, content_type=CONTENT_TYPE_LATEST)
