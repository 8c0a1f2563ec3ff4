"""Turning a job's `messages` or `prompt` into input token ids."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from shared.prompts import gemma_turn_format


def input_ids_for(tokenizer: PreTrainedTokenizerBase, params: dict[str, Any]) -> list[int]:
    """Return the prompt's token ids: chat template or Gemma turns for messages, raw text as is."""
    if params.get("prompt") is not None:
        return tokenizer(params["prompt"], add_special_tokens=True)["input_ids"]
    messages = params["messages"]
    if tokenizer.chat_template:
        # Chat templates write the BOS token themselves.
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(gemma_turn_format(messages), add_special_tokens=True)["input_ids"]
