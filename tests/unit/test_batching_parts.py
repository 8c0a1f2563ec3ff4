"""The batching engine's parts without a model: the slot KV cache and its attention, samplers,
the dtype rule and the --concurrency option."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from services.cli import build_parser
from workers import row_invariance
from workers.batch_engine import Sequence, _packs
from workers.model_loader import generation_dtype
from workers.row_invariance import invariant_rows
from workers.sampling import Sampler
from workers.slot_cache import GROW_COLUMNS, SPAN_COLUMNS, PrefillSegments, SlotCache, SlotRows, slot_attention

LAYERS, HEADS, DIM = 2, 1, 4


def prompt_cache(length: int, fill: float) -> DynamicCache:
    """A one-prompt prefill cache: `length` columns of `fill` in every layer."""
    cache = DynamicCache()
    for layer in range(LAYERS):
        keys = torch.full((1, HEADS, length, DIM), fill)
        cache.update(keys.clone(), keys.clone(), layer)
    return cache


def test_each_row_takes_a_free_slot_from_column_0_and_leaving_frees_it_without_a_copy():
    batch = SlotCache(slots=3, exact=True, fixed_rows=False)
    batch.add(prompt_cache(3, fill=1.0), 0, 3)
    batch.add(prompt_cache(5, fill=2.0), 0, 5)
    assert batch.rows == 2 and batch.row_slots == [0, 1] and batch.lengths == [3, 5, 0]
    keys = batch.keys[0]
    assert keys[0, 0, :, 0].tolist()[:5] == [1, 1, 1, 0, 0]  # from column 0, not moved
    assert keys[1, 0, :5, 0].tolist() == [2] * 5
    batch.keep([1])
    assert batch.row_slots == [1] and batch.lengths == [0, 5, 0]
    assert batch.keys[0] is keys  # nothing copied
    batch.add(prompt_cache(2, fill=3.0), 0, 2)
    assert batch.row_slots == [1, 0]  # the freed slot is taken again
    assert batch.keys[1][0, 0, :3, 0].tolist() == [3, 3, 1]  # columns past its length are never read
    batch.keep([])
    assert batch.rows == 0 and batch.keys == [] and batch.lengths == [0, 0, 0]  # memory given back


def test_a_packed_prompt_is_copied_from_its_own_columns():
    packed = DynamicCache()
    for layer in range(LAYERS):
        keys = torch.arange(5.0)[None, None, :, None].expand(1, HEADS, 5, DIM).clone()
        packed.update(keys, keys.clone(), layer)
    batch = SlotCache(slots=2, exact=True, fixed_rows=False)
    batch.add(packed, 0, 2)
    batch.add(packed, 2, 3)
    assert batch.keys[1][0, 0, :2, 0].tolist() == [0, 1]
    assert batch.keys[1][1, 0, :3, 0].tolist() == [2, 3, 4]
    assert batch.lengths == [2, 3]


def test_a_decode_step_writes_each_rows_token_at_its_own_position():
    batch = SlotCache(slots=3, exact=True, fixed_rows=False)
    batch.add(prompt_cache(1, fill=1.0), 0, 1)
    batch.add(prompt_cache(3, fill=1.0), 0, 3)
    inputs = batch.step_inputs()
    assert inputs["position_ids"].tolist() == [[1], [3]]
    assert inputs["slot_rows"].slots == [0, 1] and inputs["slot_rows"].lengths == [2, 4]
    keys, _ = batch.update(torch.full((2, HEADS, 1, DIM), 9.0), torch.zeros(2, HEADS, 1, DIM), 0)
    assert keys[0, 0, :2, 0].tolist() == [1, 9] and keys[1, 0, :4, 0].tolist() == [1, 1, 1, 9]
    assert batch.lengths == [2, 4, 0]


def test_without_fixed_rows_a_lone_row_steps_beside_a_free_slot():
    lone = SlotCache(slots=1, exact=True, fixed_rows=False, min_rows=2)
    lone.add(prompt_cache(3, fill=1.0), 0, 3)
    assert lone.forward_slots() == [0, 1] and lone.forward_row(0) == 0  # a spare slot beyond `slots`
    inputs = lone.step_inputs()
    assert inputs["position_ids"].tolist() == [[3], [0]] and lone.lengths == [4, 0]
    assert lone.keys[0].shape[0] == 2
    pair = SlotCache(slots=3, exact=True, fixed_rows=False, min_rows=2)
    pair.add(prompt_cache(1, fill=1.0), 0, 1)
    pair.add(prompt_cache(2, fill=1.0), 0, 2)
    assert pair.forward_slots() == [0, 1]  # rows enough of its own
    pair.keep([1])
    assert pair.forward_slots() == [1, 0]  # the engine's row first, then a free slot


def test_with_fixed_rows_every_step_runs_every_slot_and_the_cache_grows():
    batch = SlotCache(slots=3, exact=True, fixed_rows=True)
    batch.add(prompt_cache(GROW_COLUMNS, fill=1.0), 0, GROW_COLUMNS)
    batch.add(prompt_cache(2, fill=1.0), 0, 2)
    batch.keep([1])  # slot 1 stays, slot 0 is free
    assert batch.forward_slots() == [0, 1, 2] and batch.forward_row(0) == 1
    inputs = batch.step_inputs()
    assert inputs["position_ids"].tolist() == [[0], [2], [0]]  # free slots run a dummy token at 0
    assert batch.lengths == [0, 3, 0]
    batch.add(prompt_cache(GROW_COLUMNS, fill=1.0), 0, GROW_COLUMNS)
    batch.step_inputs()
    assert batch.keys[1].shape[2] == 2 * GROW_COLUMNS  # room for the new column


@pytest.mark.parametrize("window", [None, 3])
def test_exact_attention_is_each_row_alone_and_batched_attention_agrees(window):
    torch.manual_seed(0)
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    # Rows 0, 1 and 3 share the first span's call; row 2 reaches into the second span.
    lengths, slots = [5, 2, SPAN_COLUMNS + 7, 5], [2, 0, 1, 3]
    query = torch.randn(4, 4, 1, DIM)
    key, value = torch.randn(4, 2, 2 * SPAN_COLUMNS, DIM), torch.randn(4, 2, 2 * SPAN_COLUMNS, DIM)

    def attend(exact, rows_slots, rows_lengths, q):
        rows = SlotRows(rows_slots, rows_lengths, exact, torch.tensor(rows_slots), rows_slots == [0, 1, 2, 3])
        return slot_attention(module, q, key, value, None, slot_rows=rows, sliding_window=window, scaling=0.5)[0]

    exact = attend(True, slots, lengths, query)
    for row in range(4):
        alone = attend(True, [slots[row]], [lengths[row]], query[row : row + 1])
        assert torch.equal(exact[row : row + 1], alone)
    torch.testing.assert_close(attend(False, slots, lengths, query), exact)
    # Row 0 by hand: its slot's columns in its window, each key head shared by two query heads.
    columns = slice(5 - window if window else 0, 5)
    row_keys, row_values = (t[2, :, columns].repeat_interleave(2, 0) for t in (key, value))
    weights = torch.softmax(torch.einsum("hd,hcd->hc", query[0, :, 0], row_keys) * 0.5, dim=-1)
    torch.testing.assert_close(exact[0, 0], torch.einsum("hc,hcd->hd", weights, row_values))


@pytest.mark.parametrize("window", [None, 2])
def test_packed_prompts_attend_only_to_their_own_tokens_as_when_alone(window):
    torch.manual_seed(1)
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    lengths = [3, 1, 4]
    query, key, value = torch.randn(1, 4, 8, DIM), torch.randn(1, 2, 8, DIM), torch.randn(1, 2, 8, DIM)

    def attend(q, k, v, segments):
        return slot_attention(module, q, k, v, None, prefill_segments=segments, sliding_window=window, scaling=0.5)[0]

    packed = attend(query, key, value, PrefillSegments([0, 3, 4], lengths))
    assert packed.shape == (1, 8, 4, DIM)
    alone = attend(query[:, :, 4:], key[:, :, 4:], value[:, :, 4:], PrefillSegments([0], [4]))
    assert torch.equal(packed[:, 4:], alone)
    # The last prompt's last token by hand: its own keys only, within the window.
    first = 4 + (4 - window if window else 0)
    row_keys, row_values = (t[0, :, first:8].repeat_interleave(2, 0) for t in (key, value))
    weights = torch.softmax(torch.einsum("hd,hcd->hc", query[0, :, 7], row_keys) * 0.5, dim=-1)
    torch.testing.assert_close(packed[0, 7], torch.einsum("hc,hcd->hd", weights, row_values))


def test_joining_prompts_pack_in_order_up_to_a_token_budget():
    def sequence(length: int) -> Sequence:
        return Sequence([0] * length, {}, Sampler({"temperature": 0}, torch.device("cpu")), None, None, None, None)

    joining = [sequence(10), sequence(12), sequence(11), sequence(40), sequence(3)]
    assert [[len(s.prompt_ids) for s in pack] for pack in _packs(joining, 32)] == [[10, 12], [11], [40], [3]]
    assert [len(pack) for pack in _packs(joining, 1)] == [1, 1, 1, 1, 1]


@pytest.mark.parametrize("changes_above, expected", [(None, 32), (16, 16), (3, 1)])
def test_prompts_pack_only_up_to_the_rows_this_cpus_products_keep_bits_at(monkeypatch, changes_above, expected):
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.Linear(48, 64), torch.nn.Linear(64, 1000))
    plain = torch.nn.functional.linear

    def blas(x, weight, bias=None):
        """A BLAS (outside the product) that rounds differently above `changes_above` rows. On
        whole numbers every order of summation gives the same bits, so only that rule decides."""
        out = plain(torch.round(x * 4), torch.round(weight * 16), bias)
        return out + 0.5 if changes_above is not None and x.shape[0] > changes_above else out

    monkeypatch.setattr(row_invariance.torch.nn.functional, "linear", blas)
    assert invariant_rows(model, skip=model[2]) == expected


def test_an_adapters_lora_layers_on_the_base_model_do_not_limit_its_packing(monkeypatch):
    """Measured while an adapter was loaded first, its float32 LoRA layers made every base prompt
    prefill alone for the engine's life."""

    class LoraLinear(torch.nn.Module):
        """What peft leaves in a base model's place: the base layer, and the adapter's layers."""

        def __init__(self):
            super().__init__()
            self.base_layer = torch.nn.Linear(64, 48)
            self.lora_A = torch.nn.ModuleDict({"ft-x": torch.nn.Linear(64, 4)})
            self.lora_B = torch.nn.ModuleDict({"ft-x": torch.nn.Linear(4, 48)})

    model = torch.nn.Sequential(LoraLinear(), torch.nn.Linear(48, 1000))
    plain = torch.nn.functional.linear

    def blas(x, weight, bias=None):
        """A BLAS (outside the product) that keeps bits at any rows but for the LoRA layers' shapes."""
        out = plain(torch.round(x * 4), torch.round(weight * 16), bias)
        return out + 0.5 if x.shape[0] > 1 and 4 in weight.shape else out

    monkeypatch.setattr(row_invariance.torch.nn.functional, "linear", blas)
    assert invariant_rows(model, skip=model[1]) == 32


