"""Start-up and memory: worker start to ready with a cached model, and gateway and worker RSS.

    GEMMA_JOBS_MODEL_CACHE_DIR=/tmp/gjcache .venv/bin/python bench/startup_memory.py --concurrency 1,8 --repeats 2

Worker: `gemma-jobs worker --device cpu --concurrency K` (role all, the default) on a fresh
PostgreSQL database and a flushed Redis db, timed from just before the process is spawned to
its `worker_ready` log line (and to its registry row reading `ready`); then its RSS. Baseline:
a fresh `python -c` that imports torch and transformers and loads the same cached weights with
`AutoModelForCausalLM.from_pretrained` in the dtype the worker logged, timed the same way (to
the line it prints once loaded). Gateway: `gemma-jobs gateway` (gunicorn master + --workers
gthread workers, --threads each) per GEMMA_JOBS_GATEWAY_COUNT_TOKENS mode, RSS of each process
after `--submits` short submits on fresh connections (no worker runs, so jobs stay queued);
"auto+long" then also sends one prompt that might not fit the context, which loads the
tokenizer in the process that takes it. Baseline: a trivial Flask app under the same gunicorn
settings (`services.server.gunicorn_options`), importing only Flask and those. Each gateway
process's /proc/PID/maps is checked for torch's libraries, and a fresh process serving the same
submits through the app must end without torch or transformers in sys.modules. RSS in MB of
10^6 bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import psutil
import redis
import requests
from bench_processes import CLI, Child, answers, child_env, fresh_postgres, wait_until
from sqlalchemy import select

from services.domain.keys import create_key
from services.stack import free_port
from shared.db import Database
from shared.models import WorkerRecord
from shared.registry import DEFAULT_MODEL_ID

READY_FLOOR_S = 5.0
RSS_FLOOR_MB = 150.0
SHORT = {"model": DEFAULT_MODEL_ID, "prompt": "The capital of France is", "max_new_tokens": 8}
# 40,000 bytes: might not fit a 32,768-token context, so "auto" counts it (it is ~8,000 tokens).
LONG = {**SHORT, "prompt": "word " * 8000}

BASELINE_LOAD = """
import sys, torch, transformers
transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
print("loaded", flush=True)
sys.stdin.read()
"""

# Only Flask and the gateway's gunicorn settings are imported, as a lean app would.
TRIVIAL_GATEWAY = """
import sys
from flask import Flask
from services.server import GunicornApp, gunicorn_options

def trivial_app():
    app = Flask("trivial")
    app.get("/readyz", endpoint="ready")(lambda: {"status": "ok"})
    app.post("/v1/generations", endpoint="submit")(lambda: ({"id": "job_trivial", "status": "queued"}, 202))
    return app

port, workers, threads = (int(value) for value in sys.argv[2::2])
GunicornApp(gunicorn_options("127.0.0.1", port, workers=workers, threads=threads, timeout_s=90), trivial_app).run()
"""

SYS_MODULES_CHECK = """
import json, sys
from services.gateway import create_app
from services.domain.keys import create_key
app = create_app()
with app.extensions["gemma_jobs"].db.session_scope() as session:
    _, key = create_key(session, role="user")
client = app.test_client()
for body in json.loads(sys.argv[1]):
    assert client.post("/v1/generations", json=body, headers={"Authorization": "Bearer " + key}).status_code == 202
