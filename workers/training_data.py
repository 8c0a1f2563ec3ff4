"""Turning training rows into token ids and labels: loss only on what the model should say."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from shared.training_data import Example

IGNORE_INDEX = -100  # label of tokens the loss skips (transformers' convention)


@dataclass(frozen=True)
class TokenizedExample:
    """One row as model inputs; `labels` is IGNORE_INDEX except on the learned tokens."""

    input_ids: list[int]
    labels: list[int]

    @property
    def learned_tokens(self) -> int:
        """Return how many tokens the loss covers."""
        return sum(label != IGNORE_INDEX for label in self.labels)


def tokenize_example(tokenizer: PreTrainedTokenizerBase, example: Example, max_seq_length: int) -> TokenizedExample:
    """Tokenize a row the way generation will see it, truncated to max_seq_length.

    Chat rows use Gemma's turn format (as generation does for `messages`) and learn the
    assistant turns with their <end_of_turn>; prompt/completion rows are raw text (as
    generation does for `prompt`) and learn the completion and EOS. Each piece is tokenized
    on its own, so the learned tokens start where generation starts producing them.
    """
    pieces = _chat_pieces(example) if example.is_chat else _completion_pieces(tokenizer, example)
    input_ids = [tokenizer.bos_token_id]
    labels = [IGNORE_INDEX]
    for text, learned in pieces:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if learned else [IGNORE_INDEX] * len(ids)
    return TokenizedExample(input_ids[:max_seq_length], labels[:max_seq_length])


def _chat_pieces(example: Example) -> list[tuple[str, bool]]:
    """Gemma turns as (text, learned) pieces; system text joins the first user turn."""
    system = "\n\n".join(content for role, content in example.messages if role == "system")
    pieces: list[tuple[str, bool]] = []
    for role, content in example.messages:
        if role == "system":
            continue
        if role == "user":
            if system:
                content, system = f"{system}\n\n{content}", ""
            pieces.append((f"<start_of_turn>user\n{content}<end_of_turn>\n", False))
        else:
            pieces += [("<start_of_turn>model\n", False), (f"{content}<end_of_turn>", True), ("\n", False)]
    return pieces


def _completion_pieces(tokenizer: PreTrainedTokenizerBase, example: Example) -> list[tuple[str, bool]]:
    return [(example.prompt, False), (example.completion + tokenizer.eos_token, True)]
