"""The `gemma-jobs` command line: run the pieces, the whole stack, and administer keys."""

from __future__ import annotations

import argparse
import os
import sys

from shared.registry import ModelRegistry, RegistryError
from shared.settings import SettingsError, get_settings


# The exit status of a command that could not reach or use the database (2: bad arguments or settings).
DATABASE_UNAVAILABLE_EXIT = 3


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run one subcommand."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from sqlalchemy.exc import ArgumentError

    from shared.db import DATABASE_UNAVAILABLE, SchemaOutOfDate, error_summary

    try:
        return args.run(args) or 0
    except (SettingsError, RegistryError, SchemaOutOfDate) as exc:
        print(f"gemma-jobs: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`gemma-jobs status | head`): no traceback, and nothing more to
        # write (Python would report the next failed flush at exit).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (*DATABASE_UNAVAILABLE, ArgumentError) as exc:
        # One line, not a traceback: the driver's own first line names the host, port and database.
        print(f"gemma-jobs: cannot use the database (DATABASE_URL): {error_summary(exc)}", file=sys.stderr)
        return DATABASE_UNAVAILABLE_EXIT


def build_parser() -> argparse.ArgumentParser:
    """Describe every subcommand and its options."""
    parser = argparse.ArgumentParser(prog="gemma-jobs", description=__doc__)
    commands = parser.add_subparsers(required=True, metavar="command")

    migrate = commands.add_parser("migrate", help="upgrade the database schema to head")
    migrate.set_defaults(run=cmd_migrate)

    gateway = commands.add_parser("gateway", help="run the HTTP gateway (gunicorn)")
    gateway.add_argument("--host", default="127.0.0.1")
    gateway.add_argument("--port", type=ANY_PORT, default=8000)
    gateway.add_argument("--workers", type=int, default=2, help="gunicorn worker processes")
    gateway.add_argument("--threads", type=_whole_number(1, 1024), default=16,
                         help="threads per process; streams and waits hold at most all but 4 (GEMMA_JOBS_MAX_HELD_REQUESTS)")
    gateway.set_defaults(run=cmd_gateway)

    worker = commands.add_parser("worker", help="run a worker on one GPU or the CPU")
    device = worker.add_mutually_exclusive_group()
    device.add_argument("--gpu", type=int, help="GPU index; sets CUDA_VISIBLE_DEVICES")
    device.add_argument("--device", choices=["cpu"], help="run on the CPU (the default)")
    worker.add_argument("--models", default=None, help="comma-separated model ids to serve")
    worker.add_argument(
        "--role",
        choices=["generate", "finetune", "all"],
        default="all",
        help="which job kinds to take: generation, fine-tuning, or both (a fine-tune holds the worker for its run)",
    )
    worker.add_argument("--metrics-port", type=PORT, help="serve Prometheus /metrics on this port")
    worker.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        help="the address /metrics listens on (default 127.0.0.1; 0.0.0.0 for a scraper on another host)",
    )
    worker.add_argument(
        "--concurrency",
        type=_whole_number(1, 64),
        help="generation jobs batched together (default GEMMA_JOBS_WORKER_CONCURRENCY, 1)",
    )
    worker.add_argument(
        "--cpu-threads",
        type=_cpu_threads,
        help="torch threads on a CPU worker (default GEMMA_JOBS_CPU_THREADS, auto: the cores split "
        "among this host's CPU workers)",
    )
    worker.set_defaults(run=cmd_worker)

    reaper = commands.add_parser(
        "reaper", help="run only the reaper (workers run one too): lost workers, TTLs, lost messages"
    )
    reaper.set_defaults(run=cmd_reaper)

    status = commands.add_parser("status", help="workers, queues and recent failures, as tables")
    status.set_defaults(run=cmd_status)

    up = commands.add_parser("up", help="run the whole stack on this machine")
    up.add_argument("--port", type=PORT, default=8000)
    up.set_defaults(run=cmd_up)

    demo = commands.add_parser("demo", help="start the stack, run one generation over HTTP, stop")
    demo.add_argument("--port", type=PORT, default=8000)
    demo.add_argument("--prompt", default="Q: What is the capital of France?\nA:")
    demo.set_defaults(run=cmd_demo)

    keys = commands.add_parser("keys", help="create, list and revoke API keys")
    key_commands = keys.add_subparsers(required=True, metavar="action")
    create = key_commands.add_parser("create", help="create a key; prints it alone on stdout")
    create.add_argument("--role", choices=["admin", "user"], default="user")
    create.add_argument("--name", default="")
    create.add_argument("--rpm", type=int)
    create.add_argument("--tpm", type=int)
    create.add_argument("--max-concurrent", type=int)
    create.add_argument("--expires-at", help="ISO 8601 time with a timezone, e.g. 2027-01-01T00:00:00Z")
    create.set_defaults(run=cmd_keys_create)
    listing = key_commands.add_parser("list", help="list keys (never their secrets)")
    listing.set_defaults(run=cmd_keys_list)
    usage = commands.add_parser("usage", help="print usage totals grouped by key, model or day")
    usage.add_argument("--group-by", choices=["key", "model", "day"], default="key")
    usage.add_argument("--from", dest="start", help="ISO 8601 time, inclusive")
    usage.add_argument("--to", dest="end", help="ISO 8601 time, exclusive")
    usage.add_argument("--key-id")
    usage.set_defaults(run=cmd_usage)
    revoke = key_commands.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("key_id")
    revoke.set_defaults(run=cmd_keys_revoke)
    return parser


