"""Gateway HTTP throughput: submit and poll requests/s and p99 under wrk, vs a trivial Flask route.

    .venv/bin/python bench/gateway_http.py --duration 10 --rounds 2 --connections 16 --wrk-threads 2

On a fresh PostgreSQL database (created on POSTGRES_ADMIN_URL's server, migrated to head,
dropped at the end) and Redis at --redis-url (flushed before and after), two servers run side
by side: a trivial Flask route returning a small JSON, served with the gateway's own gunicorn
settings (`services.server.gunicorn_options`: gthread, same workers and threads), and
`gemma-jobs gateway` with one key without limits and no worker (submitted jobs stay queued).
wrk measures in --rounds rounds, so that the machine's other load weighs on all alike: the
trivial route, `POST /v1/generations`, then `GET /v1/jobs/{id}` rotating over 100 of the jobs
submitted so far (queued, so each poll works out its queue position); each gets --duration
seconds in all. Prompt tokens are estimated (GEMMA_JOBS_GATEWAY_COUNT_TOKENS=false; the
default, auto, does the same for a prompt this short); `--tokenizer-cache DIR` adds a submit
run through a third gateway that counts every prompt (=true) with DIR/gemma-3-270m/tokenizer.json.
Prints requests/s and p99 of each and the ratios to the trivial route; `--cpu` adds the CPU time
per request of the server answering it (all its processes), of PostgreSQL and of Redis.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import psycopg
import redis
import requests

# A sibling script (bench/ is on sys.path when a script in it runs).
from bench_processes import cpu_seconds, cpu_since, fresh_postgres, named_processes, new_key, serving

SUBMIT_BODY = {"model": "gemma-3-270m", "prompt": "The history of the printing press begins", "max_new_tokens": 32}
FLOORS = {"submit": 0.25, "poll": 0.5}
CPU_GROUPS = ("server", "PostgreSQL", "Redis")

# wrk prints its own report; these two lines are what the script reads: totals, then the
# latency histogram (microseconds:count), so that rounds can be merged into one p99.
LUA_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("WRK_RESULT %d %d %d\\n", summary.requests, summary.duration,
    e.connect + e.read + e.write + e.status + e.timeout))
  local counts = {}
  for i = 1, #latency do
    local value, count = latency(i)
    counts[#counts + 1] = string.format("%d:%d", value, count)
  end
  io.write("WRK_LATENCY " .. table.concat(counts, " ") .. "\\n")
end
"""


@dataclass(frozen=True)
class WrkResult:
    """One or more wrk runs of one thing: requests, seconds, the latency histogram, and CPU
    seconds spent meanwhile by the processes watched (by group name)."""

    requests: int
    seconds: float
    latency_us: Counter
    cpu_s: Counter = field(default_factory=Counter)

    def __add__(self, other: WrkResult) -> WrkResult:
        return WrkResult(self.requests + other.requests, self.seconds + other.seconds,
                         self.latency_us + other.latency_us, self.cpu_s + other.cpu_s)

    @property
    def rps(self) -> float:
        """Return requests per second over all runs."""
        return self.requests / self.seconds

    @property
    def p99_ms(self) -> float:
        """Return the 99th percentile latency."""
        return self.percentile_ms(99)

    def percentile_ms(self, percent: float) -> float:
        """Return a latency percentile, ranked as wrk ranks it."""
        rank, seen = round(percent / 100 * sum(self.latency_us.values()) + 0.5), 0
        for value in sorted(self.latency_us):
            seen += self.latency_us[value]
            if seen >= rank:
                return value / 1000
        return 0.0

    def cpu_line(self) -> str:
        """Return the CPU milliseconds per request of each group watched."""
        return "  ".join(f"{name} {self.cpu_s.get(name, 0.0) / self.requests * 1e3:.3f}" for name in CPU_GROUPS)

    def line(self) -> str:
        """Return the result as one aligned line."""
        return (f"{self.rps:8.0f} req/s  p50 {self.percentile_ms(50):7.2f} ms  p99 {self.p99_ms:7.2f} ms  "
                f"({self.requests} requests)")


def lua_script(folder: Path, name: str, *, token: str | None = None, body: dict | None = None,
               paths: list[str] | None = None) -> Path:
    """Write a wrk script: optional bearer token, JSON POST body, or GET paths to rotate over."""
    lines = []
    if token:
        lines.append(f'wrk.headers["Authorization"] = "Bearer {token}"')
    if body is not None:
        lines += ['wrk.method = "POST"', 'wrk.headers["Content-Type"] = "application/json"',
                  f"wrk.body = {json.dumps(json.dumps(body))}"]
    if paths:
        lines += ["local paths = {" + ", ".join(json.dumps(path) for path in paths) + "}",
                  "local i = 0",
                  "request = function()\n  i = i % #paths + 1\n  return wrk.format(nil, paths[i])\nend"]
    path = folder / f"{name}.lua"
    path.write_text("\n".join(lines) + "\n" + LUA_DONE)
    return path