def test_greedy_and_seeded_sampling():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    history = torch.tensor([1])
    assert Sampler({"temperature": 0}, torch.device("cpu")).pick(logits, history) == 1
    # The penalty divides positive scores already seen (3.0 -> 1.5), so token 2 wins.
    assert Sampler({"temperature": 0, "repetition_penalty": 2.0}, torch.device("cpu")).pick(logits, history) == 2
    sampler = Sampler({"temperature": 1.0, "seed": 3}, torch.device("cpu"))
    same_seed = Sampler({"temperature": 1.0, "seed": 3}, torch.device("cpu"))
    other_seed = Sampler({"temperature": 1.0, "seed": 4}, torch.device("cpu"))
    first = [sampler.pick(logits, history) for _ in range(40)]
    assert first == [same_seed.pick(logits, history) for _ in range(40)]
    assert first != [other_seed.pick(logits, history) for _ in range(40)]


def test_a_temperature_near_zero_decodes_greedily_instead_of_overflowing():
    """Logits over a temperature of 1e-40 were inf, and sampling from them raised: the whole batch failed."""
    logits = torch.tensor([30.0, 31.0, -20.0])
    for temperature in (1e-40, 1e-6):
        sampler = Sampler({"temperature": temperature, "seed": 1}, torch.device("cpu"))
        assert sampler.greedy and sampler.pick(logits, torch.tensor([0])) == 1
    assert not Sampler({"temperature": 1e-4, "seed": 1}, torch.device("cpu")).greedy


