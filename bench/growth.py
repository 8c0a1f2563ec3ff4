"""Growth: submit, poll and list p99 with 1,000,000 jobs already in the PostgreSQL table vs an empty one.

    .venv/bin/python bench/growth.py --rows 1000000

Two fresh PostgreSQL databases (dropped at the end), each with its own `gemma-jobs gateway`
and one measured key without limits, and Redis at --redis-url (flushed before and after).
SQL fills one table with --rows jobs over 1,000 other keys and the measured key (every 10th
job, so 100,000 of a million), created over the past 30 days: the newest --queued are queued
(a third of them in a second model's queue), 16 running, the rest succeeded (2% failed, 1%
cancelled), each finished job with its usage record; then VACUUM ANALYZE, as autovacuum
would, and a CHECKPOINT. The other table stays empty. Then wrk measures on both tables, in
alternating rounds, `POST /v1/generations` (no worker: jobs stay queued), `GET /v1/jobs/{id}` rotating over
100 of the jobs just submitted (queued, so each poll works out its queue position and
`waiting_for`), and `GET /v1/jobs?limit=20` (the newest page: those same queued jobs). Prints
p99 of each operation on both tables and the ratio.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import redis

# Sibling scripts (bench/ is on sys.path when a script in it runs).
from bench_processes import connect, fresh_postgres, new_key
from gateway_http import SUBMIT_BODY, WrkResult, job_ids, lua_script, require_wrk, run_wrk, serving_gateway, spread

FLOOR = 1.2
FILL_KEYS = 1000

# The time part of an id as shared.ids writes it (48-bit milliseconds, Crockford base32):
# filled ids sort by creation time like real ones, and before anything the benchmark submits.
BASE32_TIME_FUNCTION = (
    "CREATE FUNCTION pg_temp.base32_time(value bigint) RETURNS text LANGUAGE sql IMMUTABLE AS $$ SELECT "
    + " || ".join(f"substr('0123456789abcdefghjkmnpqrstvwxyz', ((value >> {5 * k}) & 31)::int + 1, 1)"
                  for k in range(9, -1, -1))
    + " $$"
)

FILL_KEYS_SQL = """
INSERT INTO api_keys (id, key_hash, key_prefix, name, role, created_at)
SELECT 'key_fill' || k, md5('hash' || k) || md5('more' || k), 'gj_fill', 'fill', 'user', now() - interval '60 days'
FROM generate_series(1, %(keys)s) AS k
"""

# Row i of n was created at (30 days ago + i/n of 30 days); the last `queued` rows are still
# queued, the 16 before them running, the others finished a few seconds after they started.
FILL_JOBS_SQL = """
INSERT INTO jobs (id, owner_key_id, kind, model, queue, status, params, result, error, created_at, started_at,
                  finished_at, attempts, worker_id, worker_device, heartbeat_at, lease_expires_at, enqueued_at,
                  reserved_tokens)
SELECT 'job_' || pg_temp.base32_time((extract(epoch FROM created) * 1000)::bigint) || substr(md5(i::text), 1, 16),
       CASE WHEN i %% 10 = 0 THEN %(key_id)s ELSE 'key_fill' || (i %% %(keys)s + 1) END,
       'generation', model, 'generation.' || model, status,
       json_build_object('prompt', 'Summarise ticket ' || i, 'max_new_tokens', 32, 'temperature', 0.7,
                         'timeout_s', 600),
       CASE WHEN status = 'succeeded' THEN json_build_object(
         'text', repeat('generated text ', 8), 'finish_reason', 'length',
         'token_ids', json_build_array(i %% 7, 105, 2364, 496, 1440, 563, 9, 506, 236761, 107, 42, 77, 8, 9, 10, 11))
       END,
       CASE WHEN status = 'failed' THEN json_build_object('code', 'timeout', 'message', 'ran past timeout_s') END,
       created,
       CASE WHEN status <> 'queued' THEN created + interval '2 seconds' END,
       CASE WHEN status NOT IN ('queued', 'running') THEN created + interval '5 seconds' END,
       CASE WHEN status = 'queued' THEN 0 ELSE 1 END,
       CASE WHEN status <> 'queued' THEN 'fill-worker-' || (i %% 8) END,
       CASE WHEN status <> 'queued' THEN 'cpu' END,
       CASE WHEN status = 'running' THEN now() END,
       CASE WHEN status = 'running' THEN now() + interval '30 seconds' END,
       created,
       0
FROM (
  SELECT i,
         now() - interval '30 days' + (interval '30 days' - interval '2 minutes') * i / %(rows)s AS created,
         CASE WHEN i > %(rows)s - %(queued)s THEN 'queued'
              WHEN i > %(rows)s - %(queued)s - 16 THEN 'running'
              WHEN i %% 50 = 0 THEN 'failed'
              WHEN i %% 100 = 1 THEN 'cancelled'
              ELSE 'succeeded' END AS status,
         CASE WHEN i > %(rows)s - %(queued)s AND i %% 3 = 0 THEN 'gemma-3-1b' ELSE 'gemma-3-270m' END AS model
  FROM generate_series(1, %(rows)s) AS i
) AS filled
"""

FILL_USAGE_SQL = """
INSERT INTO usage_records (job_id, key_id, model, status, prompt_tokens, completion_tokens, train_tokens,
                           gpu_seconds, created_at)
