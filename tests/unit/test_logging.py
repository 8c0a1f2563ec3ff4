"""Log output: another library's exception keeps its traceback, as plain text, in both formats."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

SCRIPT = """
import logging, sys
from shared.logging import configure_logging
configure_logging("info", sys.argv[1])
secret = "gj_do_not_log_me"
try:
    raise ValueError("boom")
except ValueError:
    logging.getLogger("celery.worker").exception("task failed")
"""


def logged(fmt: str) -> str:
    result = subprocess.run([sys.executable, "-c", SCRIPT, fmt], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stderr


def test_json_lines_carry_a_librarys_traceback_as_text():
    """It showed "<traceback object at …>" and the traceback was lost."""
    (line,) = [json.loads(line) for line in logged("json").splitlines() if line.startswith("{")]
    assert line["event"] == "task failed" and "exc_info" not in line
    assert line["exception"].startswith("Traceback") and line["exception"].endswith("ValueError: boom")


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_tracebacks_hold_no_locals(fmt):
    """The console's rich tracebacks printed every frame's locals: a key held in one, too."""
    output = logged(fmt)
    assert "ValueError: boom" in output and "gj_do_not_log_me" not in output


THREADS_SCRIPT = """
import logging, threading, structlog
from shared.logging import bind_process_fields, configure_logging
configure_logging("info", "json", process="worker")
bind_process_fields(worker_id="host:1:cpu")

def in_a_thread():
    structlog.get_logger("workers.job_runs").info("job_started")
    logging.getLogger("celery.app.trace").warning("from a library")

thread = threading.Thread(target=in_a_thread)  # a thread starts with an empty context
thread.start()
thread.join()
structlog.contextvars.clear_contextvars()  # as the gateway does at each request's start
structlog.get_logger("services.gateway").info("request_line", request_id="r1")
"""


def test_every_line_carries_the_process_and_worker_id_in_every_thread():
    """A worker's task threads and a gateway's request threads logged without them."""
    result = subprocess.run([sys.executable, "-c", THREADS_SCRIPT], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    assert [line["event"] for line in lines] == ["job_started", "from a library", "request_line"]
    assert all(line["process"] == "worker" and line["worker_id"] == "host:1:cpu" for line in lines), lines