def test_top_k_and_top_p_keep_only_the_likely_tokens():
    logits = torch.tensor([5.0, 4.0, 0.0, -2.0, -3.0])
    history = torch.tensor([0])
    top_k = Sampler({"temperature": 1.0, "top_k": 2, "seed": 1}, torch.device("cpu"))
    assert {top_k.pick(logits, history) for _ in range(200)} <= {0, 1}
    top_p = Sampler({"temperature": 1.0, "top_p": 0.5, "seed": 1}, torch.device("cpu"))
    assert {top_p.pick(logits, history) for _ in range(50)} == {0}  # the first token alone reaches 0.5


@pytest.mark.parametrize("settings", [{"top_p": 1e-50}, {"repetition_penalty": 1e-38}, {"top_p": 5e-324},
                                      {"repetition_penalty": 1e-38, "temperature": 1e-5}])
def test_extreme_settings_the_schema_accepts_still_sample_a_token(settings):
    """A top_p that is 0 in float32 dropped every token, and a seen logit over a penalty near zero
    overflowed: softmax gave NaNs, and the raise failed every job in the batch."""
    logits = torch.tensor([5.0, 4.0, 0.0, -2.0, -3.0])
    history = torch.tensor([0, 3])
    sampler = Sampler({"temperature": 1.0, "seed": 1, **settings}, torch.device("cpu"))
    picked = {sampler.pick(logits, history) for _ in range(20)}
    # Nucleus of the first token alone; or the seen token 0, its score huge after the penalty.
    assert picked == {0}


