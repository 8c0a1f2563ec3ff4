"""Helpers for gateway integration tests."""

from __future__ import annotations

import threading
from contextlib import contextmanager

from datetime import timedelta

import psycopg
from sqlalchemy import update

from services.domain.keys import create_key
from shared import job_store
from shared.celery_app import queue_for
from shared.db import Database
from shared.ids import new_id
from shared.models import Job, utcnow

QUEUE = queue_for("generation", "gemma-3-270m")


def make_key(app, role: str = "user") -> str:
    with app.extensions["gemma_jobs"].db.session_scope() as session:
        _, plaintext = create_key(session, role=role)
    return plaintext


def submit(client, auth, **overrides):
    body = {"model": "gemma-3-270m", "prompt": "Hello", "max_new_tokens": 4, **overrides}
    return client.post("/v1/generations", json=body, headers=auth)


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    error = response.get_json()["error"]
    assert error["code"] == code
    assert error["message"]
    return error


RESULT = {"text": "hi", "finish_reason": "stop", "token_ids": [5]}
USAGE = {"prompt_tokens": 3, "completion_tokens": 1, "gpu_seconds": 0.1}


def queued_job(db: Database, **values) -> str:
    with db.session_scope() as session:
        key, _ = create_key(session, role="user")
        job = Job(**{
            "id": new_id("job"), "owner_key_id": key.id, "kind": "generation", "model": "gemma-3-270m",
            "queue": "generation.gemma-3-270m", "status": "queued", "params": {"prompt": "x"},
            "enqueued_at": utcnow(), **values,
        })
        session.add(job)
    return job.id


def claim(db, job_id, worker, lease_s=30, max_attempts=3):
    return job_store.claim(db, job_id, worker, device="cpu", lease_s=lease_s, max_attempts=max_attempts)


def lapse_lease(db, job_id):
    with db.session_scope() as session:
        session.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - timedelta(seconds=1)))


def answers_at_once(send, times: int) -> list[tuple[int, str | None]]:
    """Call `send` (a request) from `times` threads at once; return each answer's status and job id."""
    answers = []

    def run() -> None:
        response = send()
        answers.append((response.status_code, response.get_json().get("id")))

    threads = [threading.Thread(target=run) for _ in range(times)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


def allow_connections(postgres_admin_url: str, database_url: str, allowed: bool) -> None:
    """Let a PostgreSQL test database take connections again, or refuse new ones and end its open
    ones (a database going down)."""
    name = database_url.rsplit("/", 1)[1]
    with psycopg.connect(postgres_admin_url, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(allowed).lower()}')
        if not allowed:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
                          "AND pid <> pg_backend_pid()", (name,))


@contextmanager
def cut_off(database_url: str, postgres_admin_url: str):
    """Take a PostgreSQL test database away until the block ends."""
    allow_connections(postgres_admin_url, database_url, False)
    try:
        yield
    finally:
        allow_connections(postgres_admin_url, database_url, True)


@contextmanager
def down_for(seconds: float, database_url: str, postgres_admin_url: str):
    """Take a PostgreSQL test database away, and give it back `seconds` later while the block runs."""
    allow_connections(postgres_admin_url, database_url, False)
    back = threading.Timer(seconds, allow_connections, args=(postgres_admin_url, database_url, True))
    back.start()
    try:
        yield
    finally:
        back.join()
        allow_connections(postgres_admin_url, database_url, True)
