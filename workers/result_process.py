"""The result writer in a process of its own, so that storing results takes no GIL time from
the worker's tasks and its model."""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Callable

import redis
import structlog
from sqlalchemy.exc import SQLAlchemyError

from shared.db import Database
from shared.logging import bind_process_fields, configure_logging
from shared.settings import Settings
from workers.connections import connect_database, connect_redis
from workers.result_writer import FinishedJob, ResultWriter

log = structlog.get_logger(__name__)

# Spawned, not forked: the worker has torch (and maybe CUDA) loaded, and threads running.
_SPAWN = multiprocessing.get_context("spawn")
# While a task is still running, wait this long for more results (up to LINGER_UNTIL of them)
# before writing: a group of one costs two round trips and a commit for one job. A finished
# job's end is announced at most this much later; an idle worker's at once.
LINGER_S = 0.002
LINGER_UNTIL = 8
MAX_GROUP = 256
WRITER_NICENESS = 10


class ResultProcess:
    """The worker's side: hands finished jobs to the writer process over a pipe.

    In the worker's process a writer thread cost the worker ~0.7 ms of CPU (GIL time) per no-op
    job (docs/benchmarks.md, eleventh session). The worker starts it before loading its models
    and says it is ready once the writer is (else the first result starts one). If it dies, a
    new one takes the next results; the jobs it held are safe where they were (their rows stay
    `running` until a lease lapses, and the reaper runs them again).
    """

    def __init__(self, settings: Settings, worker_id: str):
        self.settings = settings
        self.worker_id = worker_id
        # Jobs running in the worker (its heartbeat reports it): while some are, the writer
        # waits a little for their results. Written by the worker's task threads, under its lock.
        self._in_flight = _SPAWN.RawValue("i", 0)
        self._lock = threading.Lock()
        self._conn: Connection | None = None
        self._process: multiprocessing.process.BaseProcess | None = None
        self._ready = _SPAWN.Event()  # set by the writer process once it can write
        self._closed = False

    @property
    def jobs_in_flight(self) -> int:
        """Jobs the worker runs now."""
        return self._in_flight.value

    @jobs_in_flight.setter
    def jobs_in_flight(self, count: int) -> None:
        self._in_flight.value = count

    def start(self) -> None:
        """Start the writer process now (it takes ~1 s to import), not with the first result."""
        with self._lock:
            if self._process is None:
                self._start()

    def wait_ready(self, timeout_s: float) -> bool:
        """Wait until the writer process can write; False if it did not in time, or died.

        A worker that took jobs before would fill the pipe (~70 no-op results) within a
        fraction of a second and stop at the next hand-over until the writer came up.
        """
        deadline = time.monotonic() + timeout_s
        while not self._ready.wait(0.1):
            if self._process is None or not self._process.is_alive() or time.monotonic() > deadline:
                return False
        return True

    def put(self, job: FinishedJob) -> None:
        """Hand a finished job to the writer process.

        Waits while the pipe is full (~100 jobs): a database that stopped answering stops the
        worker taking jobs, rather than piling up results that a crash would lose.
        """
        with self._lock:
            if self._closed:
                raise RuntimeError("the result writer is closed")
            if self._process is not None and not self._process.is_alive():
                log.error("result_writer_lost", exitcode=self._process.exitcode)
            if self._process is None or not self._process.is_alive():
                self._start()
            try:
                self._conn.send(job)
            except OSError as exc:  # it died since: what it held is left to the leases
                log.error("result_writer_lost", exitcode=self._process.exitcode, error=str(exc))
                self._start()
                self._conn.send(job)

    def close(self, timeout_s: float = 30.0) -> bool:
        """Let the writer write what it holds and stop; return whether it did so in time."""
        with self._lock:
            self._closed = True
            if self._process is None:
                return True
            try:
                self._conn.send(None)
            except OSError:
                return False  # already dead
            self._process.join(timeout_s)
            if self._process.is_alive():
                self._process.kill()
                return False
            return self._process.exitcode == 0

    @property
    def pid(self) -> int | None:
        """The writer process's id, once started."""
        return None if self._process is None else self._process.pid

    def _start(self) -> None:
        if self._process is not None:
            self._conn.close()
        self._conn, child_end = _SPAWN.Pipe(duplex=False)[::-1]
        self._ready.clear()
        self._process = _SPAWN.Process(
            target=serve, args=(child_end, self.settings, self.worker_id, self._in_flight, self._ready),
            name="result-writer", daemon=True,
        )
        self._process.start()
        # Lowered from here, at once: its imports then take what the worker's model load leaves.
        _yield_to_the_job_path(self._process.pid)
        child_end.close()


