"""The worker process: set up the runtime, preload models, then consume the model queues."""

from __future__ import annotations

import gc
import signal
import time
from collections.abc import Callable

import structlog
import torch
from celery import signals

from shared.celery_app import model_of_queue, queue_for
from shared.jobs import JobKind
from shared.logging import bind_process_fields, configure_logging, quiet_celery_task_lines
from shared.reaper import Reaper
from shared.settings import Settings
from workers.celery_pool import HAND_BACK_THREADS
from workers.metrics import serve_metrics
from workers.registration import Registration
from workers.runtime import WorkerRuntime, set_runtime
from workers.tasks import register_tasks

log = structlog.get_logger(__name__)


def resolve_device(device: str) -> torch.device:
    """Return the torch device to run on; CUDA must really be there if asked for."""
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--gpu was given but CUDA is not available to this process")
    return torch.device("cuda:0" if device == "cuda" else "cpu")


# How long a starting worker waits for its result writer process before it says it is ready.
WRITER_READY_TIMEOUT_S = 60.0
# How long an exiting worker waits for jobs still running to stop and be handed back (each
# stops at its next step; a training step on a CPU can take seconds).
HAND_BACK_WAIT_S = 10.0

ROLE_KINDS = {
    "generate": (JobKind.GENERATION,),
    "finetune": (JobKind.FINE_TUNE,),
    "all": (JobKind.GENERATION, JobKind.FINE_TUNE),
}


def run_worker(
    settings: Settings,
    device: str,
    model_ids: list[str],
    *,
    role: str = "all",
    reaper: bool = True,
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
    concurrency: int | None = None,
) -> None:
    """Run a worker until it is stopped; `gemma-jobs worker` calls this."""
    configure_logging(settings.log_level, settings.log_format, process="worker")
    quiet_celery_task_lines(settings.log_level)
    concurrency = concurrency or settings.worker_concurrency
    rt = WorkerRuntime.create(settings, resolve_device(device), concurrency)
    rt.db.check_schema()
    unknown = [model_id for model_id in model_ids if rt.models.registry.get(model_id) is None]
    if unknown:
        raise SystemExit(f"--models names unregistered models: {', '.join(unknown)}")
    bind_process_fields(worker_id=rt.worker_id)
    set_runtime(rt)
    _hand_back_on_shutdown(rt)
    _exit_on_sigterm_until_celery_runs()
    rt.results.start()  # its imports (~1 s of CPU, at a low priority) overlap the model load
    registration: Registration | None = None
    # Whatever ends the worker, start-up failures included, closes its writer: a writer left
    # running (it ignores SIGTERM) kept the exiting worker waiting on it for ever, its heartbeat
    # thread saying it was alive and starting.
    try:
        if metrics_port:
            serve_metrics(metrics_port, rt.device, metrics_host)
        queues = [queue_for(kind, model_id) for kind in ROLE_KINDS[role] for model_id in model_ids]
        registration = Registration(rt, role, queues)
        registration.register()  # before loading: CPU workers that start together split the cores
        registration.start_heartbeat()  # a slow load is a worker starting, not a dead one
        queues = _load_models(rt, role, model_ids, queues)
        if reaper:
            # Every worker reaps; passes are conditional updates, so they never conflict.
            Reaper(settings, rt.db, rt.celery, rt.redis).start_thread()
        register_tasks(rt.celery)
        if not rt.results.wait_ready(WRITER_READY_TIMEOUT_S):
            # Go on: a hand-over starts a new writer if this one died, and results wait in the pipe.
            log.warning("result_writer_not_ready", timeout_s=WRITER_READY_TIMEOUT_S)
        _ready_once_consuming(rt, registration, queues)
        # What start-up loaded (torch, transformers and the rest: ~430,000 objects) lives as long
        # as the worker: keep it out of the garbage collector's full passes, each of which walked it
        # all (~210 ms on a 2-core machine, bench/gc_pause.py), stalling the batch engine's steps.
        gc.freeze()
        _consume(rt, queues)
    finally:
        _wait_for_running_jobs(rt, HAND_BACK_WAIT_S)
        # Results handed over by tasks that returned are written before the worker says it stopped.
        if not rt.results.close(rt.settings.shutdown_grace_s + 10):
            log.warning("results_not_written", note="their jobs are retried when their leases run out")
        if registration is not None:
            registration.stop()


def _wait_for_running_jobs(rt: WorkerRuntime, timeout_s: float) -> None:
    """Stop and hand back the jobs tasks still run once Celery has returned, and wait for them
    (up to `timeout_s`): closing the result writer under them threw their results away, while
    the worker exited mid-step and recorded itself stopped; each then waited out its lease and
    used an attempt instead of going back."""
    if rt.jobs_in_flight:
        rt.start_shutdown(0)  # Celery is done with them: no one else would stop them
    deadline = time.monotonic() + timeout_s
    while rt.jobs_in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
    if rt.jobs_in_flight:
        log.warning("jobs_still_running_at_exit", jobs=rt.jobs_in_flight,
                    note="their leases lapse and the reaper requeues them")