def test_cpu_workers_batch_in_bf16_only_where_the_cpu_has_bf16_dot_products():
    cpu = torch.device("cpu")
    assert generation_dtype(cpu, 1, bf16_dot=False) == torch.bfloat16
    assert generation_dtype(cpu, 8, bf16_dot=False) == torch.float32
    assert generation_dtype(cpu, 8, bf16_dot=True) == torch.bfloat16
    assert generation_dtype(cpu, 8, "bfloat16") == torch.bfloat16
    assert generation_dtype(cpu, 1, "float32") == torch.float32


@pytest.mark.parametrize("value", ["0", "65", "-1", "two", "1.5"])
def test_concurrency_must_be_a_whole_number_from_1_to_64(value, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["worker", "--concurrency", value])
    assert "must be a whole number from 1 to 64" in capsys.readouterr().err


def test_concurrency_is_parsed():
    assert build_parser().parse_args(["worker", "--concurrency", "16"]).concurrency == 16
    assert build_parser().parse_args(["worker"]).concurrency is None


def test_a_long_prompts_sliding_window_attention_is_computed_in_blocks_of_queries(monkeypatch):
    """One mask over a whole 31k-token prompt (which the context admits) took ~10 GB: a single
    submit could get a CPU worker killed. Blocks give the attention the whole mask gives."""
    from types import SimpleNamespace

    from workers import slot_cache

    monkeypatch.setattr(slot_cache, "WINDOW_QUERY_BLOCK", 96)
    built = []
    window_mask = slot_cache._window_mask
    monkeypatch.setattr(slot_cache, "_window_mask", lambda *args: built.append(args[:2]) or window_mask(*args))
    torch.manual_seed(0)
    length, window, heads, dim = 250, 40, 2, 16
    query, key, value = (torch.randn(1, heads, length, dim) for _ in range(3))
    module = SimpleNamespace(is_causal=True, num_key_value_groups=1, training=False)
    output = slot_cache._segment_attention(module, query, key, value, PrefillSegments([0], [length]), window,
                                           {"dropout": 0.0, "scaling": dim**-0.5})
    position = torch.arange(length)
    distance = position[:, None] - position[None, :]
    scores = (query @ key.transpose(-1, -2)) * dim**-0.5
    scores = scores.masked_fill(~((distance >= 0) & (distance < window)), float("-inf"))
    expected = (scores.softmax(-1) @ value).transpose(1, 2)
    torch.testing.assert_close(output, expected)
    assert built == [(96, 96), (96, 96 + window - 1), (58, 58 + window - 1)]
