"""Running one generation job's parameters through a loaded model."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import StoppingCriteriaList

from workers.model_loader import LoadedModel
from workers.prompts import input_ids_for
from workers.stopping import StopOnStrings, StopWhen


class GenerationError(RuntimeError):
    """A job's input cannot be generated from; the message tells the client what to fix."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class GenerationOutput:
    """What one generation produced and what it cost."""

    text: str
    finish_reason: str
    token_ids: list[int]
    prompt_tokens: int
    seconds: float

    @property
    def completion_tokens(self) -> int:
        """Return how many tokens the model generated."""
        return len(self.token_ids)


def sampling_kwargs(params: dict[str, Any]) -> dict[str, Any]:
    """Translate job parameters to `generate` arguments; temperature 0 means greedy."""
    temperature = params.get("temperature", 1.0)
    kwargs: dict[str, Any] = {
        "max_new_tokens": params["max_new_tokens"],
        "repetition_penalty": params.get("repetition_penalty", 1.0),
    }
    if temperature == 0:
        # Explicit None overrides sampling defaults a model's generation_config may carry.
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        kwargs.update(
            do_sample=True,
            temperature=temperature,
            top_p=params.get("top_p", 1.0),
            top_k=params.get("top_k", 0) or None,
        )
    return kwargs


def generate(
    loaded: LoadedModel, params: dict[str, Any], should_stop: Callable[[], bool] | None = None
) -> GenerationOutput:
    """Generate for one job: encode, check the context, sample, decode, apply stop strings.

    `should_stop` is checked between tokens; when it fires, the tokens so far are returned.
    """
    tokenizer = loaded.tokenizer
    prompt_ids = input_ids_for(tokenizer, params)
    limit = loaded.entry.context_length
    if len(prompt_ids) + params["max_new_tokens"] > limit:
        raise GenerationError(
            "context_length_exceeded",
            f"the prompt is {len(prompt_ids)} tokens and max_new_tokens is "
            f"{params['max_new_tokens']}; together they must fit the model's "
            f"context of {limit} tokens",
        )
    stop = params.get("stop") or []
    kwargs = sampling_kwargs(params)
    criteria = StoppingCriteriaList()
    if stop:
        criteria.append(StopOnStrings(tokenizer, stop, prompt_length=len(prompt_ids)))
    if should_stop is not None:
        criteria.append(StopWhen(should_stop))
    seed = params.get("seed")
    # One job runs at a time per process, so seeding the global generator is exact.
    torch.manual_seed(seed if seed is not None else secrets.randbits(63))
    input_ids = torch.tensor([prompt_ids], device=loaded.device)
    started = time.monotonic()
    with torch.inference_mode():
        output = loaded.model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            eos_token_id=loaded.eos_token_ids,
            pad_token_id=tokenizer.pad_token_id,
            stopping_criteria=criteria,
            **kwargs,
        )
    seconds = time.monotonic() - started
    new_ids = output[0, len(prompt_ids) :].tolist()
    text, finish_reason = _finish(tokenizer, new_ids, loaded.eos_token_ids, stop, params)
    return GenerationOutput(
        text=text,
        finish_reason=finish_reason,
        token_ids=new_ids,
        prompt_tokens=len(prompt_ids),
        seconds=seconds,
    )


def _finish(tokenizer, new_ids: list[int], eos_ids: list[int], stop: list[str], params) -> tuple[str, str]:
    """Decode the new tokens, cut at the first stop string, and say why generation ended."""
    text = tokenizer.decode(new_ids, skip_special_tokens=True)
    cuts = [index for index in (text.find(s) for s in stop) if index >= 0]
    if cuts:
        return text[: min(cuts)], "stop"
    if new_ids and new_ids[-1] in eos_ids:
        return text, "stop"
    return text, ("length" if len(new_ids) >= params["max_new_tokens"] else "stop")
