"""Autocommit DBAPI connections for single statements on PostgreSQL, kept in a stack per process."""

from __future__ import annotations

import os
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from psycopg.pq import TransactionStatus
from sqlalchemy import Engine

IDLE = TransactionStatus.IDLE  # no transaction open: what a connection in autocommit is between statements

# Every stack of this process, so that a forked child can drop what it inherited.
_STACKS: weakref.WeakSet[DirectConnections] = weakref.WeakSet()


def forget_inherited() -> None:
    """In a forked child: drop the parent's connections (unused and unclosed: they are the parent's)."""
    for stack in list(_STACKS):
        stack._idle = []


# Once at fork rather than a getpid() system call at every statement.
os.register_at_fork(after_in_child=forget_inherited)


class DirectConnections:
    """Connections opened in autocommit and kept that way, lent one at a time to a thread.

    `Database.first` runs one statement per call (a poll, a claim, a finish, a group of submits).
    Through SQLAlchemy's pool that cost ~50 µs of CPU per call here (proxy objects, events, the
    reset on return), and switching a shared connection to autocommit and back ~30 µs more: a
    third of a poll. Here a call pops a connection off a list and pushes it back (each one
    atomic under the GIL); a connection idle longer than `ping_idle_after_s` is pinged first,
    and a broken one is dropped, so a database restart costs at most the calls in flight.
    """

    def __init__(self, engine: Engine, *, options: str | None = None, max_idle: int = 16,
                 ping_idle_after_s: float = 1.0):
        self._dialect = engine.dialect
        self._cargs, self._cparams = self._dialect.create_connect_args(engine.url)
        if options:
            self._cparams["options"] = options
        self._max_idle = max_idle
        self._ping_idle_after_s = ping_idle_after_s
        self._idle: list[tuple[Any, float]] = []
        _STACKS.add(self)

    @contextmanager
    def connection(self) -> Iterator[Any]:
        """Lend a connection for one statement; a connection the statement broke is not kept."""
        connection = self._take()
        try:
            yield connection
        finally:
            self._give_back(connection)

    def _take(self):
        while True:
            try:
                connection, idle_since = self._idle.pop()
            except IndexError:
                return self._connect()
            if connection.closed or connection.broken:
                continue
            if time.monotonic() - idle_since <= self._ping_idle_after_s:
                return connection
            try:
                connection.execute("SELECT 1")  # idle a while: the server may have gone since
            except self._dialect.loaded_dbapi.Error:
                connection.close()
                continue
            return connection

    def _connect(self):
        connection = self._dialect.connect(*self._cargs, **self._cparams)
        connection.autocommit = True
        return connection

    def _give_back(self, connection) -> None:
        healthy = not (connection.closed or connection.broken) and connection.info.transaction_status == IDLE
        if healthy and len(self._idle) < self._max_idle:
            self._idle.append((connection, time.monotonic()))
        else:
            connection.close()

    def dispose(self) -> None:
        """Close the idle connections (those lent out are closed when given back, if over the cap)."""
        idle, self._idle = self._idle, []
        for connection, _ in idle:
            connection.close()