def require_wrk() -> None:
    """Stop at once, saying how to get it, where wrk is not installed (not a traceback minutes in)."""
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: `apt-get install wrk` (Debian, Ubuntu) or build it from github.com/wg/wrk")


def run_wrk(url: str, script: Path, *, connections: int, threads: int, duration_s: int) -> WrkResult:
    """Run wrk against a URL and return its result; stop the benchmark if any request failed."""
    output = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration_s}s", "--timeout", "30s", "--latency", "-s",
         str(script), url],
        capture_output=True, text=True, check=True, timeout=duration_s + 60,
    ).stdout
    lines = {line.split(" ", 1)[0]: line.split()[1:] for line in output.splitlines() if line.startswith("WRK_")}
    count, duration_us, errors = (int(field) for field in lines["WRK_RESULT"])
    if errors:
        raise SystemExit(f"{errors} of {count} requests to {url} failed:\n{output[:3000]}")
    histogram = Counter()
    for pair in lines["WRK_LATENCY"]:
        value, times = pair.split(":")
        histogram[int(value)] += int(times)
    return WrkResult(count, duration_us / 1e6, histogram)


def server_processes(url: str) -> list[psutil.Process]:
    """Return every process of the server listening at a URL (its whole session: master and workers)."""
    port = int(url.rsplit(":", 1)[1])
    listening = {connection.pid for connection in psutil.net_connections("tcp")
                 if connection.laddr.port == port and connection.status == psutil.CONN_LISTEN and connection.pid}
    sessions = {os.getsid(pid) for pid in listening}
    found = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) in sessions:
                found.append(process)
        except OSError:
            continue
    return found


def with_cpu(run, groups: dict[str, Callable[[], list[psutil.Process]]]) -> WrkResult:
    """Run a wrk measurement and add the CPU seconds each group of processes spent meanwhile
    (a process that started meanwhile, such as a new database backend, counts from zero)."""
    before = {name: cpu_seconds(processes()) for name, processes in groups.items()}
    result = run()
    spent = Counter()
    for name, processes in groups.items():
        spent[name] = cpu_since(before[name], cpu_seconds(processes()))
    return WrkResult(result.requests, result.seconds, result.latency_us, spent)


def serving_gateway(args, database_url: str, workdir: Path, name: str, **settings: str):
    """Run `gemma-jobs gateway` with args' workers and threads, product defaults (no GEMMA_JOBS_*
    inherited) and these settings; yield its base URL."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("GEMMA_JOBS_")}
    env.update(DATABASE_URL=database_url, REDIS_URL=args.redis_url, GEMMA_JOBS_DATA_DIR=str(workdir / "var"),
               GEMMA_JOBS_LOG_LEVEL="warning", GEMMA_JOBS_GATEWAY_COUNT_TOKENS="false")
    env.update({f"GEMMA_JOBS_{setting.upper()}": value for setting, value in settings.items()})
    command = [sys.executable, "-m", "services.cli", "gateway", "--workers", str(args.workers),
               "--threads", str(args.threads)]
    return serving(command, "/readyz", workdir / f"{name}.log", env)


def trivial_app():
    """Return a Flask app with one route answering a small JSON: the baseline."""
    from flask import Flask

    app = Flask("trivial")
    app.add_url_rule("/ping", "ping", lambda: {"status": "ok"})
    return app


def serve_trivial(port: int, workers: int, threads: int) -> None:
    """Serve the trivial app under the gateway's gunicorn settings."""
    from services.server import GunicornApp, gunicorn_options
    from shared.settings import load_settings

    # The same worker timeout `gemma-jobs gateway` sets (it does not change throughput).
    timeout_s = int(load_settings().max_wait_s) + 30
    options = gunicorn_options("127.0.0.1", port, workers=workers, threads=threads, timeout_s=timeout_s)
    GunicornApp(options, trivial_app).run()


def submit_concurrently(base_url: str, token: str, count: int) -> None:
    """Submit `count` jobs at once (so that every gateway process gets some), waiting as long as it takes."""
    def submit(_) -> None:
        headers = {"Authorization": f"Bearer {token}"}
        requests.post(base_url + "/v1/generations", json=SUBMIT_BODY, headers=headers, timeout=120).raise_for_status()

    with ThreadPoolExecutor(count) as pool:
        list(pool.map(submit, range(count)))


def job_ids(database_url: str, key_id: str, after: str = "") -> list[str]:
    """Return a key's job ids after an id, oldest first."""
    with psycopg.connect(database_url.replace("+psycopg", "")) as connection:
        rows = connection.execute(
            "SELECT id FROM jobs WHERE owner_key_id = %s AND id > %s ORDER BY id", (key_id, after))
        return [row[0] for row in rows]