print(json.dumps(sorted(name for name in ("torch", "transformers") if name in sys.modules)))
"""


def mb(process: psutil.Process) -> float:
    return process.memory_info().rss / 1e6


# --- the worker --------------------------------------------------------------------------------


def worker_start(args, env: dict[str, str], concurrency: int, workdir: Path) -> dict:
    """Start one worker; return seconds to its ready log line and registry row, its RSS and dtype."""
    redis.Redis.from_url(args.redis_url).flushdb()
    log_path = workdir / f"worker-{concurrency}-{time.monotonic_ns()}.log"
    command = [*CLI, "worker", "--device", "cpu", "--models", DEFAULT_MODEL_ID, "--concurrency", str(concurrency)]
    spawned_at = time.time()
    child = Child(command, env, log_path)
    db = Database(env["DATABASE_URL"])
    try:
        wait_until(lambda: '"worker_ready"' in child.log(), 300, child=child)
        logged_s = time.perf_counter() - child.started
        wait_until(lambda: _row_state(db, child.pid) == "ready", 30, child=child)
        row_s = time.perf_counter() - child.started
        events = {line["event"]: line for line in map(json.loads, _json_lines(child.log()))}
        model_loaded_at = datetime.fromisoformat(events["model_loaded"]["timestamp"]).timestamp() - spawned_at
        helpers = psutil.Process(child.pid).children(recursive=True)  # its result writer (and the spawn tracker)
        return {"ready_s": logged_s, "row_s": row_s, "rss_mb": mb(psutil.Process(child.pid)),
                "helpers_rss_mb": sum(mb(helper) for helper in helpers),
                "dtype": events["model_loaded"]["dtype"].removeprefix("torch."),
                "model_load_s": events["model_loaded"]["seconds"], "model_loaded_at_s": model_loaded_at,
                "tokenizer_s": events["model_loaded"].get("tokenizer_seconds", float("nan"))}
    finally:
        child.stop()
        db.dispose()


def _json_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("{")]


def _row_state(db: Database, pid: int) -> str | None:
    with db.session_scope(read_only=True) as session:
        return session.scalar(select(WorkerRecord.state).where(WorkerRecord.pid == pid))


def baseline_load(model_dir: Path, dtype: str, log_path: Path) -> tuple[float, float]:
    """Return seconds from spawning a fresh process to torch and transformers imported and the
    model loaded, and that process's RSS."""
    started = time.perf_counter()
    with open(log_path, "ab") as log:
        process = subprocess.Popen([sys.executable, "-c", BASELINE_LOAD, str(model_dir), dtype],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        if process.stdout.readline().strip() != "loaded":
            raise SystemExit(f"the baseline process failed to load the model; see {log_path}")
        return time.perf_counter() - started, mb(psutil.Process(process.pid))
    finally:
        process.kill()
        process.wait()


# --- the gateway ----------------------------------------------------------------------------------


def gateway_rss(args, command: list[str], env: dict[str, str], workdir: Path, name: str,
                long_prompt: bool = False) -> dict:
    """Run a gateway, send submits, and return the RSS and torch-freedom of its master and workers."""
    port = free_port()
    child = Child([*command, "--port", str(port), "--workers", str(args.workers), "--threads", str(args.threads)],
                  env, workdir / f"gateway-{name}.log")
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: answers(f"{base_url}/readyz"), 60, interval=0.1, child=child)
        headers = {"Authorization": f"Bearer {args.key}"}
        for body in [SHORT] * args.submits + ([LONG] if long_prompt else []):
            # A new connection each time, so every gunicorn worker takes some.
            response = requests.post(f"{base_url}/v1/generations", json=body, headers=headers, timeout=60)
            if response.status_code != 202:
                raise SystemExit(f"{name}: submit answered {response.status_code}: {response.text[:300]}")
        master = psutil.Process(child.pid)
        workers = master.children()
        return {"master": mb(master), "workers": [mb(worker) for worker in workers],
                "torch_mapped": any(_maps_torch(process.pid) for process in [master, *workers])}
    finally:
        child.stop()


def _maps_torch(pid: int) -> bool:
    """Return whether a process has torch's shared libraries mapped (it imported torch)."""
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def sys_modules_check(env: dict[str, str]) -> list[str]:
    """Serve a short and a long submit through the gateway app in a fresh process; return heavy modules it imported."""
    output = subprocess.run([sys.executable, "-c", SYS_MODULES_CHECK, json.dumps([SHORT, LONG])], env=env,
                            capture_output=True, text=True, timeout=120)
    if output.returncode:
        raise SystemExit(f"the sys.modules check failed:\n{output.stderr[-3000:]}")
    return json.loads(output.stdout.strip().splitlines()[-1])


# --- the report -------------------------------------------------------------------------------------


def report_workers(args, env: dict[str, str], workdir: Path) -> list[bool]:
    """Time worker start-ups against the bare load; print them; return whether each met the floor."""
    met = []
    for concurrency in args.concurrency:
        runs = [worker_start(args, env, concurrency, workdir) for _ in range(args.repeats)]
        worker = {name: statistics.median(run[name] for run in runs) for name in runs[0] if name != "dtype"}
        dtype = runs[0]["dtype"]
        bases = [baseline_load(args.model_cache / DEFAULT_MODEL_ID, dtype, workdir / "baseline.log")
                 for _ in range(args.repeats)]
        base = statistics.median(seconds for seconds, _ in bases)
        ready = worker["ready_s"]
        print(f"worker --concurrency {concurrency} ({dtype}, role all):")
        print(f"  baseline  import torch+transformers, from_pretrained: {base:6.2f} s  "
              f"RSS {statistics.median(rss for _, rss in bases):5.0f} MB  (runs: {_list(s for s, _ in bases)})")
        print(f"  result    spawn to worker_ready log line            : {ready:6.2f} s  "
              f"RSS {worker['rss_mb']:5.0f} MB  (runs: {_list(run['ready_s'] for run in runs)}; "
              f"registry row ready {worker['row_s']:.2f} s; its result writer and spawn tracker processes "
              f"{worker['helpers_rss_mb']:.0f} MB more)")
        # The worker logs no event between its imports and the model load that every run has
        # (cpu_threads only when it changes the count), so the first span covers both.
        print(f"  where     spawn to model load start (interpreter, imports, DB/Redis clients, schema check, "
              f"registration) {worker['model_loaded_at_s'] - worker['model_load_s']:.2f} s; "
              f"model load {worker['model_load_s']:.2f} s (tokenizer {worker['tokenizer_s']:.2f} s, then "
              f"model classes + weights); model loaded to ready "
              f"{ready - worker['model_loaded_at_s']:.2f} s")
        met.append(ready <= READY_FLOOR_S)
        print(f"  ratio     worker / baseline                          : {ready / base:6.2f}  "
              f"(floor ready <= {READY_FLOOR_S:g} s: {'met' if met[-1] else 'MISSED'})")
    return met


