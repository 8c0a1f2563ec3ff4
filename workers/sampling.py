"""Choosing each job's next token from its logits row, with the job's own settings and seed."""

from __future__ import annotations

import secrets
from typing import Any

import torch

# Temperatures below this decode greedily (vLLM's rule): logits divided by a temperature near
# zero overflow to inf, and sampling from them fails (it failed the job's whole batch).
GREEDY_BELOW = 1e-5
# Penalized scores stay within this: a seen logit over a penalty near zero (1e-38) overflowed to
# inf, softmax made NaNs of it, and sampling raised (it failed the job's whole batch). Over the
# smallest temperature sampled (GREEDY_BELOW) it still fits a float32.
SCORE_LIMIT = 1e30


class Sampler:
    """One job's decoding rule: greedy or temperature/top-k/top-p, with a repetition penalty.

    Each job has its own random generator, seeded from its `seed`, so a job's samples do not
    depend on which other jobs share its batch.
    """

    def __init__(self, params: dict[str, Any], device: torch.device):
        self.temperature = params.get("temperature", 1.0)
        self.top_p = params.get("top_p", 1.0)
        self.top_k = params.get("top_k", 0)
        self.repetition_penalty = params.get("repetition_penalty", 1.0)
        self.generator = None
        if not self.greedy:
            seed = params.get("seed")
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(seed if seed is not None else secrets.randbits(63))

    @property
    def greedy(self) -> bool:
        """Return whether this job takes the most likely token every time."""
        return self.temperature < GREEDY_BELOW

    @property
    def plain_greedy(self) -> bool:
        """Return whether a batch-wide argmax gives this job's token (greedy, no penalty)."""
        return self.greedy and self.repetition_penalty == 1.0

    def pick(self, logits: torch.Tensor, history: torch.Tensor) -> int:
        """Return the next token from one row of logits; `history` is the prompt plus tokens so far."""
        scores = logits.float()
        if self.repetition_penalty != 1.0:
            scores = _penalize(scores, history, self.repetition_penalty)
        if self.greedy:
            return int(scores.argmax())
        scores = scores / self.temperature
        if self.top_k:
            kth = torch.topk(scores, min(self.top_k, scores.shape[-1])).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p < 1.0:
            scores = _nucleus(scores, self.top_p)
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def _penalize(scores: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make tokens already seen less likely (the CTRL rule transformers uses)."""
    history = history.to(scores.device)  # built on the CPU; a GPU's logits refuse a CPU index
    seen = scores.gather(0, history)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty).clamp(-SCORE_LIMIT, SCORE_LIMIT)
    return scores.scatter(0, history, seen)


def _nucleus(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability adds up to top_p."""
    ordered, order = torch.sort(scores, descending=True)
    probs = torch.softmax(ordered, dim=-1)
    # Drop a token once the ones before it already reach top_p; the first always stays (a top_p
    # below float32's smallest number, 1e-50, was 0 here and dropped every token: NaNs again).
    drop = probs.cumsum(dim=-1) - probs >= top_p
    drop[0] = False
    return scores.scatter(0, order, ordered.masked_fill(drop, float("-inf")))