def _load_models(rt: WorkerRuntime, role: str, model_ids: list[str], queues: list[str]) -> list[str]:
    """Load what the role needs of each model; return the queues of the models that loaded."""
    if rt.cpu_threads is not None:
        rt.cpu_threads.apply()  # model loading runs in this thread
    unusable: set[str] = set()
    if JobKind.GENERATION in ROLE_KINDS[role]:
        rt.models.preload(model_ids)  # a fine-tune loads its own training copy per job
        unusable.update(set(model_ids) - set(rt.models.loaded_ids()))
    if JobKind.FINE_TUNE in ROLE_KINDS[role]:
        unusable.update(_preload_tokenizers(rt, model_ids))
    # A model this worker cannot load is left to workers that can: taking its jobs only to fail
    # them would drain its queue beside a healthy worker. Its jobs wait, and say so.
    usable = [queue for queue in queues if model_of_queue(queue) not in unusable]
    if not usable:
        raise SystemExit(f"no model of --models could be loaded ({', '.join(sorted(unusable))}; "
                         "see model_unavailable above): this worker would take no job")
    if unusable:
        log.warning("models_left_to_other_workers", unusable=sorted(unusable))
    return usable


def _ready_once_consuming(rt: WorkerRuntime, registration: Registration, queues: list[str]) -> None:
    """Say the worker is ready (its registry row, the `worker_ready` line) once Celery consumes
    its queues: before, a worker that could not reach Redis was counted a live consumer."""

    @signals.worker_ready.connect(weak=False)
    def on_ready(**_kwargs) -> None:
        registration.serve(queues)
        log.info("worker_ready", queues=queues, models=rt.models.loaded_ids(), concurrency=rt.concurrency)


def _consume(rt: WorkerRuntime, queues: list[str]) -> None:
    """Run Celery's worker on the queues until it is stopped."""
    # Tasks run in this process, where the model already lives (no fork after torch or CUDA
    # started): the solo pool for one job at a time, else K threads feeding the batch engine.
    concurrency = rt.concurrency
    if concurrency == 1:
        pool = ["--pool=solo"]
    else:  # named by the setting: the --pool option takes only Celery's own pools
        rt.celery.conf.worker_pool = HAND_BACK_THREADS
        pool = [f"--concurrency={concurrency}"]
    rt.celery.worker_main(
        argv=[
            "--quiet",  # no banner on stdout; our logs say the same as JSON
            "worker",
            *pool,
            "--queues=" + ",".join(queues),
            f"--hostname={rt.worker_id.replace(':', '-')}@%h",
            "--without-gossip",
            "--without-mingle",
            f"--loglevel={rt.settings.log_level.upper()}",
        ]
    )


def _preload_tokenizers(rt: WorkerRuntime, model_ids: list[str]) -> set[str]:
    """Load the tokenizers training needs now, not while a job's lease is running; return the
    models whose tokenizer could not be loaded."""
    from workers.model_loader import ModelUnavailable
    from workers.training_tokenizers import preload_tokenizer

    failed = set()
    for model_id in model_ids:
        try:
            # A worker that also generates has this tokenizer loaded already: share it.
            loaded = rt.models.get(model_id).tokenizer if model_id in rt.models.loaded_ids() else None
            preload_tokenizer(rt.models.registry.get(model_id), rt.settings.model_cache_path, loaded)
        except (ModelUnavailable, OSError, ValueError) as exc:
            log.error("tokenizer_unavailable", model=model_id, error=str(exc))
            failed.add(model_id)
    return failed


def _exit_on_sigterm_until_celery_runs() -> None:
    """Make SIGTERM during start-up end the worker through its cleanup (writer closed, registry
    row `stopped`): before Celery installs its own handler, the default one killed the process
    at once, and its row stayed `starting`, counted among the host's CPU workers until it went quiet."""

    def on_sigterm(signum: int, _frame) -> None:
        # Once: a second SIGTERM raised into the cleanup itself, and the row stayed `starting`.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)


def _hand_back_on_shutdown(rt: WorkerRuntime) -> Callable[..., None]:
    """On SIGTERM (Celery's warm shutdown) give the running jobs shutdown_grace_s, then hand them
    back, at once on a cold shutdown; return the signal's handler."""

    @signals.worker_shutting_down.connect(weak=False)
    def on_shutting_down(how: str = "Warm", **_kwargs) -> None:
        # Runs inside a signal handler: set a value, log nothing (logging takes locks). Celery
        # sends this again at each further signal: the grace runs from the first, or an
        # impatient supervisor repeating SIGTERM would put the hand-back off for ever. A cold
        # shutdown (a second Ctrl-C, SIGQUIT) leaves no grace: every running job goes back now.
        rt.start_shutdown(0 if how == "Cold" else rt.settings.shutdown_grace_s)

    return on_shutting_down
