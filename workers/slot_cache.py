"""The KV cache of a running batch: one slot per sequence, each filled from column 0.

A sequence's keys sit at the columns of their positions, whatever else is in the batch, so
its attention can be computed with a call that depends on nothing but the row (`exact`: the
same call as when it runs alone) or over all rows at once with one mask (as on a GPU). Rows
join and leave by taking and freeing slots: nothing is copied when a row leaves. Prompts
packed into one prefill pass attend only to their own tokens (`PrefillSegments`), with the
same calls as when each is prefilled alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

# Columns added to every slot when one runs out (a copy of the cache, so not every step).
GROW_COLUMNS = 256
# Exact decode attention reads whole spans of this many columns, masked to the row's own: rows
# whose spans coincide share one call, and a row's call is the same alone or batched.
SPAN_COLUMNS = 64
assert GROW_COLUMNS % SPAN_COLUMNS == 0  # a span never ends past the cache's capacity
# The attention implementation name models of a slot-cache engine run with.
SLOT_ATTENTION = "gemma_jobs_slots"
# Passed as a model's attention_mask: the model builds no masks, the attention below masks itself.
NO_MASKS = {"full_attention": None, "sliding_attention": None}
# A sliding layer prefills a prompt longer than this in blocks of this many queries (a mask per
# block, not one over the whole prompt); shorter prompts keep the one call they always had.
WINDOW_QUERY_BLOCK = 2048


@dataclass
class PrefillSegments:
    """Prompts packed into one prefill pass: where each starts and how many tokens it has."""

    starts: list[int]
    lengths: list[int]


@dataclass
class SlotRows:
    """What one decode step's attention needs: each forward row's slot and its length, new token included."""

    slots: list[int]
    lengths: list[int]
    exact: bool
    slot_index: torch.Tensor  # the slots, as a tensor (the batched path gathers with it)
    identity: bool  # the forward rows are all the slots, in order: no gather

    spans: dict = field(default_factory=dict, repr=False)  # span_groups by window, built once per step

    def span_groups(self, window: int | None) -> list[tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Return (columns, rows, their slots, their mask) for each span of whole SPAN_COLUMNS blocks
        that covers some rows' visible columns (the last `window`, on a sliding layer)."""
        if window not in self.spans:
            by_span: dict[tuple[int, int], list[int]] = {}
            for row, length in enumerate(self.lengths):
                first = max(0, length - window) if window else 0
                span = (first // SPAN_COLUMNS * SPAN_COLUMNS, -(-length // SPAN_COLUMNS) * SPAN_COLUMNS)
                by_span.setdefault(span, []).append(row)
            device = self.slot_index.device
            groups = []
            for (start, end), rows in by_span.items():
                lengths = torch.tensor([self.lengths[row] for row in rows], device=device)[:, None]
                columns = torch.arange(start, end, device=device)[None, :]
                mask = columns < lengths
                if window:
                    mask &= columns >= lengths - window
                index = torch.tensor(rows, device=device)
                groups.append((slice(start, end), index, self.slot_index[index], mask[:, None, None, :]))
            self.spans[window] = groups
        return self.spans[window]


class SlotCache:
    """Keys and values of up to `slots` sequences; a sequence's token at position p is in column p."""

    def __init__(self, slots: int, exact: bool, fixed_rows: bool, min_rows: int = 1):
        self.slots = slots
        self.exact = exact  # attention per row over its own columns: results independent of the batch
        self.fixed_rows = fixed_rows  # every step runs all slots, so matrix shapes never change
        # Without fixed rows, a step runs at least this many (free slots fill in): on the CPU a
        # float32 product of one row gives other bits than the same row among several, so a job
        # alone decoded otherwise than batched. A spare slot beyond `slots` serves a batch of one.
        self.min_rows = min_rows
        self.cache_slots = slots if fixed_rows else max(slots, min_rows)
        self.keys: list[torch.Tensor] = []  # per layer [cache_slots, kv_heads, capacity, head_dim]
        self.values: list[torch.Tensor] = []
        self.lengths = [0] * self.cache_slots  # tokens cached per slot
        self.row_slots: list[int] = []  # the slot of each of the engine's rows, in row order
        self._writes: tuple[torch.Tensor, torch.Tensor] | None = None  # this step's (slots, columns)

    @property
    def rows(self) -> int:
        """Return how many rows the batch holds."""
        return len(self.row_slots)

    def forward_slots(self) -> list[int]:
        """Return the slot of each row of the next forward pass (all slots with fixed rows); the
        engine's rows come first, in order, then any free slots that make up `min_rows`."""
        if self.fixed_rows:
            return list(range(self.slots))
        rows = list(self.row_slots)
        free = [slot for slot in range(self.cache_slots) if slot not in rows]
        return rows + free[: max(0, self.min_rows - len(rows))] if rows else rows

    def forward_row(self, row: int) -> int:
        """Return which forward row holds the engine's `row`."""
        return self.row_slots[row] if self.fixed_rows else row

    def add(self, prompt_cache: DynamicCache, start: int, length: int) -> None:
        """Add a row: a prompt's `length` columns from `start` of a prefill cache (batch of one), into a free slot."""
        slot = next(s for s in range(self.slots) if s not in self.row_slots)
        if not self.keys:
            self._allocate(prompt_cache)
        self._reserve(length)
        columns = slice(start, start + length)
        for layer, prompt_layer in enumerate(prompt_cache.layers):
            self.keys[layer][slot, :, :length] = prompt_layer.keys[0, :, columns]
            self.values[layer][slot, :, :length] = prompt_layer.values[0, :, columns]
        self.lengths[slot] = length
        self.row_slots.append(slot)

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (in this order) and free the others' slots."""
        kept = [self.row_slots[row] for row in rows]
        for slot in set(self.row_slots) - set(kept):
            self.lengths[slot] = 0
        self.row_slots = kept
        if not kept:  # an idle engine holds no cache, however long its last batch ran
            self.keys, self.values = [], []

    def step_inputs(self) -> dict:
        """Return the forward arguments for one new token per forward row, and count those tokens in."""
        slots = self.forward_slots()
        positions = [self.lengths[slot] for slot in slots]
        self._reserve(max(positions) + 1)
        device = self.keys[0].device
        slot_index = torch.tensor(slots, device=device)
        self._writes = (slot_index, torch.tensor(positions, device=device))
        for slot in self.row_slots:
            self.lengths[slot] += 1
        rows = SlotRows(
            slots=slots,
            lengths=[position + 1 for position in positions],
            exact=self.exact,
            slot_index=slot_index,
            identity=slots == list(range(self.cache_slots)),
        )
        return {"attention_mask": dict(NO_MASKS), "position_ids": self._writes[1][:, None], "cache": self,
                "slot_rows": rows}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write the step's new keys and values at each row's position; return the layer's whole cache."""
        slots, columns = self._writes
        self.keys[layer_idx][slots, :, columns] = key_states[:, :, 0]
        self.values[layer_idx][slots, :, columns] = value_states[:, :, 0]
        return self.keys[layer_idx], self.values[layer_idx]

    def _allocate(self, prompt_cache: DynamicCache) -> None:
        for prompt_layer in prompt_cache.layers:
            _, heads, _, dim = prompt_layer.keys.shape
            shape = (self.cache_slots, heads, 0, dim)
            self.keys.append(prompt_layer.keys.new_zeros(shape))
            self.values.append(prompt_layer.values.new_zeros(shape))

    def _reserve(self, columns: int) -> None:
        """Make every slot hold at least `columns` columns."""
        capacity = self.keys[0].shape[2]
        if columns <= capacity:
            return
        grow = (0, 0, 0, -(-columns // GROW_COLUMNS) * GROW_COLUMNS - capacity)  # whole GROW_COLUMNS blocks
        self.keys = [torch.nn.functional.pad(keys, grow) for keys in self.keys]
        self.values = [torch.nn.functional.pad(values, grow) for values in self.values]


def slot_attention(
    module, query, key, value, attention_mask, *, slot_rows: SlotRows | None = None,
    prefill_segments: PrefillSegments | None = None, **kwargs,
):
    """Attention for a slot-cache decode step or packed prefill; any other call (training) is plain SDPA."""
    if slot_rows is None and prefill_segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    window = kwargs.pop("sliding_window", None)
    if prefill_segments is not None:
        return _segment_attention(module, query, key, value, prefill_segments, window, kwargs), None
    if slot_rows.exact:
        # Each row's call sees its span's columns (gathered: contiguous, whatever the slot) and its
        # own mask; SDPA computes batch rows independently, so the row gets what it gets alone.
        output = query.new_empty(query.shape[0], query.shape[2], query.shape[1], value.shape[-1])
        for columns, rows, slots, mask in slot_rows.span_groups(window):
            keys, values = (cache[:, :, columns].index_select(0, slots) for cache in (key, value))
            output[rows], _ = sdpa_attention_forward(module, query.index_select(0, rows), keys, values, mask, **kwargs)
        return output, None
    width = max(slot_rows.lengths)
    if not slot_rows.identity:
        key, value = key.index_select(0, slot_rows.slot_index), value.index_select(0, slot_rows.slot_index)
    key, value = key[:, :, :width], value[:, :, :width]
    lengths = torch.tensor(slot_rows.lengths, device=query.device)[:, None]
    columns = torch.arange(width, device=query.device)[None, :]
    mask = columns < lengths  # a sliding layer also drops what fell out of its window
    if window:
        mask &= columns >= lengths - window
    return sdpa_attention_forward(module, query, key, value, mask[:, None, None, :], **kwargs)


def _segment_attention(
    module, query, key, value, segments: PrefillSegments, window: int | None, kwargs
) -> torch.Tensor:
    """Causal attention of each packed prompt over its own tokens: the same call as when it is prefilled alone."""
    outputs = []
    for start, length in zip(segments.starts, segments.lengths):
        # Copies, so a prompt's tensors have one layout whatever is packed around it.
        segment = [tensor[:, :, start : start + length].contiguous() for tensor in (query, key, value)]
        if window and length > WINDOW_QUERY_BLOCK:
            outputs.append(_window_attention_in_blocks(module, *segment, window, kwargs))
            continue
        mask = None  # plain causal
        if window and length > window:  # a sliding layer sees only the last `window` positions
            mask = _window_mask(length, length, 0, window, query.device)
        output, _ = sdpa_attention_forward(module, *segment, mask, **kwargs)
        outputs.append(output)
    return torch.cat(outputs, dim=1)


def _window_mask(queries: int, keys: int, offset: int, window: int, device: torch.device) -> torch.Tensor:
    """Sliding-window causal mask: query i (at position offset + i of the keys) sees the keys
    at positions within `window` before it, itself included."""
    mask = torch.ones(queries, keys, dtype=torch.bool, device=device)
    return mask.tril_(offset).triu_(offset - window + 1)[None, None]


def _window_attention_in_blocks(module, query, key, value, window: int, kwargs) -> torch.Tensor:
    """A sliding layer's attention over a long prompt, WINDOW_QUERY_BLOCK queries at a time, each
    block over the keys its window reaches.

    One mask over the whole prompt is length² (with the int64 distances it was built from, ~11
    bytes a cell: ~10 GB for a 31k-token prompt, which the context admits): a single submit could
    get a CPU worker killed for memory, and its batch-mates with it.
    """
    length = query.shape[2]
    outputs = []
    for first in range(0, length, WINDOW_QUERY_BLOCK):
        end = min(first + WINDOW_QUERY_BLOCK, length)
        reach = max(0, first - window + 1)  # the first key any query of the block sees
        mask = _window_mask(end - first, end - reach, first - reach, window, query.device)
        output, _ = sdpa_attention_forward(
            module, query[:, :, first:end], key[:, :, reach:end], value[:, :, reach:end], mask, **kwargs)
        outputs.append(output)
    return torch.cat(outputs, dim=1)


AttentionInterface.register(SLOT_ATTENTION, slot_attention)
