"""Pydantic schemas of the HTTP API; /openapi.json is generated from them."""

from __future__ import annotations

import math
import unicodedata
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)

from shared.jobs import QUEUE_POSITION_CAP

MAX_STOP_SEQUENCES = 8
MAX_INT32 = 2**31 - 1
MAX_METADATA_KEYS = 16


def _no_nul(value: str) -> str:
    """Refuse NUL: PostgreSQL cannot store it in text or JSON (it was a 500 there)."""
    if "\x00" in value:
        raise ValueError("must not contain NUL (\\u0000) characters")
    return value


Text = Annotated[str, AfterValidator(_no_nul)]
# Bounded strings are also checked to be valid Unicode (a JSON "\ud800" escape decodes to a lone
# surrogate that no UTF-8 answer or PostgreSQL column can hold); unbounded ones were not. The
# constraints come before the NUL check: after it, they no longer refused lone surrogates.
MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=64), AfterValidator(_no_nul)]
MetadataValue = Annotated[str, StringConstraints(max_length=512), AfterValidator(_no_nul)]
StopSequence = Annotated[str, StringConstraints(max_length=512), AfterValidator(_no_nul)]


def _storable(value: datetime) -> datetime:
    """Refuse a time that falls outside years 1-9999 once moved to UTC (it is stored in UTC)."""
    if value.tzinfo is not None:
        try:
            value.astimezone(timezone.utc)
        except OverflowError:
            raise ValueError("is out of range once converted to UTC (years 1-9999)") from None
    return value


Timestamp = Annotated[datetime, AfterValidator(_storable)]


def _integral_number(value: Any) -> Any:
    """Take a JSON number with no fraction (`5.0`) as the integer it is, as JSON Schema does."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


# A key's limit: a JSON integer (5 or 5.0; `true` was 1, "5" was 5), bounded by the 32-bit
# integer columns that store it.
KeyLimit = Annotated[int, Field(strict=True, ge=1, le=MAX_INT32), BeforeValidator(_integral_number)]


def _as_utc(value: datetime) -> datetime:
    """Return a time as an aware UTC time; one without a timezone is taken as UTC."""
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class StrictModel(BaseModel):
    """A request body: unknown fields are an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


class Message(StrictModel):
    """One chat turn."""

    role: Literal["system", "user", "assistant"]
    content: Text = Field(min_length=1)


def _one_string_or_a_list(schema: dict[str, Any]) -> None:
    """Describe `stop` as the server reads it: one string, or a list of them, none empty."""
    item = {**schema.pop("items"), "minLength": 1}
    array = {"type": "array", "items": item, "maxItems": schema.pop("maxItems")}
    del schema["type"]
    schema["anyOf"] = [item, array]


class GenerationRequest(StrictModel):
    """Body of POST /v1/generations: `messages` (chat) or `prompt` (raw text), not both."""

    # In the OpenAPI document too: a body with neither or both is a 422.
    model_config = ConfigDict(json_schema_extra={"oneOf": [
        {"required": ["messages"], "properties": {"messages": {"type": "array"}}},
        {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
    ]})

    model: str = Field(min_length=1, max_length=200, examples=["gemma-3-270m"])
    messages: list[Message] | None = Field(default=None, min_length=1)
    prompt: Text | None = Field(default=None, min_length=1, examples=["The capital of France is"])
    max_new_tokens: int | None = Field(default=None, ge=1, le=32768, examples=[16])
    temperature: float = Field(default=1.0, ge=0.0, le=5.0, description="0 means greedy (so does any value below 1e-5)")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, description="0 disables top-k filtering")
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    stop: list[StopSequence] = Field(
        default_factory=list, max_length=MAX_STOP_SEQUENCES, json_schema_extra=_one_string_or_a_list
    )
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    timeout_s: float | None = Field(
        default=None, gt=0, description="execution time limit; past it the job fails with `timeout`"
    )
    ttl_s: float | None = Field(
        default=None, gt=0, description="how long it may wait queued; past it the job fails with `expired`"
    )
    metadata: dict[MetadataKey, MetadataValue] | None = Field(default=None, max_length=MAX_METADATA_KEYS)
    stream: bool = Field(
        default=False,
        description="answer 200 with the job's Server-Sent Events (tokens as they are generated, "
        "ending with `done`) instead of 202; not part of the job, nor of idempotency matching",
    )

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, value: list[str]) -> list[str]:
        if any(not item for item in value):
            raise ValueError("stop sequences must be non-empty strings")
        return value

    @model_validator(mode="after")
    def _messages_or_prompt(self) -> "GenerationRequest":
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of `messages` or `prompt`")
        return self


LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SUFFIX_PATTERN = r"^[a-z0-9][a-z0-9-]{0,31}$"


class Hyperparameters(StrictModel):
    """How a LoRA fine-tune trains; each has a default."""

    epochs: int = Field(default=3, ge=1, le=100)
    max_steps: int | None = Field(default=None, ge=1, le=MAX_INT32, description="overrides epochs when set")
    learning_rate: float = Field(default=2e-4, gt=0.0, le=1.0)
    batch_size: int = Field(default=4, ge=1, le=256)
    gradient_accumulation_steps: int = Field(default=1, ge=1, le=256)
    lora_r: int = Field(default=8, ge=1, le=256)
    lora_alpha: int = Field(default=16, ge=1, le=4096)
    lora_dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: list[Literal[LORA_TARGET_MODULES]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(LORA_TARGET_MODULES), min_length=1, max_length=len(LORA_TARGET_MODULES)
    )
    max_seq_length: int = Field(default=512, ge=16, le=32768)
    seed: int = Field(default=42, ge=0, le=2**32 - 1)


def optimizer_steps(rows: int, hp: Hyperparameters) -> int:
    """Optimizer steps a run takes, counted as transformers' Trainer does: max_steps if set, else
    whole epochs, where a partial gradient accumulation at an epoch's end is one more step."""
    if hp.max_steps:
        return hp.max_steps
    batches = math.ceil(rows / hp.batch_size)
    return hp.epochs * math.ceil(batches / hp.gradient_accumulation_steps)


def training_passes(rows: int, hp: Hyperparameters) -> int:
    """Forward and backward passes (micro-batches) a run takes: the work, whatever its accumulation."""
    if hp.max_steps:
        return hp.max_steps * hp.gradient_accumulation_steps
    return hp.epochs * math.ceil(rows / hp.batch_size)


class FineTuneRequest(StrictModel):
    """Body of POST /v1/fine-tunes."""

    base_model: str = Field(min_length=1, max_length=200, examples=["gemma-3-270m"])
    training_file: str = Field(min_length=1, max_length=40, examples=["file-01j..."])
    validation_file: str | None = Field(default=None, min_length=1, max_length=40)
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    quantization: Literal["none", "8bit", "4bit"] = Field(
        default="none", description="load the base in 8 or 4 bits (4bit = QLoRA); CUDA workers only"
    )
    suffix: str | None = Field(
        default=None, pattern=SUFFIX_PATTERN, description="put in the adapter id: ft-<suffix>-…"
    )
    ttl_s: float | None = Field(
        default=None, gt=0, description="how long it may wait queued; past it the job fails with `expired`"
    )
    metadata: dict[MetadataKey, MetadataValue] | None = Field(default=None, max_length=MAX_METADATA_KEYS)


class FileInfo(BaseModel):
    """An uploaded training file."""

    id: str
    object: Literal["file"] = "file"
    purpose: Literal["fine-tune"]
    filename: str = Field(description="the name the client gave; the server stores it under `id`")
    bytes: int
    rows: int
    created_at: datetime


class FileList(BaseModel):
    """The caller's files, newest first."""

    object: Literal["list"] = "list"
    data: list[FileInfo]


class FileDeleted(BaseModel):
    """What DELETE answers."""

    id: str
    object: Literal["file", "model"]
    deleted: Literal[True] = True


