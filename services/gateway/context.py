"""Per-process resources of the gateway: database, Redis, job publisher, grouped submits and polls, registry,
key cache, the cap on held requests."""

from __future__ import annotations

from dataclasses import dataclass

import redis
from flask import current_app

from services.domain.grouped_calls import GroupedCalls
from services.domain.jobs import read_polled_rows, record_generations
from services.domain.keys import KeyCache, find_key
from services.domain.operations import LiveQueues
from services.domain.queue_positions import QueuePositions
from services.domain.token_counter import TokenCounter
from services.gateway.held_requests import HeldRequests
from shared.db import PING_IDLE_AFTER_S, Database
from shared.publish import JobPublisher
from shared.registry import ModelRegistry
from shared.settings import Settings
from shared.storage import Storage

# How long a process trusts a key row it read: a key revoked elsewhere works here that much longer.
KEY_CACHE_TTL_S = 5.0
# Polls' reads running at once per process before callers queue into groups: two concurrent polls
# still overlap their round trips, more share reads. Submits group behind one write at a time:
# their commit is what grouping saves most.
POLL_READS_IN_FLIGHT = 2


@dataclass
class GatewayContext:
    """What every request handler may use; built once per gateway process."""

    settings: Settings
    db: Database
    redis: redis.Redis
    publisher: JobPublisher
    keys: KeyCache
    registry: ModelRegistry
    token_counter: TokenCounter
    storage: Storage
    live_queues: LiveQueues
    queue_positions: QueuePositions
    # Submits of keys without limits: their inserts, commits and publishes shared by concurrent requests.
    submits: GroupedCalls
    # Polls' reads shared by concurrent requests (PostgreSQL; None on SQLite, where a read is local).
    poll_reads: GroupedCalls | None
    # Event streams and `Prefer: wait` requests this process holds open, under its cap.
    held: HeldRequests

    @classmethod
    def create(cls, settings: Settings) -> "GatewayContext":
        """Connect (lazily) to the database and Redis named in the settings."""
        registry = ModelRegistry.load(settings.model_registry)
        db = Database(settings.database_url_or_default, ping_idle_after_s=PING_IDLE_AFTER_S)
        client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=3, socket_timeout=10)
        publisher = JobPublisher(client)
        return cls(
            settings=settings,
            db=db,
            redis=client,
            publisher=publisher,
            keys=KeyCache(lambda digest: _find_key(db, digest), KEY_CACHE_TTL_S),
            registry=registry,
            token_counter=TokenCounter(registry, settings.model_cache_path),
            storage=Storage(settings.storage_path),
            live_queues=LiveQueues(settings.worker_dead_after_s),
            queue_positions=QueuePositions(),
            submits=GroupedCalls(lambda jobs: record_generations(db, publisher, jobs)),
            poll_reads=(GroupedCalls(lambda job_ids: read_polled_rows(db, job_ids), POLL_READS_IN_FLIGHT)
                        if db.engine.dialect.name == "postgresql" else None),
            held=HeldRequests(settings.held_requests_cap, settings.held_requests_per_key),
        )


def _find_key(db: Database, digest: str):
    with db.read_connection() as connection:
        return find_key(connection, digest)


def gateway() -> GatewayContext:
    """Return the running app's gateway context."""
    return current_app.extensions["gemma_jobs"]
