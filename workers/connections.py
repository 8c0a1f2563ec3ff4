"""The database and Redis clients as a worker's processes use them (the worker and its result
writer process, which must not import torch)."""

from __future__ import annotations

import redis

from shared.db import PING_IDLE_AFTER_S, Database
from shared.settings import Settings


def connect_database(settings: Settings) -> Database:
    """Return the database as a worker's processes use it."""
    # A job's claim and end are a few statements each: a ping per checkout was a third more.
    return Database(settings.database_url_or_default, ping_idle_after_s=PING_IDLE_AFTER_S)


def connect_redis(settings: Settings) -> redis.Redis:
    """Return a Redis client as a worker's processes use it."""
    # A timeout, so a half-open connection cannot wedge the worker or its reaper.
    return redis.Redis.from_url(settings.redis_url, socket_connect_timeout=3, socket_timeout=10)
