"""Stopping criteria checked between tokens."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import PreTrainedTokenizerBase, StoppingCriteria


class StopOnStrings(StoppingCriteria):
    """Stop once any stop string appears in the newly generated text.

    transformers' own `stop_strings` preprocesses the whole 262k-token vocabulary on every
    `generate` call (~1 s per job here); decoding a short window of the newest tokens each
    step costs microseconds.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: list[str], prompt_length: int):
        self.tokenizer = tokenizer
        self.stops = stops
        self.prompt_length = prompt_length
        # Every token decodes to at least one character (or none, for special tokens), so a
        # stop string of k characters that just completed lies within the last k+1 tokens.
        self.window = max(len(stop) for stop in stops) + 1

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        done = []
        for row in input_ids:
            recent = row[self.prompt_length :][-self.window :]
            text = self.tokenizer.decode(recent, skip_special_tokens=True)
            done.append(any(stop in text for stop in self.stops))
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class StopWhen(StoppingCriteria):
    """Stop every sequence once a check says so (cancel, deadline, shutdown, lost lease)."""

    def __init__(self, check: Callable[[], bool]):
        self.check = check

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.check(), dtype=torch.bool, device=input_ids.device)