class Usage(BaseModel):
    """Tokens and compute a job used."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    train_tokens: int = 0
    gpu_seconds: float = 0.0


class JobError(BaseModel):
    """Why a job failed."""

    code: str
    message: str


class GenerationResult(BaseModel):
    """What a generation job produced."""

    text: str
    finish_reason: Literal["stop", "length"]
    token_ids: list[int] = Field(description="generated token ids, as the model produced them")


class FineTuneResult(BaseModel):
    """What a fine-tune produced: an adapter usable as `model` at once."""

    adapter_id: str
    base_model: str
    steps: int
    epochs: float
    train_loss: float | None = None
    eval_loss: float | None = None
    train_tokens: int
    # Rows trained on, and rows skipped because their prompt fills max_seq_length (0 for
    # results stored before these were kept).
    train_rows: int = 0
    rows_skipped: int = 0
    # The same of the validation file, if one was given.
    validation_rows: int = 0
    validation_rows_skipped: int = 0
    size_bytes: int


class Job(BaseModel):
    """A job as clients see it."""

    id: str
    object: Literal["job"] = "job"
    kind: Literal["generation", "fine_tune"]
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    model: str
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    attempts: int = 0
    queue_position: int | None = Field(
        default=None,
        description=(
            f"jobs ahead of this one in its queue while queued, counted up to {QUEUE_POSITION_CAP}; "
            "exact when submitted, up to a second old in a poll"
        ),
    )
    result: GenerationResult | FineTuneResult | None = None
    error: JobError | None = None
    progress: dict[str, Any] | None = None
    usage: Usage | None = None
    adapter_id: str | None = Field(
        default=None, description="the adapter a generation runs with; a fine-tune's adapter once it succeeded"
    )
    waiting_for: str | None = Field(
        default=None, description="while queued with no live worker consuming its queue: what it waits for"
    )
    metadata: dict[str, str] | None = None


class JobList(BaseModel):
    """One page of jobs, newest first."""

    object: Literal["list"] = "list"
    data: list[Job]
    has_more: bool
    next_after: str | None = Field(default=None, description="pass as `after` for the next page")


class ModelInfo(BaseModel):
    """A model a caller may name."""

    id: str
    object: Literal["model"] = "model"
    kind: Literal["base", "adapter"] = "base"
    description: str = ""
    context_length: int
    base_model: str | None = Field(default=None, description="adapters: the model it runs on")
    created_at: datetime | None = None
    job_id: str | None = Field(default=None, description="adapters: the fine-tune that made it")
    hyperparameters: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = Field(default=None, description="adapters: final losses, steps")
    size_bytes: int | None = None


class ModelList(BaseModel):
    """The models a caller may name."""

    object: Literal["list"] = "list"
    data: list[ModelInfo]


class JobEventInfo(BaseModel):
    """One event in a job's history: a status change, training progress, a log line, or (while
    the job's token stream is kept) generated tokens and the start of an attempt."""

    id: int | None = Field(description="a recorded event's id (pass as `after`); null for `token` and `attempt`")
    type: str
    data: dict[str, Any]
    created_at: datetime


class JobEventList(BaseModel):
    """A job's events, oldest first; pass `next_after` (the page's last recorded event's id) as
    `after` for newer ones."""

    object: Literal["list"] = "list"
    data: list[JobEventInfo]
    has_more: bool
    next_after: int | None = Field(default=None, description="pass as `after` for the next page")


class ErrorBody(BaseModel):
    """The body inside every error response."""

    code: str
    message: str
    details: Any = None


class ErrorResponse(BaseModel):
    """Every error: `{"error": {"code", "message", "details"}}`."""

    error: ErrorBody


class Health(BaseModel):
    """Liveness or readiness."""

    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = Field(default_factory=dict)
    error: ErrorBody | None = Field(default=None, description="when unavailable: code `not_ready`")


