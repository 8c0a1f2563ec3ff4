"""What a generation job is checked against and what it produces (the engine runs it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from workers.model_loader import LoadedModel
from workers.prompts import input_ids_for


class GenerationError(RuntimeError):
    """A job's input cannot be generated from; the message tells the client what to fix.

    `usage` is what the job had used when it failed (its batch failed midway): it is charged.
    """

    def __init__(self, code: str, message: str, usage: dict[str, Any] | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.usage = usage


@dataclass
class GenerationOutput:
    """What one generation produced and what it cost."""

    text: str
    finish_reason: str
    token_ids: list[int]
    prompt_tokens: int
    seconds: float  # wall time from submit to the last token
    gpu_seconds: float  # this job's share of the forward passes it was part of

    @property
    def completion_tokens(self) -> int:
        """Return how many tokens the model generated."""
        return len(self.token_ids)


def prompt_ids_within_context(loaded: LoadedModel, params: dict[str, Any]) -> list[int]:
    """Return the job's prompt token ids, or raise if prompt plus max_new_tokens exceed the context."""
    prompt_ids = input_ids_for(loaded.tokenizer, params)
    limit = loaded.entry.context_length
    if len(prompt_ids) + params["max_new_tokens"] > limit:
        raise GenerationError(
            "context_length_exceeded",
            f"the prompt is {len(prompt_ids)} tokens and max_new_tokens is "
            f"{params['max_new_tokens']}; together they must fit the model's "
            f"context of {limit} tokens",
        )
    return prompt_ids


def finish_text(loaded: LoadedModel, new_ids: list[int], params: dict[str, Any]) -> tuple[str, str]:
    """Decode the new tokens, cut at the first stop string, and say why generation ended."""
    stop = params.get("stop") or []
    text = loaded.tokenizer.decode(new_ids, skip_special_tokens=True)
    cuts = [index for index in (text.find(s) for s in stop) if index >= 0]
    if cuts:
        return text[: min(cuts)], "stop"
    if new_ids and new_ids[-1] in loaded.eos_token_ids:
        return text, "stop"
    return text, ("length" if len(new_ids) >= params["max_new_tokens"] else "stop")
