"""The command line: scriptable keys, `up` with a bundled Redis, `demo`, and device checks."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
import redis
import requests
from sqlalchemy import text

from services.gateway import create_app
from services.gateway.context import KEY_CACHE_TTL_S
from services.stack import free_port
from shared.db import Database
from shared.models import Job
from shared.settings import load_settings
from tests.processes import CLI, start_gateway

pytestmark = pytest.mark.e2e


def cli_env(tmp_path, model_cache_dir, **extra) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("DATABASE_URL", "REDIS_URL")}
    env.update(
        GEMMA_JOBS_DATA_DIR=str(tmp_path / "var"),
        GEMMA_JOBS_MODEL_CACHE_DIR=str(model_cache_dir),
        GEMMA_JOBS_LOG_FORMAT="console",
        **extra,
    )
    return env


def test_keys_create_prints_the_key_alone(tmp_path, model_cache_dir, redis_url):
    env = cli_env(tmp_path, model_cache_dir)
    subprocess.run([*CLI, "migrate"], env=env, check=True, capture_output=True, timeout=60)
    result = subprocess.run(
        [*CLI, "keys", "create", "--role", "admin", "--name", "ops"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip()
    assert re.fullmatch(r"gj_[A-Za-z0-9_-]{43}", key) and result.stdout.count("\n") == 1
    # The key works against a gateway on the same data dir.
    settings = load_settings(data_dir=tmp_path / "var", redis_url=redis_url)
    client = create_app(settings).test_client()
    assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    listing = subprocess.run([*CLI, "keys", "list"], env=env, capture_output=True, text=True, timeout=60)
    assert "ops" in listing.stdout and key not in listing.stdout
    key_id = listing.stdout.splitlines()[1].split()[0]
    subprocess.run([*CLI, "keys", "revoke", key_id], env=env, check=True, capture_output=True, timeout=60)
    # Revoked outside this gateway process: refused once its key cache lets the row go.
    deadline = time.monotonic() + KEY_CACHE_TTL_S + 1
    while (response := client.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"})).status_code == 200:
        assert time.monotonic() < deadline, "a revoked key still works after the key cache's TTL"
        time.sleep(0.2)
    assert response.status_code == 401 and "revoked" in response.get_json()["error"]["message"]


def test_keys_create_refuses_bad_values_naming_the_option(tmp_path, model_cache_dir):
    env = cli_env(tmp_path, model_cache_dir)
    subprocess.run([*CLI, "migrate"], env=env, check=True, capture_output=True, timeout=60)
    for args, option in ((["--rpm", "0"], "--rpm"), (["--expires-at", "2001-01-01T00:00:00Z"], "--expires-at")):
        result = subprocess.run([*CLI, "keys", "create", *args], env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and option in result.stderr and result.stdout == ""
    ok = subprocess.run([*CLI, "keys", "create", "--expires-at", "2099-01-01T00:00:00Z"],
                        env=env, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and ok.stdout.startswith("gj_")


def test_keys_list_says_which_keys_work_and_their_limits(tmp_path, model_cache_dir):
    """It showed an expired key as not revoked, like a working one, and no limits."""
    from sqlalchemy import update

    from shared.db import Database
    from shared.models import ApiKey, utcnow

    env = cli_env(tmp_path, model_cache_dir)
    subprocess.run([*CLI, "migrate"], env=env, check=True, capture_output=True, timeout=60)
    for name in ("limited", "lapsed"):
        subprocess.run([*CLI, "keys", "create", "--name", name, "--rpm", "5", "--tpm", "20000",
                        "--expires-at", "2099-01-01T00:00:00Z"], env=env, check=True, capture_output=True, timeout=60)
    db = Database(load_settings(data_dir=tmp_path / "var").database_url_or_default)
    with db.session_scope() as session:
        session.execute(update(ApiKey).where(ApiKey.name == "lapsed").values(expires_at=utcnow()))
    db.dispose()
    listing = subprocess.run([*CLI, "keys", "list"], env=env, capture_output=True, text=True, timeout=60)
    rows = {line.split()[-1]: line.split() for line in listing.stdout.splitlines()[1:]}
    assert rows["limited"][3:8] == ["active", "2099-01-01", "00:00", "5", "20000"]
    assert rows["lapsed"][3] == "expired"


def test_commands_say_in_one_line_that_the_database_cannot_be_reached(tmp_path, model_cache_dir):
    """They printed a ~120-line traceback."""
    env = cli_env(tmp_path, model_cache_dir, DATABASE_URL="postgresql://gemma@127.0.0.1:1/gemma_jobs")
    for command in (["keys", "list"], ["migrate"], ["usage"]):
        result = subprocess.run([*CLI, *command], env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 3, result.stderr
        assert result.stderr.startswith("gemma-jobs: cannot use the database") and result.stderr.count("\n") == 1
        assert "127.0.0.1" in result.stderr and "Traceback" not in result.stderr


def test_a_bad_registry_file_is_one_line_and_status_2(tmp_path, model_cache_dir):
    """It was a traceback (the worker) or gunicorn's status 3, "database unreachable" (the gateway)."""
    registry = tmp_path / "models.json"
    registry.write_text('{"models": [{"id": "x", "path": "/a"},]}')
    env = cli_env(tmp_path, model_cache_dir, GEMMA_JOBS_MODEL_REGISTRY=str(registry),
                  DATABASE_URL=f"sqlite:///{tmp_path / 'jobs.db'}")
    assert subprocess.run([*CLI, "migrate"], env=env, capture_output=True, timeout=120).returncode == 0
    for command in (["worker", "--device", "cpu"], ["gateway", "--port", str(free_port())]):
        result = subprocess.run([*CLI, *command], env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith(f"gemma-jobs: GEMMA_JOBS_MODEL_REGISTRY={registry}: ")
        assert result.stderr.count("\n") == 1, result.stderr


def test_gunicorn_s_own_lines_are_json_like_the_gateway_s(tmp_path, model_cache_dir, redis_url):
    """A gateway process that died was logged in gunicorn's plain-text format."""
    env = {**cli_env(tmp_path, model_cache_dir, DATABASE_URL=f"sqlite:///{tmp_path / 'jobs.db'}", REDIS_URL=redis_url),
           "GEMMA_JOBS_LOG_FORMAT": "json"}
    assert subprocess.run([*CLI, "migrate"], env=env, capture_output=True, timeout=120).returncode == 0
    gateway, _ = start_gateway(env, tmp_path, workers=1)
    try:
        (child,) = psutil.Process(gateway.pid).children()
        child.kill()
        gateway.wait_for_log("SIGKILL", timeout_s=30)
    finally:
        gateway.stop()
    lines = [json.loads(line) for line in gateway.log().splitlines()]
    (killed,) = [line for line in lines if "SIGKILL" in line["event"]]
    assert killed["logger"] == "gunicorn.error" and killed["level"] == "error" and killed["process"] == "gateway"


def _one_line(result: subprocess.CompletedProcess, status: int, starts: str) -> None:
    assert result.returncode == status, result.stderr
    assert result.stderr.startswith(starts) and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr


def test_a_schema_the_code_cannot_use_is_one_line_and_status_2_for_every_command(tmp_path, model_cache_dir):
    """The worker, `migrate` on a revision no migration made, and `up` on a newer database's
    schema ended in tracebacks; `migrate` and the gateway already said it in one line."""
    from shared.migrate import downgrade

    env = cli_env(tmp_path, model_cache_dir, DATABASE_URL=f"sqlite:///{tmp_path / 'jobs.db'}")
    subprocess.run([*CLI, "migrate"], env=env, check=True, capture_output=True, timeout=60)
    downgrade(env["DATABASE_URL"], "0006")
    worker = subprocess.run([*CLI, "worker", "--device", "cpu"], env=env, capture_output=True, text=True, timeout=120)
    _one_line(worker, 2, "gemma-jobs: database schema is at 0006, the code needs")
    db = Database(env["DATABASE_URL"])
    with db.session_scope() as session:
        session.execute(text("UPDATE alembic_version SET version_num = 'abc'"))
    migrate = subprocess.run([*CLI, "migrate"], env=env, capture_output=True, text=True, timeout=60)
    _one_line(migrate, 2, "gemma-jobs: database schema is at revision 'abc', which no gemma-jobs migration made")
    with db.session_scope() as session:
        session.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    db.dispose()
    up = subprocess.run([*CLI, "up", "--port", str(free_port())], env=env, capture_output=True, text=True, timeout=60)
    _one_line(up, 2, "gemma-jobs: database schema is at 9999, newer than this code's")


@pytest.mark.parametrize(("variable", "value", "named"), [
    ("REDIS_URL", "http://foo", "REDIS_URL: must be a redis://"),
    ("DATABASE_URL", "mysql://user@host/db", "DATABASE_URL: mysql is not supported"),
    ("DATABASE_URL", "postgresql://user@host:abc/db", "DATABASE_URL: not a database URL"),
])
def test_a_url_the_product_cannot_use_is_one_line_and_status_2(tmp_path, model_cache_dir, variable, value, named):
    """Each was a traceback at the first connection (the gateway's was gunicorn's status 3)."""
    env = cli_env(tmp_path, model_cache_dir, **{variable: value})
    for command in (["status"], ["worker", "--device", "cpu"]):
        result = subprocess.run([*CLI, *command], env=env, capture_output=True, text=True, timeout=60)
        _one_line(result, 2, f"gemma-jobs: invalid settings: {named}")


def test_an_unwritable_data_dir_is_one_line_and_status_2(tmp_path, model_cache_dir):
    """A data dir that cannot be created (read-only, or under a file) was an OSError traceback."""
    (tmp_path / "a-file").write_text("")
    env = {**cli_env(tmp_path, model_cache_dir), "GEMMA_JOBS_DATA_DIR": str(tmp_path / "a-file" / "var")}
    _one_line(subprocess.run([*CLI, "migrate"], env=env, capture_output=True, text=True, timeout=60), 2,
              f"gemma-jobs: cannot create the SQLite database's folder (DATABASE_URL or GEMMA_JOBS_DATA_DIR) {tmp_path}")


def test_a_models_list_that_names_no_model_is_one_line_and_status_2(tmp_path, model_cache_dir):
    """It was "no model of --models could be loaded (; see model_unavailable above)", with none above."""
    result = subprocess.run([*CLI, "worker", "--device", "cpu", "--models", " , "], env=cli_env(tmp_path, model_cache_dir),
                            capture_output=True, text=True, timeout=60)
    _one_line(result, 2, "gemma-jobs: --models names no model (' , ')")


def test_out_of_range_ports_are_refused_naming_the_option(tmp_path, model_cache_dir):
    """They were OverflowError tracebacks."""
    env = cli_env(tmp_path, model_cache_dir)
    # The gateway may take 0, any free port; a worker's metrics port must be known to its scraper.
    for command, refused in ((["gateway", "--port", "70000"], "argument --port: must be a whole number from 0 to"),
                             (["worker", "--metrics-port", "0"], "argument --metrics-port: must be a whole number from 1 to")):
        result = subprocess.run([*CLI, *command], env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and f"{refused} 65535" in result.stderr, result.stderr


def test_output_into_a_closed_pipe_ends_quietly(tmp_path, model_cache_dir):
    """`gemma-jobs status | head -3` printed a BrokenPipeError traceback."""
    env = cli_env(tmp_path, model_cache_dir)
    subprocess.run([*CLI, "migrate"], env=env, check=True, capture_output=True, timeout=60)
    listing = subprocess.Popen([*CLI, "keys", "list"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    listing.stdout.close()  # the reader is gone before the command writes
    _, errors = listing.communicate(timeout=60)
    assert listing.returncode == 1 and errors == b""


def test_worker_refuses_a_gpu_it_does_not_have(tmp_path, model_cache_dir):
    result = subprocess.run(
        [*CLI, "worker", "--gpu", "0"], env=cli_env(tmp_path, model_cache_dir), capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert "CUDA is not available" in result.stderr


def test_up_runs_everything_with_a_bundled_redis_and_stops_cleanly(tmp_path, model_cache_dir):
    port = free_port()
    # No REDIS_URL: the bundled redis-server starts. A grace longer than `up`'s other children
    # get to stop (20 s): its worker must still be given it.
    env = cli_env(tmp_path, model_cache_dir, GEMMA_JOBS_SHUTDOWN_GRACE_S="22")
    log = open(tmp_path / "up.log", "w")  # a file, not a pipe nobody drains
    process = subprocess.Popen(
        [*CLI, "up", "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=log, text=True
    )
    try:
        admin_key = process.stdout.readline().strip()  # printed once stack is ready
        assert admin_key.startswith("gj_")
        base = f"http://127.0.0.1:{port}"
        assert requests.get(f"{base}/readyz", timeout=5).status_code == 200
        children = psutil.Process(process.pid).children(recursive=True)
        names = " ".join(" ".join(child.cmdline()) for child in children)
        assert "redis-server" in names and " gateway " in names and " worker " in names
        # Where the bundled Redis listens is printed: another worker needs it to join.
        bundled = re.search(r"set REDIS_URL=(redis://127\.0\.0\.1:\d+/0) ", (tmp_path / "up.log").read_text())
        assert bundled and redis.Redis.from_url(bundled.group(1)).ping()
        headers = {"Authorization": f"Bearer {admin_key}", "Prefer": "wait=60"}
        body = {"model": "gemma-3-270m", "prompt": "Hello", "max_new_tokens": 3}
        job = requests.post(f"{base}/v1/generations", json=body, headers=headers, timeout=90).json()
        # The worker may still be loading; the job waits in the queue until it is served.
        deadline = time.monotonic() + 120
        while job["status"] not in ("succeeded", "failed") and time.monotonic() < deadline:
            time.sleep(0.5)
            job = requests.get(f"{base}/v1/jobs/{job['id']}", headers=headers, timeout=10).json()
        assert job["status"] == "succeeded", job
        # Ctrl-C with a job running: the worker gets its grace, then hands the job back.
        long = {"model": "gemma-3-270m", "prompt": "Count: 1, 2, 3, 4, 5, 6,", "max_new_tokens": 2048,
                "temperature": 0}
        auth = {"Authorization": headers["Authorization"]}  # no Prefer: wait, which would hold the poll
        running = requests.post(f"{base}/v1/generations", json=long, headers=auth, timeout=90).json()
        while requests.get(f"{base}/v1/jobs/{running['id']}", headers=auth, timeout=10).json()["status"] == "queued":
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=90) == 0
        assert not [child for child in children if child.is_running() and child.status() != psutil.STATUS_ZOMBIE]
    finally:
        if process.poll() is None:
            process.kill()
    db = Database(load_settings(data_dir=tmp_path / "var").database_url_or_default)
    with db.session_scope() as session:
        handed_back = session.get(Job, running["id"])
        # SIGKILLed at 20 s, the worker left it running, its lease to lapse and an attempt used up.
        assert (handed_back.status, handed_back.hand_backs) == ("queued", 1)
    db.dispose()
    # A second start finds the admin key and does not print a new one.
    second = subprocess.Popen(
        [*CLI, "up", "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=log, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if requests.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.3)
        # A second `up` on the port in use says so in one line; it took the other's /readyz for its own.
        third = subprocess.run([*CLI, "up", "--port", str(port)], env=env, capture_output=True, text=True,
                               timeout=60)
        assert third.returncode == 1 and third.stderr == (
            f"gemma-jobs: port {port} is in use (Address already in use); stop what listens there or pass --port\n")
        cancel = requests.post(f"http://127.0.0.1:{port}/v1/jobs/{running['id']}/cancel", headers=auth, timeout=10)
        assert cancel.status_code == 200  # else the second stop waits out a grace too
        second.send_signal(signal.SIGINT)
        out, _ = second.communicate(timeout=60)
        assert "gj_" not in out
    finally:
        if second.poll() is None:
            second.kill()


def test_a_killed_up_takes_its_children_with_it(tmp_path, model_cache_dir):
    """SIGKILL gives `up` no chance to stop its children; they stop themselves (parent-death signal)."""
    env = cli_env(tmp_path, model_cache_dir)  # the bundled redis-server too
    with open(tmp_path / "up.log", "w") as log:
        process = subprocess.Popen([*CLI, "up", "--port", str(free_port())], env=env, stdout=log, stderr=log)
    children: list[psutil.Process] = []
    try:
        up = psutil.Process(process.pid)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and process.poll() is None:
            children = up.children(recursive=True)
            names = " ".join(" ".join(_cmdline(child)) for child in children)
            if "redis-server" in names and " gateway " in names and " worker " in names:
                break
            time.sleep(0.1)
        assert len(children) >= 3, (tmp_path / "up.log").read_text()[-3000:]
        process.kill()
        process.wait()
        deadline = time.monotonic() + 60
        while _running(children) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _running(children), [_cmdline(child) for child in _running(children)]
    finally:
        if process.poll() is None:
            process.kill()
        for child in _running(children):
            child.kill()


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:  # exited meanwhile
        return []


def _running(processes: list[psutil.Process]) -> list[psutil.Process]:
    """The processes still running (an exited child of a dead parent may linger as a zombie)."""
    alive = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.NoSuchProcess:
            pass
    return alive


def test_demo_prints_a_real_completion(tmp_path, model_cache_dir, redis_url):
    env = cli_env(tmp_path, model_cache_dir, REDIS_URL=redis_url.rsplit("/", 1)[0] + "/12")
    result = subprocess.run(
        [*CLI, "demo", "--port", str(free_port()), "--prompt", "Q: Name a color.\nA:"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "completion:" in result.stdout
    completion = result.stdout.split("completion:", 1)[1].strip()
    assert completion
    assert re.search(r"\d+ tokens in [\d.]+s \([\d.]+ tokens/s\)", result.stderr)


def test_gateway_module_imports_no_torch():
    code = "import sys, services.cli, services.gateway, services.stack; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_worker_start_path_imports_no_trainer():
    # peft and transformers' Trainer (~0.5 s of a worker's start) wait for a fine-tune's first run.
    code = ("import sys, services.cli, workers.main, workers.training_tokenizers; "
            "assert 'peft' not in sys.modules and 'transformers.trainer' not in sys.modules, "
            "[name for name in sys.modules if name.startswith(('peft', 'transformers.trainer'))]")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