class KeyCreate(StrictModel):
    """Body of POST /v1/admin/keys; limits left out use the server defaults."""

    role: Literal["admin", "user"] = "user"
    name: str = Field(default="", max_length=200)
    rpm: KeyLimit | None = Field(default=None, description="requests per minute")
    tpm: KeyLimit | None = Field(default=None, description="tokens per minute")
    max_concurrent: KeyLimit | None = Field(default=None, description="queued + running jobs")
    expires_at: Timestamp | None = Field(default=None, description="the key stops working at this time")

    @field_validator("expires_at")
    @classmethod
    def _aware_and_future(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("give a timezone, e.g. 2027-01-01T00:00:00Z")
        if value <= datetime.now(timezone.utc):
            raise ValueError("must be in the future")
        return value.astimezone(timezone.utc)  # as stored, and as every later read shows it

    @field_validator("name")
    @classmethod
    def _printable(cls, value: str) -> str:
        # PostgreSQL refuses NUL in text (a 500), and no control or format character belongs in a
        # label printed in tables (line separators, C1 controls, direction overrides garble them).
        if any(unicodedata.category(char)[0] == "C" or unicodedata.category(char) in ("Zl", "Zp") for char in value):
            raise ValueError("must be printable text: no control or format characters (NUL, newlines, tabs, "
                             "line separators, direction overrides)")
        return value


class KeyInfo(BaseModel):
    """An API key as admins see it: never its secret."""

    id: str
    object: Literal["api_key"] = "api_key"
    role: Literal["admin", "user"]
    name: str
    key_prefix: str = Field(description="the first characters of the key, to tell keys apart")
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    created_at: datetime
    expires_at: datetime | None = None
    revoked_at: datetime | None = None


class KeyCreated(KeyInfo):
    """A new key: the plaintext `key` is shown here once and never again."""

    key: str


class KeyList(BaseModel):
    """Every API key, newest first."""

    object: Literal["list"] = "list"
    data: list[KeyInfo]


class UsageRange(StrictModel):
    """Query of GET /v1/usage: an optional [from, to) range of ISO 8601 times."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    start: Timestamp | None = Field(default=None, alias="from")
    end: Timestamp | None = Field(default=None, alias="to")

    @field_validator("end")
    @classmethod
    def _end_after_start(cls, end: datetime | None, info: ValidationInfo) -> datetime | None:
        # An empty range matched nothing: a report of no usage, from a typing mistake.
        start = info.data.get("start")
        if start is not None and end is not None and _as_utc(end) <= _as_utc(start):
            raise ValueError("`to` must be after `from` (the range is [from, to))")
        return end


class UsageQuery(UsageRange):
    """Query of GET /v1/admin/usage: a range, a grouping and optionally one key."""

    group_by: Literal["key", "model", "day"] = "key"
    # An empty one is a mistake (`?key_id=`), not "no key": it matched nothing, silently.
    key_id: str | None = Field(default=None, min_length=1, max_length=40, pattern=r"^[^\x00]*$")


class UsageTotals(BaseModel):
    """What a set of jobs used."""

    jobs: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    train_tokens: int = 0
    gpu_seconds: float = 0.0


class UsageRow(UsageTotals):
    """Totals of one group (a key id, a model id or a UTC day)."""

    group: str


class UsageReport(BaseModel):
    """Usage grouped by key, model or day over a time range."""

    object: Literal["list"] = "list"
    group_by: Literal["key", "model", "day"]
    data: list[UsageRow]


class WorkerInfo(BaseModel):
    """A worker process as it last reported itself."""

    id: str
    object: Literal["worker"] = "worker"
    host: str
    pid: int
    device: str
    gpu_name: str | None = None
    gpu_memory_mb: int | None = None
    role: Literal["generate", "finetune", "all"]
    models: list[str] = Field(description="models loaded for generation")
    queues: list[str]
    state: Literal["starting", "ready", "draining", "stopped"]
    alive: bool = Field(description="heartbeat within worker_dead_after_s and not stopped")
    jobs_in_flight: int
    jobs_done: int
    started_at: datetime
    heartbeat_at: datetime
    stopped_at: datetime | None = None


class WorkerQuery(StrictModel):
    """Query of GET /v1/admin/workers."""

    include_gone: bool = Field(default=False, description="also workers that stopped or died in the last hour")


class WorkerList(BaseModel):
    """Live workers (with `include_gone`, then those that stopped or died in the last hour)."""

    object: Literal["list"] = "list"
    data: list[WorkerInfo]


class QueueInfo(BaseModel):
    """One job queue: how many wait, since when, and who consumes it."""

    name: str
    kind: Literal["generation", "fine_tune"]
    model: str
    queued: int
    running: int
    oldest_job_id: str | None = Field(default=None, description="the job that has waited longest")
    oldest_queued_at: datetime | None = None
    oldest_wait_s: float | None = None
    live_workers: int = Field(description="live workers consuming this queue")


class QueueList(BaseModel):
    """Every queue with queued or running jobs, or a live consumer."""

    object: Literal["list"] = "list"
    data: list[QueueInfo]