def report_gateways(args, env: dict[str, str], workdir: Path) -> list[bool]:
    """Measure the trivial app and the gateway per counting mode; print them; return floor checks."""
    trivial = gateway_rss(args, [sys.executable, "-c", TRIVIAL_GATEWAY], env, workdir, "trivial")
    print(f"gateway (gunicorn gthread, --workers {args.workers} --threads {args.threads}; {args.submits} short "
          f"submits on fresh connections):")
    print(f"  baseline  trivial Flask app: master {trivial['master']:4.0f} MB, "
          f"workers {_list(trivial['workers'], '.0f')} MB")
    met = []
    for mode in args.count_tokens:
        count_tokens = mode.removesuffix("+long")
        mode_env = {**env, "GEMMA_JOBS_GATEWAY_COUNT_TOKENS": count_tokens}
        result = gateway_rss(args, CLI + ["gateway"], mode_env, workdir, mode, long_prompt=mode.endswith("+long"))
        largest = max(result["workers"])
        ratio = largest / max(trivial["workers"])
        line = (f"  result    COUNT_TOKENS={mode:10}: master {result['master']:4.0f} MB, workers "
                f"{_list(result['workers'], '.0f')} MB; ratio largest worker / trivial {ratio:.2f}; "
                f"torch mapped: {'YES' if result['torch_mapped'] else 'no'}")
        if mode == "auto":  # the default: the floor applies to it
            met.append(largest <= RSS_FLOOR_MB and result["master"] <= RSS_FLOOR_MB and not result["torch_mapped"])
            line += f"  (floor <= {RSS_FLOOR_MB:g} MB, no torch: {'met' if met[-1] else 'MISSED'})"
        print(line)
    heavy = sys_modules_check({**env, "GEMMA_JOBS_GATEWAY_COUNT_TOKENS": "auto"})
    print(f"  sys.modules after a short and a long submit through create_app(): "
          f"{'torch/transformers absent' if not heavy else 'IMPORTED ' + ', '.join(heavy)}")
    met.append(not heavy)
    return met


def _list(values, spec: str = ".2f") -> str:
    return ", ".join(format(value, spec) for value in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="1,8", help="worker --concurrency values to start")
    parser.add_argument("--repeats", type=int, default=2, help="worker and baseline starts each; medians")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers (the gateway's default)")
    parser.add_argument("--threads", type=int, default=16, help="threads per gunicorn worker (the default)")
    parser.add_argument("--submits", type=int, default=20)
    parser.add_argument("--count-tokens", default="auto,auto+long,true",
                        help="GEMMA_JOBS_GATEWAY_COUNT_TOKENS modes; +long adds one long prompt")
    parser.add_argument("--model-cache", type=Path,
                        default=Path(os.environ.get("GEMMA_JOBS_MODEL_CACHE_DIR", "var/models")))
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12"))
    parser.add_argument("--skip-workers", action="store_true")
    args = parser.parse_args()
    args.concurrency = [int(value) for value in args.concurrency.split(",")]
    args.count_tokens = args.count_tokens.split(",")
    if not (args.model_cache / DEFAULT_MODEL_ID / "config.json").is_file():
        raise SystemExit(f"no converted model under {args.model_cache}; set GEMMA_JOBS_MODEL_CACHE_DIR")
    print(f"settings: cores={os.cpu_count()} database=postgresql redis={args.redis_url} "
          f"model={DEFAULT_MODEL_ID} cache={args.model_cache} repeats={args.repeats} log_level=info")
    with tempfile.TemporaryDirectory() as folder, fresh_postgres() as database_url:
        env = child_env(DATABASE_URL=database_url, REDIS_URL=args.redis_url, GEMMA_JOBS_DATA_DIR=folder,
                        GEMMA_JOBS_MODEL_CACHE_DIR=str(args.model_cache.resolve()))
        db = Database(database_url)
        with db.session_scope() as session:
            _, args.key = create_key(session, role="user", name="bench")
        db.dispose()
        met = [] if args.skip_workers else report_workers(args, env, Path(folder))
        met += report_gateways(args, env, Path(folder))
        redis.Redis.from_url(args.redis_url).flushdb()
    print(f"floors: {'all met' if all(met) else 'MISSED (see above)'}")


if __name__ == "__main__":
    main()
