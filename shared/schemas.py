"""Pydantic schemas of the HTTP API; /openapi.json is generated from them."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP_SEQUENCES = 8
MAX_INT32 = 2**31 - 1
MAX_METADATA_KEYS = 16


class StrictModel(BaseModel):
    """A request body: unknown fields are an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


class Message(StrictModel):
    """One chat turn."""

    role: Literal["system", "user", "assistant"]
    content: str = Field(min_length=1)


class GenerationRequest(StrictModel):
    """Body of POST /v1/generations: `messages` (chat) or `prompt` (raw text), not both."""

    model: str = Field(min_length=1, max_length=200, examples=["gemma-3-270m"])
    messages: list[Message] | None = Field(default=None, min_length=1)
    prompt: str | None = Field(default=None, min_length=1, examples=["The capital of France is"])
    max_new_tokens: int | None = Field(default=None, ge=1, le=32768, examples=[16])
    temperature: float = Field(default=1.0, ge=0.0, le=5.0, description="0 means greedy")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, description="0 disables top-k filtering")
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP_SEQUENCES)
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    timeout_s: float | None = Field(
        default=None, gt=0, description="execution time limit; past it the job fails with `timeout`"
    )
    ttl_s: float | None = Field(
        default=None, gt=0, description="how long it may wait queued; past it the job fails with `expired`"
    )
    metadata: dict[str, str] | None = Field(default=None, max_length=MAX_METADATA_KEYS)

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
        default=None, description="jobs ahead of this one in its queue, while queued"
    )
    result: GenerationResult | None = None
    error: JobError | None = None
    progress: dict[str, Any] | None = None
    usage: Usage | None = None
    adapter_id: str | None = None
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


class ModelList(BaseModel):
    """The models a caller may name."""

    object: Literal["list"] = "list"
    data: list[ModelInfo]


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


class KeyCreate(StrictModel):
    """Body of POST /v1/admin/keys; limits left out use the server defaults."""

    role: Literal["admin", "user"] = "user"
    name: str = Field(default="", max_length=200)
    # Bounded by the 32-bit integer columns that store them.
    rpm: int | None = Field(default=None, ge=1, le=MAX_INT32, description="requests per minute")
    tpm: int | None = Field(default=None, ge=1, le=MAX_INT32, description="tokens per minute")
    max_concurrent: int | None = Field(default=None, ge=1, le=MAX_INT32, description="queued + running jobs")
    expires_at: datetime | None = Field(default=None, description="the key stops working at this time")

    @field_validator("expires_at")
    @classmethod
    def _aware_and_future(cls, value: datetime | None) -> datetime | None:
        from datetime import timezone

        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("give a timezone, e.g. 2027-01-01T00:00:00Z")
        if value <= datetime.now(timezone.utc):
            raise ValueError("must be in the future")
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

    start: datetime | None = Field(default=None, alias="from")
    end: datetime | None = Field(default=None, alias="to")


class UsageQuery(UsageRange):
    """Query of GET /v1/admin/usage: a range, a grouping and optionally one key."""

    group_by: Literal["key", "model", "day"] = "key"
    key_id: str | None = Field(default=None, max_length=40)


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
