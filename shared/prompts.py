"""Prompt rendering shared by the gateway (token counting) and the workers (generation)."""

from __future__ import annotations

from typing import Any


def gemma_turn_format(messages: list[dict[str, Any]]) -> str:
    """Render chat messages in Gemma's turn format, ending with an open model turn.

    Gemma has no system role: like Gemma's own template, system text is prepended to the
    first user turn. The BOS token is left to the tokenizer.
    """
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    turns = []
    for message in (m for m in messages if m["role"] != "system"):
        content = message["content"]
        if system and message["role"] == "user":
            content, system = f"{system}\n\n{content}", ""
        role = "model" if message["role"] == "assistant" else "user"
        turns.append(f"<start_of_turn>{role}\n{content}<end_of_turn>\n")
    if system:  # only system messages were given
        turns.append(f"<start_of_turn>user\n{system}<end_of_turn>\n")
    return "".join(turns) + "<start_of_turn>model\n"
