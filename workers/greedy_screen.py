"""Exact greedy tokens from a bf16 screen of the output layer, for float32 CPU batches.

Gemma's output layer is a [262144, 640] matrix: in float32 it is most of a batched decode
step on the CPU (~90 of ~150 ms for 16 rows here), while on a CPU with bf16 dot-product
instructions the same product in bf16 takes ~22 ms. Greedy rows only need the argmax, so the
screen computes every logit in bf16, keeps the tokens that could still be the largest given a
proven bound on the bf16 error, and computes just those exactly (float64). The pick is the
argmax of the exact logits, whatever the batch, so a job's tokens stay the same in a batch
and alone.
"""

from __future__ import annotations

import torch

from workers.cpu_threads import cpu_has_bf16_dot

# A bf16 value is within a relative 2^-8 of the number it rounds (8 significant bits).
BF16_UNIT = 2.0**-8
FP32_UNIT = 2.0**-24
# Slack over the proven bound, against the bound's own float rounding.
SAFETY = 1.5
# More candidates than this (a nearly flat row) are not worth an exact pass: the row falls back.
MAX_CANDIDATES = 4096


def greedy_screen_for(loaded, setting: str) -> GreedyScreen | None:
    """Return a screen for a loaded model's batches, or None: "on", or "auto" on a bf16-capable CPU.

    Only a float32 CPU model with a plain output layer qualifies: in bf16 there is nothing to
    screen, and a GPU's float32 product is already fast.
    """
    head = getattr(loaded.model, "lm_head", None)
    usable = loaded.device.type == "cpu" and loaded.dtype == torch.float32 and type(head) is torch.nn.Linear
    if not usable or setting == "off" or (setting == "auto" and not cpu_has_bf16_dot()):
        return None
    return GreedyScreen(head.weight)


class GreedyScreen:
    """Picks the argmax of `hidden @ weight.T` per row, screening in bf16 and checking exactly."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight  # the model's own float32 output layer, shared
        # Both set at the first pick, in the engine's thread: multi-threaded torch work in the
        # thread that creates the engine would slow the engine's own (BatchEngine.prefill_tokens).
        self.screen: torch.Tensor | None = None
        self.error_per_norm: float | None = None

    def _prepare(self) -> None:
        weight = self.weight.detach()
        self.screen = weight.to(torch.bfloat16)
        if self.error_per_norm is None:
            # Error of one screened logit, per unit of the row's norm (Cauchy-Schwarz on each term):
            # rounding the row and the weights to bf16, float32 accumulation, rounding the output.
            largest = float(weight.norm(dim=1).max())  # float32 is close enough: SAFETY covers it
            self.error_per_norm = SAFETY * largest * (3 * BF16_UNIT + weight.shape[1] * FP32_UNIT)

    def pick(self, hidden: torch.Tensor) -> list[int]:
        """Return each row's token: the exact argmax of its logits (first index on a tie)."""
        if self.screen is None:
            self._prepare()
        estimates = hidden.to(torch.bfloat16) @ self.screen.T
        tops = estimates.max(dim=1).values.double()
        margins = 2 * self.error_per_norm * hidden.double().norm(dim=1)
        tokens = []
        for row in range(hidden.shape[0]):
            # Every token whose exact logit could beat the best estimate's exact logit.
            threshold = tops[row] - margins[row]
            candidates = (estimates[row] >= threshold.to(torch.bfloat16)).nonzero().squeeze(1)
            if not torch.isfinite(threshold) or not 0 < len(candidates) <= MAX_CANDIDATES:
                # A broken row (NaN or inf) or a flat one: the plain float32 argmax, as without the screen.
                tokens.append(int((self.weight @ hidden[row]).argmax()))
                continue
            exact = self.weight[candidates].double() @ hidden[row].double()
            tokens.append(int(candidates[exact.argmax()]))
        return tokens
