"""A real gunicorn gateway (one process, 8 threads: 4 may be held, 2 by a key) whose streams are all taken:
polls, submits and health checks are still answered at once, a further stream gets a 503,
and the refusals are counted in /metrics."""

from __future__ import annotations

import time

import pytest
import requests

from tests.e2e.test_operations import metric

pytestmark = pytest.mark.timeout(120)

STREAM = {"Accept": "text/event-stream"}


def test_streams_holding_every_place_leave_the_other_requests_answered(start_stack, tmp_path):
    with start_stack(tmp_path) as stack:  # no worker: the job stays queued, its streams stay open
        base = stack.base_url
        keys = [stack.new_key() for _ in range(3)]  # two hold two places each (a key's share), one is left
        jobs = [requests.post(f"{base}/v1/generations", headers=headers, timeout=10,
                              json={"model": "gemma-3-270m", "prompt": "Hi", "max_new_tokens": 2}).json()
                for headers in keys]
        headers, job = keys[2], jobs[2]
        streams = []
        try:
            for holder, held_job in [*zip(keys[:2], jobs[:2])] * 2:
                events = f"{base}/v1/jobs/{held_job['id']}/events"
                streams.append(requests.get(events, headers={**holder, **STREAM}, stream=True, timeout=10))
                assert streams[-1].status_code == 200
            events = f"{base}/v1/jobs/{job['id']}/events"
            refused = requests.get(events, headers={**headers, **STREAM}, timeout=5)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "busy"
            assert refused.headers["Retry-After"] == "2"

            started = time.monotonic()
            assert requests.get(f"{base}/healthz", timeout=5).status_code == 200
            assert requests.get(f"{base}/v1/jobs/{job['id']}", headers=headers, timeout=5).status_code == 200
            waited = requests.post(f"{base}/v1/generations", headers={**headers, "Prefer": "wait=30"}, timeout=10,
                                   json={"model": "gemma-3-270m", "prompt": "Hi", "max_new_tokens": 2})
            assert waited.status_code == 202 and "Preference-Applied" not in waited.headers
            assert time.monotonic() - started < 5  # none of them waited for a stream to end

            page = requests.get(f"{base}/metrics", timeout=5).text
            assert metric(page, "gemma_jobs_held_requests_refused_total", kind="stream") == 1
            assert metric(page, "gemma_jobs_held_requests_refused_total", kind="wait") == 1
        finally:
            for response in streams:
                response.close()