def _database():
    from shared.db import Database

    return Database(get_settings().database_url_or_default)


def _checked_database():
    """Return the database; one whose schema does not fit the code ends the command (`main`)."""
    db = _database()
    db.check_schema()
    return db


def cmd_migrate(_args) -> int:
    """Upgrade the configured database to the migrations' head."""
    from shared.migrate import upgrade_known

    head = upgrade_known(get_settings().database_url_or_default)
    print(f"database at revision {head}", file=sys.stderr)
    return 0


def cmd_gateway(args) -> int:
    """Run the gateway under gunicorn with threads (waiting requests hold a thread)."""
    from services.server import serve_gateway
    from shared.logging import configure_logging

    os.environ["GEMMA_JOBS_GATEWAY_THREADS"] = str(args.threads)  # its processes' cap on held requests
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format, process="gateway")
    _checked_database().dispose()
    # Here, not only in gunicorn's workers: one failing to boot is gunicorn's exit status 3,
    # which reads as "database unreachable".
    ModelRegistry.load(settings.model_registry)
    serve_gateway(args.host, args.port, workers=args.workers, threads=args.threads,
                  timeout_s=int(settings.max_wait_s) + 30)
    return 0


def _whole_number(low: int, high: int):
    """Return an argparse type: a whole number from low to high."""

    def parse(value: str) -> int:
        if not value.isdigit() or not low <= int(value) <= high:
            raise argparse.ArgumentTypeError(f"must be a whole number from {low} to {high}, not {value!r}")
        return int(value)

    return parse


# An out-of-range port was an OverflowError traceback. The gateway may take 0 (any free port);
# `up` and `demo` must know theirs, and so must whoever scrapes a worker's metrics.
PORT = _whole_number(1, 65535)
ANY_PORT = _whole_number(0, 65535)

def _cpu_threads(value: str) -> str:
    """Parse --cpu-threads: auto, or a whole number of threads from 1."""
    if value != "auto" and not (value.isdigit() and int(value) >= 1):
        raise argparse.ArgumentTypeError(f"must be auto or a whole number from 1, not {value!r}")
    return value


