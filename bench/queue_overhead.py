"""Queue overhead: jobs/s through the job path with a no-op model vs raw Celery no-op tasks/s.

    .venv/bin/python bench/queue_overhead.py --jobs 2000 --raw-tasks 2000 --rounds 3 [--profile]

Baseline: `--raw-tasks` messages of a task that does nothing, on a Celery app with our broker
settings (`shared.celery_app.make_celery`: Redis, JSON, acks_late, prefetch 1) and our logging
set-up, consumed by a fresh solo-pool worker process started with our worker's Celery flags.
It logs Celery's lines for each task (received, succeeded) as Celery does by default; our
worker leaves them to debug logging (`quiet_celery_task_lines`), and `--raw-quiet` makes the
baseline do so too.
Its rate is tasks / (end of the last task - start of the first), timed inside the worker with
Celery's task_prerun/task_postrun signals, so process start-up is excluded.
Result: `--jobs` generation jobs created as the gateway creates them (`create_generation`
committed, then `publish_job`) in a fresh PostgreSQL database, consumed by a fresh process
running `workers.main.run_worker` (role generate, solo pool, reaper and heartbeat threads on)
whose model is a stand-in that returns a one-token output at once, with no model loaded. So
each job is claimed, its lease watched, its token stream written, its result, usage, events
and token settlement stored, and its end announced on Redis — all but generation. Its rate is
jobs / (last result committed - first job claimed), from the jobs table (max finished_at -
min started_at): results are written behind the tasks, by the worker's result writer process
(`workers.result_process`), so a task's end is not its job's end (the task-signal rate is
printed beside it). CPU per job is printed for each process that does the work, from the first
task on: the worker (all its threads), its result writer process, the PostgreSQL server (all
backends) and the Redis server; the machine has two cores for all of them. Both queues are full
before their worker starts; use the same count on both sides (a worker's first tasks are
slower). Redis: --redis-url, a db of its own, flushed. `--profile` adds a stack run with
per-stage timers and prints where a job's time goes in the task.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import psutil
import redis
from bench_processes import Child, child_env, cpu_seconds, cpu_since, fresh_postgres, postgres_and_redis, wait_until
from celery import signals
from sqlalchemy import func, select

from services.domain.jobs import create_generation
from services.domain.keys import Caller, create_key
from shared.celery_app import make_celery
from shared.db import Database
from shared.logging import configure_logging, quiet_celery_task_lines
from shared.models import Job, UsageRecord
from shared.publish import publish_job
from shared.registry import DEFAULT_MODEL_ID, ModelRegistry
from shared.schemas import GenerationRequest
from shared.settings import get_settings, load_settings

RAW_TASK = "bench.noop"
RAW_QUEUE = "bench.noop"
PROMPT = "The capital of France is"
FLOOR = 0.5


# --- inside the worker processes -------------------------------------------------------------


def cpu_by_process(worker_pid: int) -> dict[str, dict[int, float]]:
    """Read the CPU used so far by the worker's own processes (its result writer, the spawn
    tracker), by PostgreSQL's and by Redis's."""
    return {"helpers": cpu_seconds(psutil.Process(worker_pid).children()),
            **{name: cpu_seconds(found) for name, found in postgres_and_redis().items()}}


def install_clock(expect: int, result_path: Path, stages: dict[str, float] | None = None) -> None:
    """Time every task with Celery's signals; after `expect` tasks, write the timings to a file."""
    starts: list[float] = []
    ends: list[float] = []
    cpu: list[float] = []  # this process's CPU time (all threads) at the first start and last end
    at_first_task: dict[str, dict[int, float]] = {}  # other processes' CPU then: the driver subtracts it

    @signals.task_prerun.connect(weak=False)
    def on_start(**_kwargs) -> None:
        starts.append(time.perf_counter())
        if not cpu:
            cpu.append(time.process_time())
            at_first_task.update(cpu_by_process(os.getpid()))

    @signals.task_postrun.connect(weak=False)
    def on_end(**_kwargs) -> None:
        ends.append(time.perf_counter())
        if len(ends) != expect:
            return
        in_tasks = sum(end - start for start, end in zip(starts, ends))
        result = {"tasks": expect, "seconds": ends[-1] - starts[0], "in_tasks": in_tasks, "stages": stages,
                  "cpu_seconds": time.process_time() - cpu[0], "at_first_task": at_first_task}
        staging = result_path.with_suffix(".tmp")
        staging.write_text(json.dumps(result))
        staging.rename(result_path)  # the driver never reads half a file