@dataclass
class WriterContext:
    """What the writer process has of a worker runtime: what storing results needs."""

    settings: Settings
    db: Database
    redis: redis.Redis
    worker_id: str
    celery: None = None  # results hand nothing back to the queue


def serve(conn: Connection, settings: Settings, worker_id: str, in_flight: Any, ready: Any) -> None:
    """The writer process: say it is `ready`, then write what comes down the pipe until the
    worker closes it or dies."""
    # Ctrl-C and SIGTERM reach the whole process group: the worker says when to stop, and a
    # worker that died is seen as the end of the pipe. Either way what came is written first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging(settings.log_level, settings.log_format, process="result-writer")
    bind_process_fields(worker_id=worker_id)
    context = WriterContext(settings, connect_database(settings), connect_redis(settings), worker_id)
    try:
        context.db.sync_clock()  # its finish times and rate-limit minutes are on the database's clock
    except SQLAlchemyError as exc:
        log.warning("clock_not_synced", error=str(exc))  # the host's clock, then
    writer = ResultWriter(context)
    gc.freeze()  # its imports (~110,000 objects) stay: out of the collector's full passes (~60 ms each)
    ready.set()
    stored: list[FinishedJob] = []  # committed, not yet announced
    open_ = True
    try:
        while open_ or stored:
            group, open_ = _gather(conn, not stored, lambda: in_flight.value > 0) if open_ else ([], False)
            try:
                stored = writer.write(group, stored)
            except Exception:  # noqa: BLE001 - keep writing; the leases recover these jobs
                log.exception("result_write_crashed", jobs=[job.held.job_id for job in group])
                stored = []
    finally:
        context.db.dispose()


def _yield_to_the_job_path(pid: int) -> None:
    """Let the worker, PostgreSQL and Redis have a busy CPU first: the writer's writes can wait.

    A job's path is a chain of round trips (the message, the claim, the ack); woken by each
    finished job, the writer took the core from a link of that chain. As a batch process
    (SCHED_BATCH: no preempting others on wake-up) at a lower priority, it runs when they wait.
    """
    try:
        os.sched_setscheduler(pid, os.SCHED_BATCH, os.sched_param(0))
        worker_nice = os.getpriority(os.PRIO_PROCESS, 0)
        os.setpriority(os.PRIO_PROCESS, pid, min(worker_nice + WRITER_NICENESS, 19))
    except (AttributeError, OSError) as exc:  # not Linux, or not allowed: run as the worker does
        log.info("result_writer_priority_unchanged", error=str(exc))


def _gather(conn: Connection, wait: bool, more_coming: Callable[[], bool]) -> tuple[list[FinishedJob], bool]:
    """Take the finished jobs in the pipe (waiting for one if `wait`), and while tasks are running
    up to LINGER_S more for up to LINGER_UNTIL. Returns them, and whether the pipe is still open."""
    group: list[FinishedJob] = []
    linger_until = None
    while len(group) < MAX_GROUP:
        if wait and not group:
            timeout = None
        elif len(group) < LINGER_UNTIL and more_coming():
            linger_until = linger_until or time.monotonic() + LINGER_S
            timeout = max(0.0, linger_until - time.monotonic())
        else:
            timeout = 0.0
        if not conn.poll(timeout):
            return group, True
        job = _receive(conn)
        if job is None:
            return group, False
        group.append(job)
    return group, True


def _receive(conn: Connection) -> FinishedJob | None:
    """Return the next finished job; None once the worker closed the pipe or died."""
    try:
        return conn.recv()
    except EOFError:
        return None