def cmd_worker(args) -> int:
    """Pin the device, then start the worker (torch is imported only after this point)."""
    from shared.registry import DEFAULT_MODEL_ID

    if args.gpu is not None:
        # Must happen before torch is imported anywhere in this process.
        os.environ["CUDA_VISIBLE_DEVICES"] = str(args.gpu)
        device = "cuda"
    else:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
        device = "cpu"
    # Each model once: one named twice counted its worker twice among a queue's live consumers.
    models = list(dict.fromkeys(m.strip() for m in (args.models or DEFAULT_MODEL_ID).split(",") if m.strip()))
    if not models:
        raise SettingsError(f"--models names no model ({args.models!r}): give comma-separated model ids")
    if args.cpu_threads is not None:
        os.environ["GEMMA_JOBS_CPU_THREADS"] = args.cpu_threads  # read by get_settings() below
    settings = get_settings()  # a bad setting is refused before seconds of torch imports
    if settings.log_format == "json":
        # Progress bars (the model's conversion, its weights' loading) are not log lines; tqdm
        # reads this when it is imported, below.
        os.environ.setdefault("TQDM_DISABLE", "1")
    from workers.main import run_worker

    run_worker(
        settings, device, models, role=args.role, metrics_port=args.metrics_port,
        metrics_host=args.metrics_host, concurrency=args.concurrency,
    )
    return 0


def cmd_reaper(_args) -> int:
    """Run reaper passes until interrupted."""
    import threading

    import redis

    from shared.celery_app import make_celery
    from shared.logging import configure_logging
    from shared.reaper import Reaper

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format, process="reaper")
    reaper = Reaper(
        settings,
        _checked_database(),
        make_celery(settings.redis_url, settings.visibility_timeout_s),
        redis.Redis.from_url(settings.redis_url, socket_connect_timeout=3, socket_timeout=10),
    )
    try:
        reaper.run_forever(threading.Event())
    except KeyboardInterrupt:
        pass
    return 0


