"""Helpers for gateway integration tests."""

from __future__ import annotations

from services.domain.keys import create_key
from shared.celery_app import queue_for

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
