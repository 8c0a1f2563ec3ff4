"""Database.first's own connections on PostgreSQL: kept and reused, pinged when idle, dropped when broken."""

from __future__ import annotations

import socket
import time

import psycopg
import pytest
from sqlalchemy import func, literal_column, select
from sqlalchemy.exc import OperationalError

from shared.db import CONNECT_TIMEOUT_S, Database
from shared.direct_connections import forget_inherited

BACKEND_PID = select(func.pg_backend_pid().label("pid"))
SYNCHRONOUS_COMMIT = select(func.current_setting("synchronous_commit").label("setting"))
IN_TRANSACTION = select((func.now() != func.statement_timestamp()).label("open"))


@pytest.fixture()
def postgres_url(postgres_admin_url):
    from tests.conftest import fresh_postgres_database

    url, drop = fresh_postgres_database(postgres_admin_url)
    yield url
    drop()


def terminate(admin_url: str, pid: int) -> None:
    with psycopg.connect(admin_url, autocommit=True) as connection:
        connection.execute("SELECT pg_terminate_backend(%s)", (pid,))


def test_a_connection_is_kept_in_autocommit_and_reused(postgres_url):
    db = Database(postgres_url, ping_idle_after_s=60)
    try:
        first, second = (db.first(BACKEND_PID, {}).pid for _ in range(2))
        assert first == second
        assert db.first(IN_TRANSACTION, {}).open is False  # each statement its own transaction
        assert db.first(SYNCHRONOUS_COMMIT, {}).setting == "on"
        lazy = db.first(SYNCHRONOUS_COMMIT, {}, durable=False)
        assert lazy.setting == "off" and db.first(BACKEND_PID, {}, durable=False).pid != first
    finally:
        db.dispose()


def test_an_idle_connection_the_server_dropped_is_replaced_unseen(postgres_url, postgres_admin_url):
    db = Database(postgres_url, ping_idle_after_s=0)  # ping at every use
    try:
        pid = db.first(BACKEND_PID, {}).pid
        terminate(postgres_admin_url, pid)
        assert db.first(BACKEND_PID, {}).pid != pid
    finally:
        db.dispose()


def test_a_connection_broken_in_use_fails_that_call_only(postgres_url, postgres_admin_url):
    db = Database(postgres_url, ping_idle_after_s=60)  # no ping: the dead connection is used
    try:
        pid = db.first(BACKEND_PID, {}).pid
        terminate(postgres_admin_url, pid)
        with pytest.raises(OperationalError):
            db.first(select(literal_column("1").label("one")), {})
        assert db.first(BACKEND_PID, {}).pid != pid
    finally:
        db.dispose()


def test_a_forked_process_opens_its_own_connections(postgres_url):
    db = Database(postgres_url, ping_idle_after_s=60)
    try:
        parent = db.first(BACKEND_PID, {}).pid
        inherited = db._direct._idle[0][0]
        forget_inherited()  # what runs in a child after fork
        assert db.first(BACKEND_PID, {}).pid != parent
        assert not inherited.closed  # the parent's connection is left to the parent
        inherited.close()
    finally:
        db.dispose()


def test_a_new_connection_gives_up_after_the_connect_timeout(postgres_url):
    """A host that is gone (SYNs unanswered) held each new connection for ~127 s of retries."""
    with socket.create_server(("127.0.0.1", 0)) as silent:  # takes connections, never answers
        port = silent.getsockname()[1]
        db = Database(f"postgresql://gemma@127.0.0.1:{port}/gemma_jobs?sslmode=disable")
        try:
            started = time.monotonic()
            with pytest.raises(OperationalError):
                db.first(select(literal_column("1").label("one")), {})  # a direct connection
            assert time.monotonic() - started < CONNECT_TIMEOUT_S + 2
        finally:
            db.dispose()
    # A connect_timeout the URL gives wins.
    assert Database(f"{postgres_url}?connect_timeout=11").engine.url.query["connect_timeout"] == "11"
