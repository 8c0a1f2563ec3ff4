"""Limits are exact under concurrency: 50 simultaneous submits against a real gateway
(2 gunicorn processes x 16 threads) on PostgreSQL and on SQLite."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from services.domain.keys import create_key
from shared.db import Database
from tests.processes import start_gateway

BURST = 50


@pytest.fixture()
def gateway_url(database_url, redis_url, redis_client, tmp_path):
    env = {
        "PATH": "/usr/bin:/bin",
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "GEMMA_JOBS_DATA_DIR": str(tmp_path),
        "GEMMA_JOBS_LOG_LEVEL": "warning",
    }
    gateway, base_url = start_gateway(env, tmp_path, workers=2, threads=16)
    yield base_url
    gateway.stop()


def burst(base_url: str, database_url: str, **limits) -> list[requests.Response]:
    db = Database(database_url)
    with db.session_scope() as session:
        _, key = create_key(session, role="user", **limits)
    db.dispose()
    # Stay clear of a minute boundary, where a fixed window would rightly start afresh.
    if time.time() % 60 > 50:
        time.sleep(61 - time.time() % 60)
    body = {"model": "gemma-3-270m", "prompt": "Hello", "max_new_tokens": 97}  # reserves 3 + 97
    headers = {"Authorization": f"Bearer {key}"}
    with ThreadPoolExecutor(BURST) as pool:
        return list(pool.map(
            lambda _: requests.post(f"{base_url}/v1/generations", json=body, headers=headers, timeout=60),
            range(BURST),
        ))


def check(responses: list[requests.Response], accepted: int, policy: str) -> None:
    statuses = sorted(response.status_code for response in responses)
    assert statuses == [202] * accepted + [429] * (BURST - accepted)
    for response in responses:
        assert response.headers["RateLimit-Policy"] == policy
        if response.status_code == 429:
            assert response.json()["error"]["code"] == "rate_limited"
            assert int(response.headers["Retry-After"]) >= 1
            assert ";r=0;" in response.headers["RateLimit"]
    # Every admitted request saw a different state: no two were decided on the same count.
    left = [re.search(r";r=(\d+)", r.headers["RateLimit"]).group(1) for r in responses if r.status_code == 202]
    assert len(set(left)) == accepted and "0" in left


def test_fifty_submits_against_ten_per_minute(gateway_url, database_url):
    check(burst(gateway_url, database_url, rpm=10), 10, '"requests";q=10;w=60')


def test_fifty_submits_against_seven_concurrent_jobs(gateway_url, database_url):
    check(burst(gateway_url, database_url, max_concurrent=7), 7, '"concurrent";q=7')


def test_fifty_submits_against_a_thousand_tokens_per_minute(gateway_url, database_url):
    check(burst(gateway_url, database_url, tpm=1000), 10, '"tokens";q=1000;w=60')
