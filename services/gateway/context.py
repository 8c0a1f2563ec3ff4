"""Per-process resources of the gateway: database, Redis, Celery producer, registry."""

from __future__ import annotations

from dataclasses import dataclass

import redis
from celery import Celery
from flask import current_app

from services.domain.operations import LiveQueues
from services.domain.token_counter import TokenCounter
from shared.celery_app import make_celery
from shared.db import Database
from shared.registry import ModelRegistry
from shared.settings import Settings
from shared.storage import Storage


@dataclass
class GatewayContext:
    """What every request handler may use; built once per gateway process."""

    settings: Settings
    db: Database
    redis: redis.Redis
    celery: Celery
    registry: ModelRegistry
    token_counter: TokenCounter
    storage: Storage
    live_queues: LiveQueues

    @classmethod
    def create(cls, settings: Settings) -> "GatewayContext":
        """Connect (lazily) to the database and Redis named in the settings."""
        registry = ModelRegistry.load(settings.model_registry)
        return cls(
            settings=settings,
            db=Database(settings.database_url_or_default),
            redis=redis.Redis.from_url(
                settings.redis_url, socket_connect_timeout=3, socket_timeout=10
            ),
            celery=make_celery(settings.redis_url, settings.visibility_timeout_s),
            registry=registry,
            token_counter=TokenCounter(registry, settings.model_cache_path),
            storage=Storage(settings.storage_path),
            live_queues=LiveQueues(settings.worker_dead_after_s),
        )


def gateway() -> GatewayContext:
    """Return the running app's gateway context."""
    return current_app.extensions["gemma_jobs"]
