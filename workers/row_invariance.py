"""How many rows a CPU's matrix products take before a row's result depends on the row count.

A prompt prefilled in one pass with others must get the numbers it gets alone. Each row of a
product `x @ w.T` is its own dot products, but a BLAS picks kernels, and so rounding order,
by the shape: on the machines measured, every row count up to 32 gives each row the same bits,
and 64 or more do not. The kernel choice depends on shapes, not values, so a check of this
model's own weight shapes with random rows tells what this machine does.
"""

from __future__ import annotations

import torch

# Row counts tried, largest first; 1 (each prompt alone) needs no check.
CANDIDATE_ROWS = (32, 16, 8)


def invariant_rows(model: torch.nn.Module, skip: torch.nn.Module | None = None) -> int:
    """Return the most rows (from CANDIDATE_ROWS, else 1) at which every linear layer of `model` but
    `skip` gives each row the bits it gets with fewer rows, at any place in the batch."""
    weights = {}
    for name, module in model.named_modules():
        # peft's LoRA layers live on the base model once an adapter is loaded, but only adapter
        # batches run them, and those never pack: they set no limit on the base model's packing.
        lora = any(part.startswith("lora_") for part in name.split("."))
        if isinstance(module, torch.nn.Linear) and module is not skip and not lora:
            weights.setdefault(tuple(module.weight.shape), module.weight.detach())
    generator = torch.Generator().manual_seed(0)
    for rows in CANDIDATE_ROWS:
        if all(_rows_invariant(weight, rows, generator) for weight in weights.values()):
            return rows
    return 1


def _rows_invariant(weight: torch.Tensor, rows: int, generator: torch.Generator) -> bool:
    """Check every count of leading and of trailing rows against one product of `rows` rows."""
    x = torch.randn(rows, weight.shape[1], generator=generator).to(weight.dtype)
    full = torch.nn.functional.linear(x, weight)
    for count in range(1, rows):
        head = torch.nn.functional.linear(x[:count], weight)
        tail = torch.nn.functional.linear(x[rows - count :], weight)
        if not (torch.equal(head, full[:count]) and torch.equal(tail, full[rows - count :])):
            return False
    return True
