"""SQLAlchemy models: the tables behind keys, jobs, events and usage."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from shared import clock

# Stable constraint names, so migrations can name what they alter on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """Return the current time, timezone-aware in UTC, on the database server's clock (shared/clock.py)."""
    return clock.now()


class UTCDateTime(TypeDecorator):
    """A timestamp stored naive in UTC and always read back timezone-aware."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(timezone.utc).replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        return value.replace(tzinfo=timezone.utc) if value is not None else None


class Base(DeclarativeBase):
    """Declarative base with the project's naming convention."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON}


class ApiKey(Base):
    """An API key: only its SHA-256 hash is stored."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # The first characters of the key, so an admin can tell keys apart; not enough to use.
    key_prefix: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(200), default="")
    role: Mapped[str] = mapped_column(String(16))
    rpm: Mapped[int | None] = mapped_column(Integer)
    tpm: Mapped[int | None] = mapped_column(Integer)
    max_concurrent: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class Job(Base):
    """A generation or fine-tuning job; the row is the source of truth for its state."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner_key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    kind: Mapped[str] = mapped_column(String(16))
    model: Mapped[str] = mapped_column(String(200))
    queue: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16))
    params: Mapped[dict[str, Any]]
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    result: Mapped[dict[str, Any] | None]
    error: Mapped[dict[str, Any] | None]
    progress: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    # Number of times a worker has claimed the job; also the fencing token of its writes.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Claims that ended in a hand-back (worker shutting down): not counted against max_attempts.
    hand_backs: Mapped[int] = mapped_column(Integer, server_default="0")
    worker_id: Mapped[str | None] = mapped_column(String(200))
    worker_device: Mapped[str | None] = mapped_column(String(64))
    heartbeat_at: Mapped[datetime | None]
    lease_expires_at: Mapped[datetime | None]
    # When its message was last published; the reconciler republishes lost messages.
    enqueued_at: Mapped[datetime | None]
    # Past this while still queued (ttl_s), the job fails with `expired` without running.
    expires_at: Mapped[datetime | None]
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    # SHA-256 of the request body, to tell a retried submit from a different one.
    request_hash: Mapped[str | None] = mapped_column(String(64))
    # Tokens reserved against the key's per-minute budget at submit, in that minute's
    # window; settled to the real count (and set to 0) when the job ends.
    reserved_tokens: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    rate_window_start: Mapped[datetime | None]
    # The adapter a fine-tune creates, or the adapter a generation runs with.
    adapter_id: Mapped[str | None] = mapped_column(String(80))

    __table_args__ = (
        # Newest-first listing of one key's jobs (ids are time-ordered).
        Index("ix_jobs_owner_key_id_id", "owner_key_id", "id"),
        # One key's jobs in one status: its active jobs (concurrency limit), filtered listing.
        Index("ix_jobs_owner_key_id_status_id", "owner_key_id", "status", "id"),
        # Queue position: queued jobs of one queue, in order.
        Index("ix_jobs_queue_status_id", "queue", "status", "id"),
        UniqueConstraint("owner_key_id", "idempotency_key", name="uq_jobs_owner_idempotency"),
        # The reaper's scans: lapsed leases, expired queued jobs, unpublished messages.
        Index("ix_jobs_status_lease_expires_at", "status", "lease_expires_at"),
        Index("ix_jobs_status_expires_at", "status", "expires_at"),
        Index("ix_jobs_status_enqueued_at", "status", "enqueued_at"),
    )


class RateLimitWindow(Base):
    """Requests and tokens one key used in one fixed one-minute window."""

    __tablename__ = "rate_limit_windows"

    key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), primary_key=True)
    window_start: Mapped[datetime] = mapped_column(primary_key=True)
    requests: Mapped[int] = mapped_column(Integer, default=0)
    tokens: Mapped[int] = mapped_column(Integer, default=0)


class JobEvent(Base):
    """One thing that happened to a job: a state change, a log line, progress."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    type: Mapped[str] = mapped_column(String(32))
    data: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class UsageRecord(Base):
    """What one job cost; at most one row per job, so a job is never charged twice."""

    __tablename__ = "usage_records"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), unique=True)
    key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), index=True)
    model: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16))
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    train_tokens: Mapped[int] = mapped_column(Integer, default=0)
    gpu_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class TrainingFile(Base):
    """An uploaded JSONL file of training rows; stored under a server-made name."""

    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner_key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    purpose: Mapped[str] = mapped_column(String(32))
    # The client's name, shown back only; the stored file is named by `id`.
    filename: Mapped[str] = mapped_column(String(255))
    bytes: Mapped[int] = mapped_column(BigInteger)
    rows: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    # Relative to the storage directory, which workers on other machines mount too.
    path: Mapped[str] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (Index("ix_files_owner_key_id_id", "owner_key_id", "id"),)


class Adapter(Base):
    """A LoRA adapter a fine-tune produced; usable as `model` by its owner key."""

    __tablename__ = "adapters"

    id: Mapped[str] = mapped_column(String(80), primary_key=True)
    owner_key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    base_model: Mapped[str] = mapped_column(String(200))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), unique=True)
    # Relative to the storage directory: adapter_model.safetensors + adapter_config.json.
    path: Mapped[str] = mapped_column(String(500))
    hyperparameters: Mapped[dict[str, Any]]
    metrics: Mapped[dict[str, Any]]
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Set by DELETE /v1/models/{id}; the row stays so jobs that used it can say what it was.
    deleted_at: Mapped[datetime | None]

    __table_args__ = (Index("ix_adapters_owner_key_id_id", "owner_key_id", "id"),)


class WorkerRecord(Base):
    """A worker process as it last reported itself: identity, device, what it serves, liveness."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    host: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    device: Mapped[str] = mapped_column(String(64))
    gpu_name: Mapped[str | None] = mapped_column(String(200))
    gpu_memory_mb: Mapped[int | None] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(16))
    # Model ids it serves (loaded, for generation) and the queues it consumes.
    models: Mapped[list[str]] = mapped_column(JSON)
    queues: Mapped[list[str]] = mapped_column(JSON)
    # starting -> ready -> draining (SIGTERM) -> stopped; a dead worker just stops heartbeating.
    state: Mapped[str] = mapped_column(String(16))
    jobs_in_flight: Mapped[int] = mapped_column(Integer, default=0)
    jobs_done: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    stopped_at: Mapped[datetime | None]


class JobOutcomeCount(Base):
    """How many jobs ended in each status, per kind and model: the counters behind /metrics.

    Added to in the same transaction as the job's terminal update, so each end counts once.
    Spread over shards (by job id; a worker's results by worker) so that concurrent job ends
    rarely wait on one row.
    """

    __tablename__ = "job_outcome_counts"

    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), primary_key=True)
    shard: Mapped[int] = mapped_column(Integer, primary_key=True)
    jobs: Mapped[int] = mapped_column(BigInteger, default=0)