def serve_raw_worker(args) -> None:
    """Consume no-op tasks with a bare Celery app: our broker settings, solo pool, no job path."""
    configure_logging(args.log_level, "json", process="raw")
    if args.raw_quiet:  # as the stack's worker does
        quiet_celery_task_lines(args.log_level)
    app = make_celery(args.redis_url)

    @app.task(name=RAW_TASK)
    def noop(*_args) -> None:
        """Do nothing."""

    install_clock(args.expect, args.result)
    app.worker_main(argv=["--quiet", "worker", "--pool=solo", f"--queues={RAW_QUEUE}", "--without-gossip",
                          "--without-mingle", f"--loglevel={args.log_level.upper()}"])


class _NoopTokenizer:
    """What TokenPublisher needs of a tokenizer: nothing is generated step by step here."""

    def decode(self, _token_ids, **_kwargs) -> str:
        return ""


class NoopEngine:
    """Stands in for a model's BatchEngine: every job generates one token, at once."""

    loaded = SimpleNamespace(tokenizer=_NoopTokenizer())
    step_writes = None  # no steps: the one token is written with the final text

    def generate(self, params, **_kwargs):
        from workers.generation import GenerationOutput

        return GenerationOutput(text=" Paris", finish_reason="length", token_ids=[9079], prompt_tokens=6,
                                seconds=0.0, gpu_seconds=0.0)


def serve_noop_worker(args) -> None:
    """Run the real worker (`run_worker`) with the stand-in engine and no model preloaded."""
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    from workers.main import run_worker
    from workers.model_cache import ModelCache
    from workers.runtime import WorkerRuntime

    engine = NoopEngine()
    ModelCache.preload = lambda self, model_ids: None  # the stand-in needs no weights
    ModelCache.loaded_ids = lambda self: [DEFAULT_MODEL_ID]  # ... and serves the model's queue
    WorkerRuntime.engine = lambda self, model_id: engine
    stages = install_stage_timers() if args.profile else None
    install_clock(args.expect, args.result, stages)
    run_worker(get_settings(), "cpu", [DEFAULT_MODEL_ID], role="generate", concurrency=args.concurrency)


TASK_STAGES = {
    "claim": "claim: UPDATE running + status event, commit",
    "guard_start": "lease: watch (the worker's one lease keeper)",
    "stream_start": "token stream: set up (the start goes with the first text)",
    "guard_stop": "lease: forget",
    "hand_over": "hand the result to the result writer process",
}


def install_stage_timers() -> dict[str, float]:
    """Wrap the steps of a generation job with timers; return their running totals in seconds
    (wall time under the stage's name, the calling thread's CPU time under "cpu:" + name)."""
    import workers.generation_job as job
    import workers.result_process as writer

    totals: dict[str, float] = defaultdict(float)

    def timed(name, function):
        def wrapper(*args, **kwargs):
            started, cpu_started = time.perf_counter(), time.thread_time()
            try:
                return function(*args, **kwargs)
            finally:
                totals[name] += time.perf_counter() - started
                totals["cpu:" + name] += time.thread_time() - cpu_started

        return wrapper

    job.claim_job = timed("claim", job.claim_job)
    job.JobGuard.__enter__ = timed("guard_start", job.JobGuard.__enter__)
    job.JobGuard.__exit__ = timed("guard_stop", job.JobGuard.__exit__)
    job.TokenPublisher.__init__ = timed("stream_start", job.TokenPublisher.__init__)
    writer.ResultProcess.put = timed("hand_over", writer.ResultProcess.put)
    return totals


# --- the driver ------------------------------------------------------------------------------


def consume(args, mode: str, workdir: Path, expect: int, env: dict[str, str], profile: bool = False,
            done: Callable[[], bool] = lambda: True) -> dict:
    """Start a worker process on a full queue; return its timings once it ran `expect` tasks
    and `done` holds."""
    result = workdir / f"{mode}-{time.monotonic_ns()}.json"
    command = [sys.executable, __file__, f"--serve-{mode}-worker", "--expect", str(expect), "--result", str(result),
               "--redis-url", args.redis_url, "--log-level", args.log_level, "--concurrency", str(args.concurrency)]
    command += ["--profile"] if profile else []
    command += ["--raw-quiet"] if mode == "raw" and args.raw_quiet else []
    child = Child(command, env, result.with_suffix(".log"))
    try:
        wait_until(lambda: result.exists() and done(), 600, child=child)
        timings = json.loads(result.read_text())
        # JSON kept the pids as strings.
        before = {name: {int(pid): used for pid, used in readings.items()}
                  for name, readings in timings.pop("at_first_task").items()}
        now = cpu_by_process(child.pid)
    finally:
        child.stop()
    return {**timings, **{f"{name}_cpu_seconds": cpu_since(before[name], used) for name, used in now.items()}}


