"""The batching engine's parts without a model: the batch KV cache, samplers, prefill chunks,
the dtype rule and the --concurrency option."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from services.cli import build_parser
from workers.batch_cache import TRIM_AFTER_COLUMNS, BatchCache
from workers.batch_engine import PREFILL_TOKENS, Sequence, _prefill_chunks
from workers.model_loader import generation_dtype
from workers.sampling import Sampler

LAYERS, HEADS, DIM = 2, 1, 4


def rows_cache(lengths: list[int], fill: float) -> tuple[DynamicCache, torch.Tensor]:
    """A left-padded cache of rows with these real lengths (padding zero, real entries `fill`)."""
    width = max(lengths)
    valid = torch.tensor([[column >= width - length for column in range(width)] for length in lengths])
    cache = DynamicCache()
    for layer in range(LAYERS):
        keys = valid[:, None, :, None].float().expand(len(lengths), HEADS, width, DIM) * fill
        cache.update(keys.clone(), keys.clone(), layer)
    return cache, valid


def test_rows_of_different_lengths_are_left_padded_to_one_width():
    batch = BatchCache(sliding_window=None)
    batch.add(*rows_cache([3], fill=1.0))
    batch.add(*rows_cache([5, 2], fill=2.0))
    assert batch.rows == 3
    assert batch.valid.tolist() == [
        [False, False, True, True, True],
        [True, True, True, True, True],
        [False, False, False, True, True],
    ]
    assert batch.positions.tolist() == [3, 5, 2]
    keys = batch.cache.layers[0].keys
    assert keys.shape == (3, HEADS, 5, DIM)
    assert keys[0, 0, :, 0].tolist() == [0, 0, 1, 1, 1]  # the first row moved right, not changed


def test_a_decode_step_masks_padding_and_the_sliding_window():
    batch = BatchCache(sliding_window=2)
    batch.add(*rows_cache([1, 3], fill=1.0))
    inputs = batch.step_inputs()
    assert inputs["position_ids"].tolist() == [[1], [3]]
    assert batch.positions.tolist() == [2, 4]
    full = inputs["attention_mask"]["full_attention"][:, 0, 0, :]
    sliding = inputs["attention_mask"]["sliding_attention"][:, 0, 0, :]
    assert full.tolist() == [[False, False, True, True], [True, True, True, True]]
    assert sliding.tolist() == [[False, False, True, True], [False, False, True, True]]


def test_rows_leave_and_padding_columns_are_trimmed():
    batch = BatchCache(sliding_window=None)
    batch.add(*rows_cache([TRIM_AFTER_COLUMNS + 10, 4], fill=1.0))
    batch.keep([1])
    assert batch.rows == 1
    assert batch.valid.shape[1] == 4  # the other row's padding columns are gone
    assert batch.cache.layers[1].keys.shape[2] == 4
    assert batch.positions.tolist() == [4]
    batch.keep([])
    assert batch.rows == 0 and batch.cache is None


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


def test_top_k_and_top_p_keep_only_the_likely_tokens():
    logits = torch.tensor([5.0, 4.0, 0.0, -2.0, -3.0])
    history = torch.tensor([0])
    top_k = Sampler({"temperature": 1.0, "top_k": 2, "seed": 1}, torch.device("cpu"))
    assert {top_k.pick(logits, history) for _ in range(200)} <= {0, 1}
    top_p = Sampler({"temperature": 1.0, "top_p": 0.5, "seed": 1}, torch.device("cpu"))
    assert {top_p.pick(logits, history) for _ in range(50)} == {0}  # the first token alone reaches 0.5


def sequence(prompt_length: int) -> Sequence:
    return Sequence([0] * prompt_length, {}, Sampler({"temperature": 0}, torch.device("cpu")), None, None, None, None)


def test_joining_prompts_are_prefilled_together_up_to_a_token_budget():
    short = [sequence(10) for _ in range(3)]
    chunks = _prefill_chunks(short)
    assert [len(chunk) for chunk in chunks] == [3]
    big = PREFILL_TOKENS // 2
    chunks = _prefill_chunks([sequence(big), sequence(big), sequence(big), sequence(5)])
    assert [len(chunk) for chunk in chunks] == [2, 2]  # 2 x big fits, a third does not


def test_cpu_workers_batch_in_fp32_and_run_single_jobs_in_bf16():
    cpu = torch.device("cpu")
    assert generation_dtype(cpu, 1) == torch.bfloat16
    assert generation_dtype(cpu, 8) == torch.float32
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
