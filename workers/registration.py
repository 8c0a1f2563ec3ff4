"""A worker's entry in the worker registry: written at start, refreshed by a heartbeat thread."""

from __future__ import annotations

import os
import socket
import threading
from datetime import timedelta

import structlog
import torch
from sqlalchemy import func, select, update
from sqlalchemy.exc import SQLAlchemyError

from shared.models import WorkerRecord, utcnow
from workers.runtime import WorkerRuntime

log = structlog.get_logger(__name__)


class Registration:
    """Keeps this worker's row current: state, models, jobs in flight, heartbeat."""

    def __init__(self, rt: WorkerRuntime, role: str, queues: list[str]):
        self.rt = rt
        self.role = role
        self.queues = queues
        self.state = "starting"
        self.host = socket.gethostname()
        self._stop = threading.Event()

    def register(self) -> None:
        """Insert (or, for a reused id, replace) this worker's row."""
        gpu_name, gpu_memory_mb = _gpu(self.rt.device)
        now = utcnow()
        with self.rt.db.session_scope() as session:
            session.merge(
                WorkerRecord(
                    id=self.rt.worker_id,
                    host=self.host,
                    pid=os.getpid(),
                    device=str(self.rt.device),
                    gpu_name=gpu_name,
                    gpu_memory_mb=gpu_memory_mb,
                    role=self.role,
                    models=[],
                    queues=self.queues,
                    state=self.state,
                    jobs_in_flight=0,
                    jobs_done=0,
                    started_at=now,
                    heartbeat_at=now,
                    stopped_at=None,
                )
            )
        self._share_cpu()

    def mark(self, state: str) -> None:
        """Change state (ready, stopped) and write it at once."""
        self.state = state
        self.beat()

    def serve(self, queues: list[str]) -> None:
        """Record the queues it consumes, of the models it could load, and that it is ready."""
        self.queues = queues
        self.mark("ready")

    def beat(self) -> None:
        """Write the heartbeat, on the database's clock measured anew (hosts drift); a failed
        write is retried by the next beat."""
        rt = self.rt
        try:
            rt.db.sync_clock()
        except SQLAlchemyError as exc:
            log.warning("clock_not_synced", error=str(exc))  # the last offset stays
        state = "draining" if rt.shutdown_deadline is not None and self.state == "ready" else self.state
        values = {
            "state": state,
            "heartbeat_at": utcnow(),
            "models": rt.models.loaded_ids(),
            "queues": self.queues,
            "jobs_in_flight": rt.jobs_in_flight,
            "jobs_done": rt.jobs_done,
        }
        if state == "stopped":
            values["stopped_at"] = values["heartbeat_at"]
        row = WorkerRecord.id == rt.worker_id
        if state != "stopped":  # a beat that began before stop() must not write over its `stopped`
            row = row & (WorkerRecord.state != "stopped")
        try:
            with rt.db.session_scope() as session:
                session.execute(
                    update(WorkerRecord).where(row).values(**values).execution_options(synchronize_session=False)
                )
            self._share_cpu()
        except SQLAlchemyError as exc:
            log.warning("heartbeat_failed", error=str(exc))

    def _share_cpu(self) -> None:
        """On a CPU worker, split the host's cores among the live CPU workers on it."""
        if self.rt.cpu_threads is None:
            return
        live_since = utcnow() - timedelta(seconds=self.rt.settings.worker_dead_after_s)
        with self.rt.db.session_scope(read_only=True) as session:
            cpu_workers = session.scalar(
                select(func.count()).select_from(WorkerRecord).where(
                    WorkerRecord.host == self.host,
                    WorkerRecord.device == "cpu",
                    WorkerRecord.state != "stopped",
                    WorkerRecord.heartbeat_at >= live_since,
                )
            )
        self.rt.cpu_threads.share_with(cpu_workers)

    def start_heartbeat(self) -> None:
        """Beat every worker_heartbeat_s from a daemon thread until stop()."""

        def run() -> None:
            while not self._stop.wait(self.rt.settings.worker_heartbeat_s):
                self.beat()

        threading.Thread(target=run, name="heartbeat", daemon=True).start()

    def stop(self) -> None:
        """Stop beating and record the worker as stopped."""
        self._stop.set()
        self.mark("stopped")


def _gpu(device: torch.device) -> tuple[str | None, int | None]:
    if device.type != "cuda":
        return None, None
    properties = torch.cuda.get_device_properties(device)
    return properties.name, properties.total_memory // (1024 * 1024)
