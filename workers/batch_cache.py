"""The KV cache of a running batch: rows join and leave between decode steps.

Rows are left-padded to one common length, so every row's real tokens sit contiguously at
the right end. That keeps a cache index distance equal to a position distance, which is
what Gemma's sliding-window layers mask on, and lets a row be added or dropped with one
tensor operation per layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache

# Drop all-padding columns on the left once this many have piled up (a copy of the cache).
TRIM_AFTER_COLUMNS = 64


class BatchCache:
    """Key/value tensors, padding mask and positions of the rows decoding together."""

    def __init__(self, sliding_window: int | None):
        self.sliding_window = sliding_window
        self.cache: DynamicCache | None = None
        self.valid: torch.Tensor | None = None  # [rows, columns] bool, False on padding
        self.positions: torch.Tensor | None = None  # [rows] position of each row's next token

    @property
    def rows(self) -> int:
        """Return how many rows the batch holds."""
        return 0 if self.valid is None else self.valid.shape[0]

    def add(self, rows_cache: DynamicCache, rows_valid: torch.Tensor) -> None:
        """Append prefilled rows (a left-padded cache and its [rows, length] mask) after the others."""
        rows_position = rows_valid.sum(dim=1)
        if self.cache is None:
            self.cache, self.valid, self.positions = rows_cache, rows_valid, rows_position
            return
        length = rows_valid.shape[1]
        width = max(length, self.valid.shape[1])
        self._pad_left(width - self.valid.shape[1])
        for layer, rows_layer in zip(self.cache.layers, rows_cache.layers):
            layer.keys = torch.cat([layer.keys, F.pad(rows_layer.keys, (0, 0, width - length, 0))])
            layer.values = torch.cat([layer.values, F.pad(rows_layer.values, (0, 0, width - length, 0))])
        self.valid = torch.cat([self.valid, F.pad(rows_valid, (width - length, 0))])
        self.positions = torch.cat([self.positions, rows_position])

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (in this order); an empty list empties the batch."""
        if not rows:
            self.cache = self.valid = self.positions = None
            return
        index = torch.tensor(rows, device=self.valid.device)
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)
            layer.values = layer.values.index_select(0, index)
        self.valid = self.valid.index_select(0, index)
        self.positions = self.positions.index_select(0, index)
        self._trim()

    def step_inputs(self) -> dict:
        """Return the forward arguments for one new token per row, and grow the mask by one column."""
        self.valid = F.pad(self.valid, (0, 1), value=True)
        columns = self.valid.shape[1]
        full = self.valid[:, None, None, :]
        masks = {"full_attention": full}
        if self.sliding_window is not None:
            # A sliding layer sees only the last `sliding_window` positions, the new token included.
            recent = torch.arange(columns, device=full.device) > columns - 1 - self.sliding_window
            masks["sliding_attention"] = full & recent
        positions = self.positions
        self.positions = positions + 1
        return {"attention_mask": masks, "position_ids": positions[:, None], "cache": self.cache}

    def _pad_left(self, columns: int) -> None:
        if columns <= 0:
            return
        for layer in self.cache.layers:
            layer.keys = F.pad(layer.keys, (0, 0, columns, 0))
            layer.values = F.pad(layer.values, (0, 0, columns, 0))
        self.valid = F.pad(self.valid, (columns, 0))

    def _trim(self) -> None:
        """Drop leading columns that are padding in every row, once there are enough to matter."""
        used = self.valid.any(dim=0).nonzero()
        first = int(used[0]) if len(used) else self.valid.shape[1]
        if first < TRIM_AFTER_COLUMNS:
            return
        for layer in self.cache.layers:
            layer.keys = layer.keys[:, :, first:].contiguous()
            layer.values = layer.values[:, :, first:].contiguous()
        self.valid = self.valid[:, first:]