def spread(items: list[str], count: int) -> list[str]:
    """Return up to `count` items picked evenly from first to last."""
    return items[:: max(1, len(items) // count)][:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds of wrk for each thing measured")
    parser.add_argument("--rounds", type=int, default=2, help="split each thing's seconds over this many rounds")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--wrk-threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="gunicorn worker processes (gateway default)")
    parser.add_argument("--threads", type=int, default=16, help="threads per process (gateway default)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--tokenizer-cache", type=Path, help="a model cache holding gemma-3-270m/tokenizer.json")
    parser.add_argument("--cpu", action="store_true", help="also print CPU ms per request of server, PostgreSQL, Redis")
    parser.add_argument("--serve-trivial", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_trivial:
        serve_trivial(args.port, args.workers, args.threads)
        return
    require_wrk()
    wrk = dict(connections=args.connections, threads=args.wrk_threads, duration_s=max(1, args.duration // args.rounds))
    broker = redis.Redis.from_url(args.redis_url)
    broker.flushdb()
    results: dict[str, WrkResult] = {}
    with tempfile.TemporaryDirectory() as folder, fresh_postgres() as database_url, ExitStack() as servers:
        workdir = Path(folder)
        key_id, token = new_key(database_url)
        trivial = [sys.executable, __file__, "--serve-trivial", "--workers", str(args.workers),
                   "--threads", str(args.threads)]
        trivial_url = servers.enter_context(serving(trivial, "/ping", workdir / "trivial.log"))
        gateway_url = servers.enter_context(serving_gateway(args, database_url, workdir, "gateway"))
        submit = lua_script(workdir, "submit", token=token, body=SUBMIT_BODY)
        runs = {
            "trivial": lambda: run_wrk(trivial_url + "/ping", lua_script(workdir, "trivial"), **wrk),
            "submit": lambda: run_wrk(gateway_url + "/v1/generations", submit, **wrk),
            "poll": lambda: run_wrk(gateway_url, lua_script(workdir, "poll", token=token, paths=[
                f"/v1/jobs/{job_id}" for job_id in spread(job_ids(database_url, key_id), 100)]), **wrk),
        }
        if args.tokenizer_cache:
            counting = dict(gateway_count_tokens="true", model_cache_dir=str(args.tokenizer_cache.resolve()))
            counting_url = servers.enter_context(serving_gateway(args, database_url, workdir, "counting", **counting))
            # Each gateway process loads the tokenizer on its first count (seconds, holding the
            # GIL): let every process do that before the clock runs.
            submit_concurrently(counting_url, token, 4 * args.workers)
            runs["submit, counting tokens"] = lambda: run_wrk(counting_url + "/v1/generations", submit, **wrk)
        if args.cpu:
            shared = {"PostgreSQL": lambda: named_processes("postgres"), "Redis": lambda: named_processes("redis-server")}
            for name, run in list(runs.items()):
                url = trivial_url if name == "trivial" else counting_url if "counting" in name else gateway_url
                server = {"server": lambda url=url: server_processes(url)}
                runs[name] = lambda run=run, groups={**server, **shared}: with_cpu(run, groups)
        for _ in range(args.rounds):
            for name, run in runs.items():
                results[name] = results[name] + run() if name in results else run()
    broker.flushdb()
    print(f"settings: wrk {args.connections} connections, {args.wrk_threads} threads, {wrk['duration_s']} s x "
          f"{args.rounds} rounds each; gunicorn gthread {args.workers} workers x {args.threads} threads; "
          f"PostgreSQL; prompt tokens estimated (GEMMA_JOBS_GATEWAY_COUNT_TOKENS=false, as auto for short "
          f"prompts){', counted in the counting run' if args.tokenizer_cache else ''}; no worker (submitted "
          f"jobs stay queued); cores={os.cpu_count()}")
    if args.cpu:
        for name, result in results.items():
            print(f"cpu       {name:24} ms per request: {result.cpu_line()}")
    baseline = results.pop("trivial")
    print(f"baseline  trivial Flask route  GET /ping          : {baseline.line()}")
    for name, result in results.items():
        route = "POST /v1/generations" if name.startswith("submit") else "GET /v1/jobs/{id}"
        print(f"result    {name:24} {route:22}: {result.line()}")
    for name, result in results.items():
        floor = FLOORS.get(name)
        verdict = f"  (floor {floor}x: {'ok' if result.rps / baseline.rps >= floor else 'MISSED'})" if floor else ""
        print(f"ratio     {name:24} req/s {result.rps / baseline.rps:5.2f}x   "
              f"p99 {result.p99_ms / baseline.p99_ms:5.2f}x of the trivial route's{verdict}")


if __name__ == "__main__":
    main()