def run_raw(args, workdir: Path) -> dict:
    """Fill the queue with no-op tasks, then time a bare Celery worker emptying it."""
    redis.Redis.from_url(args.redis_url).flushdb()
    app = make_celery(args.redis_url)
    for index in range(args.raw_tasks):
        app.send_task(RAW_TASK, args=[index], queue=RAW_QUEUE)
    return consume(args, "raw", workdir, args.raw_tasks, child_env(GEMMA_JOBS_LOG_LEVEL=args.log_level))


def submit_jobs(database_url: str, redis_url: str, count: int) -> None:
    """Create and publish jobs exactly as POST /v1/generations does (commit, then publish)."""
    settings = load_settings(database_url=database_url, redis_url=redis_url)
    db = Database(database_url)
    celery = make_celery(redis_url, settings.visibility_timeout_s)
    registry = ModelRegistry.load(None)
    with db.session_scope() as session:
        key, _ = create_key(session, role="user", name="bench")
    caller = Caller(key_id=key.id, role=key.role)
    request = GenerationRequest(model=DEFAULT_MODEL_ID, prompt=PROMPT, max_new_tokens=1, temperature=0)
    for _ in range(count):
        with db.session_scope() as session:
            job = create_generation(session, caller, request, db=db, registry=registry, settings=settings).job
        publish_job(celery, job.id, job.queue)
    db.dispose()


def jobs_ended(db: Database) -> int:
    """Return how many jobs have ended (their results are written behind the tasks that ran them)."""
    with db.session_scope(read_only=True) as session:
        return session.scalar(select(func.count()).select_from(Job).where(Job.finished_at.is_not(None)))


def check_jobs(db: Database, count: int) -> float:
    """Check that every job succeeded and was charged once; return the jobs table's span in seconds."""
    with db.session_scope(read_only=True) as session:
        succeeded = session.scalar(select(func.count()).select_from(Job).where(Job.status == "succeeded"))
        charged = session.scalar(select(func.count()).select_from(UsageRecord))
        first, last = session.execute(select(func.min(Job.started_at), func.max(Job.finished_at))).one()
    if succeeded != count or charged != count:
        raise SystemExit(f"{succeeded} of {count} jobs succeeded, {charged} usage rows")
    return (last - first).total_seconds()


def run_stack(args, workdir: Path, profile: bool = False) -> dict:
    """Submit jobs to a fresh database and Redis db, then time the no-op worker emptying the queue."""
    redis.Redis.from_url(args.redis_url).flushdb()
    with fresh_postgres() as database_url:
        submit_jobs(database_url, args.redis_url, args.jobs)
        env = child_env(DATABASE_URL=database_url, REDIS_URL=args.redis_url, GEMMA_JOBS_LOG_LEVEL=args.log_level)
        db = Database(database_url)
        try:
            timings = consume(args, "noop", workdir, args.jobs, env, profile, done=lambda: jobs_ended(db) == args.jobs)
            # A job is done when its result is committed, which is after its task returned.
            timings["task_seconds"], timings["seconds"] = timings["seconds"], check_jobs(db, args.jobs)
        finally:
            db.dispose()
    return timings


