"""Starting and stopping real gateway and worker processes for tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from services.stack import free_port

CLI = [sys.executable, "-m", "services.cli"]


class Service:
    """One child process whose output goes to a log file (read it when a test fails)."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], log_dir: Path):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            command, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, needle: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while needle not in self.log():
            if self.process.poll() is not None:
                raise AssertionError(f"{self.name} exited ({self.process.returncode}):\n{self.log()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: no {needle!r} after {timeout_s}s:\n{self.log()[-4000:]}")
            time.sleep(0.1)

    def kill_all(self) -> None:
        """SIGKILL the process and those it started (its process group), as when its machine dies."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self._log.close()

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 20) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()
        return self.process.returncode


def start_gateway(
    env: dict[str, str], log_dir: Path, timeout_s: float = 30, workers: int = 1, threads: int = 8
) -> tuple[Service, str]:
    """Start `gemma-jobs gateway` on a free port; return it once /readyz answers 200."""
    port = free_port()
    command = [*CLI, "gateway", "--port", str(port), "--workers", str(workers), "--threads", str(threads)]
    service = Service("gateway", command, env, log_dir)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        if service.process.poll() is not None:
            raise AssertionError(f"gateway exited:\n{service.log()[-4000:]}")
        try:
            if requests.get(f"{base_url}/readyz", timeout=1).status_code == 200:
                return service, base_url
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"gateway not ready:\n{service.log()[-4000:]}")
        time.sleep(0.1)


def start_worker(
    env: dict[str, str], log_dir: Path, models: str, name: str = "worker", role: str = "all", *extra: str
) -> Service:
    """Start `gemma-jobs worker --device cpu`; return it once Celery consumes."""
    command = [*CLI, "worker", "--device", "cpu", "--models", models, "--role", role, *extra]
    service = Service(name, command, env, log_dir)
    service.wait_for_log("ready.", timeout_s=240)
    return service


def wait_for_job(base_url: str, headers: dict[str, str], job_id: str, timeout_s: float = 120) -> dict:
    """Poll a job until it reaches a terminal state."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = requests.get(f"{base_url}/v1/jobs/{job_id}", headers=headers, timeout=10).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout_s}s")