def cmd_up(args) -> int:
    """Run the embedded stack until Ctrl-C."""
    from services.stack import Stack, StackError

    try:
        with Stack(get_settings(), port=args.port) as stack:
            stack.announce()
            stack.wait()
    except StackError as exc:
        print(f"gemma-jobs: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_demo(args) -> int:
    """Start the stack, send one generation job over HTTP, print its result, stop."""
    from services.stack import Stack, StackError, run_sample_job

    # Keep the children's logs to warnings so the sample job's output stands out.
    os.environ.setdefault("GEMMA_JOBS_LOG_LEVEL", "warning")
    try:
        with Stack(get_settings(), port=args.port) as stack:
            stack.announce()
            return run_sample_job(stack, args.prompt)
    except StackError as exc:
        print(f"gemma-jobs: {exc}", file=sys.stderr)
        return 1


def cmd_usage(args) -> int:
    """Print the same totals as GET /v1/admin/usage, as a table."""
    from pydantic import ValidationError

    from services.domain.usage import usage_report
    from shared.schemas import UsageQuery

    try:
        query = UsageQuery.model_validate(
            {"group_by": args.group_by, "from": args.start, "to": args.end, "key_id": args.key_id}
        )
    except ValidationError as exc:
        print(f"gemma-jobs: {exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}", file=sys.stderr)
        return 2
    with _checked_database().session_scope(read_only=True) as session:
        rows = usage_report(session, query.group_by, query.start, query.end, query.key_id)
    print(f"{query.group_by:32} {'jobs':>6} {'prompt':>10} {'completion':>10} {'train':>10} {'seconds':>10}")
    for row in rows:
        print(
            f"{row.group:32} {row.jobs:>6} {row.prompt_tokens:>10} {row.completion_tokens:>10} "
            f"{row.train_tokens:>10} {row.gpu_seconds:>10.2f}"
        )
    return 0


def cmd_status(args) -> int:
    """Print workers, queues and the latest failed jobs, as GET /v1/admin/workers and /queues see them."""
    from services.domain import operations
    from shared.models import utcnow

    settings = get_settings()
    now = utcnow()
    with _checked_database().session_scope(read_only=True) as session:
        workers = operations.list_workers(session, now, settings.worker_dead_after_s)
        queues = operations.queue_stats(session, now, settings.worker_dead_after_s)
        failures = [(job.id, job.model, job.error or {}, job.finished_at)
                    for job in operations.recent_failures(session)]
    print(f"WORKERS ({sum(worker.alive for worker in workers)} live)")
    print(f"{'id':36} {'state':9} {'alive':5} {'device':8} {'role':8} {'in flight':>9} {'done':>6} "
          f"{'heartbeat':>10}  models")
    for worker in workers:
        age = f"{(now - worker.heartbeat_at).total_seconds():.0f}s ago"
        print(
            f"{worker.id:36} {worker.state:9} {'yes' if worker.alive else 'no':5} {worker.device:8} {worker.role:8} "
            f"{worker.jobs_in_flight:>9} {worker.jobs_done:>6} {age:>10}  {','.join(worker.models)}"
        )
    print(f"\nQUEUES\n{'queue':40} {'queued':>7} {'running':>7} {'oldest wait':>12} {'live workers':>12}")
    for queue in queues:
        wait = f"{queue.oldest_wait_s:.0f}s" if queue.oldest_wait_s is not None else "-"
        print(f"{queue.name:40} {queue.queued:>7} {queue.running:>7} {wait:>12} {queue.live_workers:>12}")
    print(f"\nRECENT FAILURES\n{'job':32} {'model':24} {'code':20} finished")
    for job_id, model, error, finished_at in failures:
        print(f"{job_id:32} {model:24} {error.get('code', '-'):20} {finished_at:%Y-%m-%d %H:%M:%S}")
    return 0


def cmd_keys_create(args) -> int:
    """Create a key and print it alone on stdout."""
    from pydantic import ValidationError

    from services.domain.keys import create_key
    from shared.schemas import KeyCreate

    try:
        request = KeyCreate(
            role=args.role,
            name=args.name,
            rpm=args.rpm,
            tpm=args.tpm,
            max_concurrent=args.max_concurrent,
            expires_at=args.expires_at,
        )
    except ValidationError as exc:
        error = exc.errors()[0]
        print(f"gemma-jobs: --{str(error['loc'][0]).replace('_', '-')}: {error['msg']}", file=sys.stderr)
        return 2
    with _checked_database().session_scope() as session:
        row, plaintext = create_key(session, **request.model_dump())
    print(f"created {row.role} key {row.id}", file=sys.stderr)
    print(plaintext)
    return 0


def cmd_keys_list(_args) -> int:
    """Print a table of keys: whether each works, when it expires, its limits."""
    from services.domain.keys import list_keys
    from shared.models import utcnow

    with _checked_database().session_scope() as session:
        rows = list_keys(session)
        print(f"{'id':32} {'role':6} {'prefix':12} {'state':8} {'expires (UTC)':17} {'rpm':>7} {'tpm':>9} "
              f"{'conc':>5} name")
        now = utcnow()
        for row in rows:
            state = "revoked" if row.revoked_at else "expired" if row.expires_at and row.expires_at <= now else "active"
            expires = row.expires_at.strftime("%Y-%m-%d %H:%M") if row.expires_at else "-"
            limits = [str(limit) if limit is not None else "-" for limit in (row.rpm, row.tpm, row.max_concurrent)]
            print(f"{row.id:32} {row.role:6} {row.key_prefix:12} {state:8} {expires:17} {limits[0]:>7} "
                  f"{limits[1]:>9} {limits[2]:>5} {row.name}")
    return 0


def cmd_keys_revoke(args) -> int:
    """Revoke a key by id."""
    from services.domain.keys import revoke_key
    from shared.errors import NotFound

    try:
        with _checked_database().session_scope() as session:
            revoke_key(session, args.key_id)
    except NotFound as exc:
        print(f"gemma-jobs: {exc.message}", file=sys.stderr)
        return 1
    print(f"revoked {args.key_id}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
