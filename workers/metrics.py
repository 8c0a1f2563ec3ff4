"""Prometheus metrics of one worker process, served on --metrics-port (solo pool: one process)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram, start_http_server

if TYPE_CHECKING:  # torch only for GPU gauges: the result writer process imports this module
    import torch

DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600, 14400)

JOB_DURATION = Histogram(
    "gemma_jobs_worker_job_duration_seconds", "Time a job ran on this worker", ["kind"], buckets=DURATION_BUCKETS
)
QUEUE_WAIT = Histogram(
    "gemma_jobs_worker_queue_wait_seconds",
    "Time from submit to this worker claiming the job",
    ["kind", "model"],
    buckets=DURATION_BUCKETS,
)
TOKENS_GENERATED = Counter("gemma_jobs_worker_tokens_generated_total", "Tokens generated", ["model"])
TOKENS_PER_SECOND = Histogram(
    "gemma_jobs_worker_tokens_per_second",
    "Generation speed of each job",
    ["model"],
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000),
)
MODEL_LOAD_SECONDS = Gauge("gemma_jobs_worker_model_load_seconds", "Time the model took to load", ["model"])
JOBS_IN_FLIGHT = Gauge("gemma_jobs_worker_jobs_in_flight", "Jobs running on this worker")


def serve_metrics(port: int, device: torch.device, host: str = "127.0.0.1") -> None:
    """Serve /metrics on a port from a daemon thread; on CUDA, include GPU memory.

    On 127.0.0.1 unless told otherwise, as the gateway: prometheus_client's own default is
    every interface, which showed queue, model and GPU figures to anyone who could reach it.
    """
    if device.type == "cuda":
        import torch

        allocated = Gauge("gemma_jobs_worker_gpu_memory_allocated_bytes", "GPU memory held by tensors")
        allocated.set_function(lambda: torch.cuda.memory_allocated(device))
        reserved = Gauge("gemma_jobs_worker_gpu_memory_reserved_bytes", "GPU memory reserved by the allocator")
        reserved.set_function(lambda: torch.cuda.memory_reserved(device))
    try:
        start_http_server(port, addr=host)
    except OSError as exc:  # a port in use: one line, as `up` says it, not a traceback
        raise SystemExit(f"gemma-jobs: --metrics-port {port} on {host} cannot be served ({exc.strerror or exc}); "
                         "choose a free port") from None
