"""structlog set-up shared by every process: context first, then key=value or JSON."""

from __future__ import annotations

import logging
import sys

import structlog


class HandlerWriter:
    """structlog's logger: writes each rendered line to the standard library handler's stream,
    under that handler's lock, so that its lines and the libraries' never interleave.

    Our own events skip the standard library's machinery (a LogRecord, a `getpid` and frame
    walk per record, the formatter's second pass): ~25 µs a line through it, ~12 µs here, and
    a worker writes two lines per job.
    """

    def __init__(self, handler: logging.StreamHandler, name: str):
        self.handler = handler
        self.name = name  # for add_logger_name

    def msg(self, message: str) -> None:
        """Write one rendered line."""
        handler = self.handler
        handler.acquire()
        try:
            handler.stream.write(message + "\n")
            handler.flush()
        finally:
            handler.release()

    debug = info = warning = error = critical = exception = msg


def add_logger_name(logger, _method: str, event_dict: dict) -> dict:
    """Add the name of the module that logged (a HandlerWriter's name, or a LogRecord's)."""
    record = event_dict.get("_record")
    event_dict["logger"] = record.name if record is not None else logger.name
    return event_dict


# Fields every line of this process carries, in every thread: a thread starts with an empty
# context (a worker's task threads, a gateway's request threads), and a request clears its own.
_PROCESS_FIELDS: dict[str, str] = {}


def bind_process_fields(**fields: str) -> None:
    """Add fields (a worker's `worker_id`) to every line this process logs from now on."""
    _PROCESS_FIELDS.update(fields)


def add_process_fields(_logger, _method: str, event_dict: dict) -> dict:
    """Add the process's own fields (`bind_process_fields`) to a line."""
    for name, value in _PROCESS_FIELDS.items():
        event_dict.setdefault(name, value)
    return event_dict


def configure_logging(level: str = "info", fmt: str = "json", process: str = "gemma-jobs") -> None:
    """Render structlog events and the standard library's records alike, to stderr."""
    _PROCESS_FIELDS.clear()
    bind_process_fields(process=process)
    shared_processors = [
        structlog.contextvars.merge_contextvars,
        add_process_fields,
        structlog.processors.add_log_level,
        add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        # Plain tracebacks: with rich installed the default draws every frame's locals (slow
        # with a model in a frame, and it writes prompts and keys held in locals to the log).
        else structlog.dev.ConsoleRenderer(colors=False, exception_formatter=structlog.dev.plain_traceback)
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared_processors,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                # Records of other libraries (Celery's task errors, say) carry exc_info too: as
                # text, or JSON showed "<traceback object at …>" and the traceback was lost.
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    structlog.configure(
        processors=[*shared_processors, structlog.processors.format_exc_info, renderer],
        # An event below the level is a method that returns None: no processor runs.
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=lambda name=None, *_args: HandlerWriter(handler, name or "gemma_jobs"),
        cache_logger_on_first_use=True,
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Alembic narrates every schema check at INFO; only its warnings matter at run time.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.captureWarnings(True)  # Python's warnings as log lines (JSON too), not bare stderr text


# Celery's line for every task received and every task returned: a job's own lines say more
# (`job_started`: attempt, model, queue wait; `job_finished`: usage, tokens/s), and those two
# cost the worker ~0.15 ms of CPU per job, a tenth of a no-op job's path (docs/benchmarks.md).
CELERY_TASK_LOGGERS = ("celery.worker.strategy", "celery.app.trace")


def quiet_celery_task_lines(level: str) -> None:
    """Leave Celery's per-task lines to debug logging; its warnings and errors still show."""
    if logging.getLevelName(level.upper()) > logging.DEBUG:
        for name in CELERY_TASK_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