SELECT id, owner_key_id, model, status, 12, 32, 0, 0.9, finished_at FROM jobs WHERE finished_at IS NOT NULL
"""


def fill(database_url: str, key_id: str, rows: int, queued: int) -> float:
    """Fill the jobs table with SQL; return the seconds it took."""
    started = time.perf_counter()
    params = {"keys": FILL_KEYS, "key_id": key_id, "rows": rows, "queued": queued}
    with connect(database_url, autocommit=True) as connection:
        connection.execute(BASE32_TIME_FUNCTION)
        with connection.transaction():
            connection.execute(FILL_KEYS_SQL, params)
            connection.execute(FILL_JOBS_SQL, params)
            connection.execute(FILL_USAGE_SQL)
        connection.execute("VACUUM ANALYZE")
        # Write the fill's dirty pages out now, not during the measured commits.
        connection.execute("CHECKPOINT")
    return time.perf_counter() - started


OPERATIONS = {"submit": "POST /v1/generations", "poll": "GET /v1/jobs/{id}", "list": "GET /v1/jobs?limit=20"}


class Table:
    """One database, its measured key and its gateway; `measure` runs one operation on it."""

    def __init__(self, name: str, database_url: str, base_url: str, key: tuple[str, str], args, workdir: Path):
        self.name, self.database_url, self.base_url = name, database_url, base_url
        self.key_id, self.token = key
        self.wrk = dict(connections=args.connections, threads=args.wrk_threads,
                        duration_s=max(1, args.duration // args.rounds))
        self.workdir = workdir
        # Ids are time-ordered: the jobs the submit run makes come after every id there now.
        with connect(database_url) as connection:
            self.before_submit = connection.execute("SELECT coalesce(max(id), '') FROM jobs").fetchone()[0]

    def measure(self, operation: str) -> WrkResult:
        """Run wrk on one operation: submit first, as poll and list read the jobs it made."""
        name = f"{operation}-{self.name}"
        if operation == "submit":
            script = lua_script(self.workdir, name, token=self.token, body=SUBMIT_BODY)
            return run_wrk(self.base_url + "/v1/generations", script, **self.wrk)
        if operation == "poll":
            submitted = job_ids(self.database_url, self.key_id, self.before_submit)
            paths = [f"/v1/jobs/{job_id}" for job_id in spread(submitted, 100)]
            return run_wrk(self.base_url, lua_script(self.workdir, name, token=self.token, paths=paths), **self.wrk)
        listing = lua_script(self.workdir, name, token=self.token)
        return run_wrk(self.base_url + "/v1/jobs?limit=20", listing, **self.wrk)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="jobs filled into the full table")
    parser.add_argument("--queued", type=int, default=5000, help="of those, still queued")
    parser.add_argument("--duration", type=int, default=20, help="seconds of wrk per operation and table")
    parser.add_argument("--rounds", type=int, default=4, help="split them over this many alternating rounds")
    # Two connections keep the gateway busy without queueing: p99 is then the request's own
    # latency, not the wait behind a saturated server (which only says requests/s again).
    parser.add_argument("--connections", type=int, default=2)
    parser.add_argument("--wrk-threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="gunicorn worker processes (gateway default)")
    parser.add_argument("--threads", type=int, default=16, help="threads per process (gateway default)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    args = parser.parse_args()
    require_wrk()
    broker = redis.Redis.from_url(args.redis_url)
    broker.flushdb()
    results: dict[str, dict[str, WrkResult]] = {"empty": {}, "full": {}}
    with (tempfile.TemporaryDirectory() as folder, fresh_postgres() as empty_url, fresh_postgres() as full_url,
          serving_gateway(args, empty_url, Path(folder), "gateway-empty") as empty_base,
          serving_gateway(args, full_url, Path(folder), "gateway-full") as full_base):
        keys = {"empty": new_key(empty_url), "full": new_key(full_url)}
        fill_s = fill(full_url, keys["full"][0], args.rows, args.queued)
        tables = [Table("empty", empty_url, empty_base, keys["empty"], args, Path(folder)),
                  Table("full", full_url, full_base, keys["full"], args, Path(folder))]
        # Each operation on both tables in alternating rounds (empty, full, full, empty, ...):
        # the machine's other load drifts over minutes, and should weigh on both sides alike.
        for operation in OPERATIONS:
            for round_ in range(args.rounds):
                for table in tables if round_ % 2 == 0 else tables[::-1]:
                    result = table.measure(operation)
                    so_far = results[table.name].get(operation)
                    results[table.name][operation] = so_far + result if so_far else result
    broker.flushdb()
    print(f"settings: wrk {args.connections} connections, {args.wrk_threads} threads, {args.duration // args.rounds} s "
          f"x {args.rounds} alternating rounds per operation and table; "
          f"one gateway per table, gunicorn gthread {args.workers} workers x {args.threads} threads; PostgreSQL; "
          f"prompt tokens estimated; full table: {args.rows:,} jobs ({args.rows // 10:,} of the measured key's, "
          f"{args.queued:,} queued), filled in {fill_s:.0f} s incl. VACUUM ANALYZE; cores={os.cpu_count()}")
    for name, route in OPERATIONS.items():
        print(f"baseline  {name:6} {route:22} empty table   : {results['empty'][name].line()}")
        print(f"result    {name:6} {route:22} {args.rows:>9,} jobs: {results['full'][name].line()}")
    for name in OPERATIONS:
        ratio = results["full"][name].p99_ms / results["empty"][name].p99_ms
        print(f"ratio     {name:6} p99 {ratio:5.2f}x of the empty table's  (floor {FLOOR}x: "
              f"{'ok' if ratio <= FLOOR else 'MISSED'})")


if __name__ == "__main__":
    main()
