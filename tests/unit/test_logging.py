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
