"""Typed settings, read once from the environment."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

ENV_PREFIX = "GEMMA_JOBS_"
# Threads of a gateway process that held requests (streams, waits) never take by default.
HELD_REQUESTS_SPARE_THREADS = 4


class SettingsError(RuntimeError):
    """A setting read from the environment has a bad value."""


class Settings(BaseSettings):
    """Everything gemma-jobs reads from the environment, with its defaults."""

    # No inf or nan: every float here is a size or a duration, and timedelta() refuses inf later.
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", populate_by_name=True,
                                      allow_inf_nan=False)

    data_dir: Path = Path("./var")
    # Unset means "SQLite under data_dir"; see `database_url_or_default`.
    database_url: str | None = Field(default=None, validation_alias=AliasChoices("DATABASE_URL"))
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0", validation_alias=AliasChoices("REDIS_URL")
    )
    # A JSON file of extra model entries; the built-in gemma-3-270m is always present.
    model_registry: Path | None = None
    # Converted model weights (safetensors) live here; unset means data_dir/models.
    model_cache_dir: Path | None = None
    # Uploaded training files and trained adapters; unset means data_dir. With workers on
    # several machines this must be one shared volume mounted at the same path everywhere.
    storage_dir: Path | None = None

    max_wait_s: float = Field(default=60.0, gt=0, le=600)
    # Requests one gateway process holds open at once (event streams, `Prefer: wait`): past it a
    # wait is skipped and a stream refused with a 503. Unset: the process's threads less four,
    # so that polls, submits and health checks find a thread (the gateway warns of a cap that
    # leaves none).
    max_held_requests: int | None = Field(default=None, ge=1)
    # Of those, what one API key may hold: unset, half the process's cap (at least one), so one
    # key's streams cannot lock every other key out of streaming and `Prefer: wait`.
    max_held_requests_per_key: int | None = Field(default=None, ge=1)
    # Threads of each gateway process; `gemma-jobs gateway --threads` sets it for its processes.
    gateway_threads: int = Field(default=16, ge=1, le=1024)
    max_new_tokens: int = Field(default=2048, ge=1, le=32768)
    default_max_new_tokens: int = Field(default=256, ge=1)
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    max_messages: int = Field(default=256, ge=1)
    max_prompt_chars: int = Field(default=200_000, ge=1)

    # Fine-tuning: upload limits, the training run's time limit, and how many adapters a
    # worker keeps loaded beside one copy of each base model.
    max_file_bytes: int = Field(default=50 * 1024 * 1024, ge=1024)
    max_file_rows: int = Field(default=100_000, ge=1)
    # What one key may keep uploaded at once: the storage volume is every tenant's.
    max_files_per_key: int = Field(default=1000, ge=1)
    max_file_storage_per_key_bytes: int = Field(default=5 * 1024**3, ge=1024)
    max_train_steps: int = Field(default=100_000, ge=1)  # micro-batches (forward and backward passes) a run may take
    # batch_size x max_seq_length of one training micro-batch: its activations and full-vocabulary
    # logits take ~6 MB a token on a CPU (float32), so what fits is the workers' memory's call.
    max_train_batch_tokens: int = Field(default=4096, ge=16)
    fine_tune_timeout_s: float = Field(default=24 * 3600.0, gt=0)
    adapter_cache_size: int = Field(default=8, ge=1)

    # Generation jobs a worker runs batched together (`gemma-jobs worker --concurrency`).
    worker_concurrency: int = Field(default=1, ge=1, le=64)
    # "continuous": jobs join and leave the batch between decode steps. "static" admits only
    # into an empty batch; it exists as the baseline bench/batching.py measures against.
    batching: Literal["continuous", "static"] = "continuous"
    # Model dtype on CPU workers. "auto": bf16, except fp32 for batching workers on CPUs without
    # bf16 dot products (AVX2 only: there fp32 batches run faster; see docs/benchmarks.md).
    cpu_dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    # Greedy rows of float32 CPU batches: screen the output layer in bf16 and compute only the
    # tokens that could win exactly (workers/greedy_screen.py); same tokens, faster steps.
    # "auto": on where the CPU has bf16 dot-product instructions (AVX512-BF16 or AMX).
    greedy_screen: Literal["auto", "on", "off"] = "auto"
    # Torch threads of a CPU worker. "auto": the cores split evenly among the live CPU workers
    # on this host (re-checked at each heartbeat), or OMP_NUM_THREADS when that is set.
    cpu_threads: Annotated[int, Field(ge=1, le=1024)] | Literal["auto"] = "auto"

    # Count prompt tokens at submit with the model's tokenizer.json, which costs ~100 MB per
    # gateway process per model. "auto": only prompts that might not fit the context (the 422
    # stays exact; other prompts reserve an estimate the worker settles); true: every prompt
    # (exact reservations too); false: never (estimate, and the worker checks the context).
    gateway_count_tokens: bool | Literal["auto"] = "auto"

    # Per-key limits used when a key sets none; unset means unlimited.
    default_rpm: int | None = Field(default=None, ge=1)
    default_tpm: int | None = Field(default=None, ge=1)
    default_max_concurrent: int | None = Field(default=None, ge=1)

    # Reliability: a running job holds a lease it renews; a lapsed lease means its worker died.
    lease_s: float = Field(default=30.0, ge=1, le=3600)
    # How often a running job's side thread checks for cancel/lease loss (and the bound on
    # how long a cancel takes to stop a generation).
    control_poll_s: float = Field(default=1.0, gt=0, le=60)
    reaper_interval_s: float = Field(default=5.0, gt=0, le=600)
    # Workers report themselves this often; one silent for worker_dead_after_s is shown dead.
    worker_heartbeat_s: float = Field(default=5.0, gt=0, le=600)
    worker_dead_after_s: float = Field(default=30.0, gt=0)
    max_attempts: int = Field(default=3, ge=1, le=100)
    # A queued job whose message is not in Redis this long after publishing is republished.
    republish_after_s: float = Field(default=30.0, gt=0)
    default_timeout_s: float = Field(default=600.0, gt=0)
    max_timeout_s: float = Field(default=3600.0, gt=0)
    max_ttl_s: float = Field(default=7 * 86400.0, gt=0)
    # On SIGTERM a worker lets its running job go on this long, then hands it back.
    shutdown_grace_s: float = Field(default=30.0, ge=0)
    # Redis redelivers unacknowledged messages after this; the lease, not this, decides
    # when a job is lost, so it only needs to exceed the longest job (12 h by default).
    visibility_timeout_s: int = Field(default=12 * 3600, ge=1)

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "console"] = "json"

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str | None) -> str | None:
        """A PostgreSQL (psycopg 3) or SQLite URL: any other failed later, with a traceback."""
        if value is None:
            return value
        try:
            url = make_url(value)
        except (ArgumentError, ValueError) as exc:
            raise ValueError(f"not a database URL ({exc}); e.g. postgresql://user@host:5432/db") from None
        backend, _, driver = url.drivername.partition("+")
        if backend not in ("postgresql", "postgres", "sqlite") or driver not in ("", "psycopg", "pysqlite"):
            raise ValueError(f"{backend}{'+' + driver if driver else ''} is not supported: use postgresql://… "
                             "(driven by psycopg 3) or sqlite:///path/to/file.db")
        if url.port is not None and not 0 < url.port < 65536:  # the driver refused it at the first connection
            raise ValueError(f"port {url.port} is out of range (1-65535); e.g. postgresql://user@host:5432/db")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        """A redis:// or rediss:// URL with a port in range, if any: both Celery's transport and
        the Redis client must take it (Celery's has no unix:// sockets)."""
        if value is None:
            return value
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - parsing it is the check: not a number, or out of range, raises
        except ValueError as exc:
            raise ValueError(f"not a Redis URL ({exc}); e.g. redis://host:6379/0") from None
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError("must be a redis:// or rediss:// URL, e.g. redis://host:6379/0")
        return value

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> "Settings":
        """Refuse pairs that each pass alone but break together (every submit a 422, say)."""
        pairs = [
            ("default_max_new_tokens", "max_new_tokens", "at most"),
            ("default_timeout_s", "max_timeout_s", "at most"),
            ("worker_heartbeat_s", "worker_dead_after_s", "below"),
        ]
        for small, large, relation in pairs:
            value, limit = getattr(self, small), getattr(self, large)
            if value > limit or (relation == "below" and value == limit):
                raise ValueError(f"{env_name(small)} ({value:g}) must be {relation} {env_name(large)} ({limit:g})")
        return self

    @property
    def database_url_or_default(self) -> str:
        """Return the database URL, defaulting to a SQLite file under the data dir."""
        if self.database_url:
            return self.database_url
        # Escaped: a data dir with "?" or "%20" in its name put the file elsewhere.
        path = str((self.data_dir / "gemma-jobs.db").resolve())
        # Where releases before the escaping put it: a start that silently took up an empty
        # file beside it would leave every job and key behind.
        earlier = make_url(f"sqlite:///{path}").database
        if earlier != path and Path(earlier).exists() and not Path(path).exists():
            raise SettingsError(
                f"the database is at {earlier}, where releases before this one put it for "
                f"GEMMA_JOBS_DATA_DIR={self.data_dir}: move it (with its -wal and -shm files) to {path}, "
                f"or set DATABASE_URL to {URL.create('sqlite', database=earlier).render_as_string()}")
        return URL.create("sqlite", database=path).render_as_string(hide_password=False)

    @property
    def held_requests_cap(self) -> int:
        """Return how many requests a gateway process may hold open at once."""
        return self.max_held_requests or max(1, self.gateway_threads - HELD_REQUESTS_SPARE_THREADS)

    @property
    def held_requests_per_key(self) -> int:
        """Return how many of a gateway process's held requests one API key may take."""
        return self.max_held_requests_per_key or max(1, self.held_requests_cap // 2)

    @property
    def model_cache_path(self) -> Path:
        """Return the folder that holds converted model weights."""
        return (self.model_cache_dir or self.data_dir / "models").resolve()

    @property
    def storage_path(self) -> Path:
        """Return the folder that holds uploaded files and trained adapters."""
        return (self.storage_dir or self.data_dir).resolve()


def env_name(field: str) -> str:
    """Return the environment variable that sets a settings field."""
    alias = Settings.model_fields[field].validation_alias
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    return ENV_PREFIX + field.upper()


def validation_message(error: dict) -> str:
    """Return a pydantic error's message without the "Value error, " of our own validators."""
    return error["msg"].removeprefix("Value error, ")


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment, naming the variable on a bad value."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            if not error["loc"]:  # a check of several settings: its message names them
                problems.append(validation_message(error))
                continue
            field = str(error["loc"][0])
            name = env_name(field) if field in Settings.model_fields else field
            problems.append(f"{name}: {validation_message(error)}")
        raise SettingsError("invalid settings: " + "; ".join(problems)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Return the process-wide settings, read once."""
    return load_settings()