def print_profile(timings: dict) -> None:
    """Print where one job's time went, per stage, from a profiled run."""
    jobs, stages = timings["tasks"], timings["stages"]

    def ms(name: str) -> float:
        return 1000 * stages.get(name, 0.0) / jobs

    def row(name: str, label: str) -> str:
        return f"  {ms(name):11.2f}  {ms('cpu:' + name):8.2f}  {label}"

    task_ms, in_task_ms = 1000 * timings["task_seconds"] / jobs, 1000 * timings["in_tasks"] / jobs
    print(f"\nprofile (stage timers on): {1000 * timings['seconds'] / jobs:.2f} ms/job ({jobs / timings['seconds']:.0f} "
          f"jobs/s), worker CPU {1000 * timings['cpu_seconds'] / jobs:.2f} ms/job (all threads)")
    print(f"task thread, {task_ms:.2f} ms/job from task to task:\n  wall ms/job  CPU ms/job  stage")
    for name, label in TASK_STAGES.items():
        print(row(name, label))
    rest_ms = in_task_ms - sum(ms(name) for name in TASK_STAGES)
    print(f"  {rest_ms:11.2f}  {'':8}  rest of the task: stand-in generate, job log, metrics, task wrapper")
    print(f"  {task_ms - in_task_ms:11.2f}  {'':8}  between tasks: Celery ack, fetch and decode the next message, "
          f"Celery's log lines")
    print(f"result writer process: {1000 * timings['helpers_cpu_seconds'] / jobs:.2f} ms CPU/job")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--raw-tasks", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=1, help="alternate baseline and stack runs; medians")
    parser.add_argument("--concurrency", type=int, default=1, help="the stack worker's --concurrency")
    parser.add_argument("--log-level", default="info", help="both workers (the product default is info)")
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12"))
    parser.add_argument("--profile", action="store_true", help="add a stack run with per-stage timers")
    parser.add_argument("--raw-quiet", action="store_true",
                        help="the raw worker leaves Celery's per-task lines to debug logging too, as the stack's does")
    parser.add_argument("--serve-raw-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-noop-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--expect", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_raw_worker:
        return serve_raw_worker(args)
    if args.serve_noop_worker:
        return serve_noop_worker(args)
    raw_runs, stack_runs = [], []
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.rounds):
            raw_runs.append(run_raw(args, Path(folder)))
            stack_runs.append(run_stack(args, Path(folder)))
        profiled = run_stack(args, Path(folder), profile=True) if args.profile else None
        redis.Redis.from_url(args.redis_url).flushdb()
    raw_rates = [run["tasks"] / run["seconds"] for run in raw_runs]
    stack_rates = [run["tasks"] / run["seconds"] for run in stack_runs]
    raw_rate, stack_rate = statistics.median(raw_rates), statistics.median(stack_rates)
    ratio = stack_rate / raw_rate
    task_rate = statistics.median(run["tasks"] / run["task_seconds"] for run in stack_runs)

    def cpu_ms(runs: list[dict], process: str) -> str:
        key = f"{process}_cpu_seconds" if process != "worker" else "cpu_seconds"
        return f"{statistics.median(1000 * run[key] / run['tasks'] for run in runs):.2f}"
    print(f"settings: stack jobs={args.jobs} raw tasks={args.raw_tasks} rounds={args.rounds} (medians) "
          f"cores={os.cpu_count()} redis={args.redis_url} database=postgresql log_level={args.log_level} "
          f"stack worker concurrency={args.concurrency} (pool {'solo' if args.concurrency == 1 else 'threads'}), "
          f"raw worker pool solo, Celery's per-task log lines {'off' if args.raw_quiet else 'on'} (stack: off); "
          f"acks_late, prefetch 1; one-token no-op generation")
    print("measured: raw: tasks / (last task end - first task start), inside the worker (Celery task signals); "
          "stack: jobs / (last result committed - first job claimed), from the jobs table (finished_at - "
          "started_at); queue full before the worker starts")
    print(f"baseline  raw Celery no-op tasks           : {raw_rate:7.0f} tasks/s  "
          f"(rounds: {', '.join(f'{rate:.0f}' for rate in raw_rates)})")
    print(f"result    jobs through claim/store/announce: {stack_rate:7.0f} jobs/s   "
          f"(rounds: {', '.join(f'{rate:.0f}' for rate in stack_rates)}; "
          f"first task start to last task end: {task_rate:.0f} jobs/s)")
    print(f"ratio     stack / raw Celery               : {ratio:7.2f}  (floor {FLOOR}: "
          f"{'met' if ratio >= FLOOR else 'MISSED'}; {1000 / stack_rate - 1000 / raw_rate:.2f} ms of job path "
          f"per job over raw Celery's {1000 / raw_rate:.2f} ms)")
    print(f"CPU ms per task/job, from the first task on (medians): raw: worker {cpu_ms(raw_runs, 'worker')}, "
          f"Redis {cpu_ms(raw_runs, 'redis')}; stack: worker {cpu_ms(stack_runs, 'worker')}, result writer process "
          f"{cpu_ms(stack_runs, 'helpers')}, PostgreSQL {cpu_ms(stack_runs, 'postgres')}, Redis {cpu_ms(stack_runs, 'redis')}")
    if profiled is not None:
        print_profile(profiled)


if __name__ == "__main__":
    main()
