"""The greedy screen's pick is the exact argmax, also on near ties where the bf16 estimates
alone pick another token, and it does not depend on the other rows of the batch."""

from __future__ import annotations

import torch

from workers.greedy_screen import GreedyScreen


def _exact_argmax(weight: torch.Tensor, hidden: torch.Tensor) -> list[int]:
    return (hidden.double() @ weight.double().T).argmax(dim=1).tolist()


def test_the_pick_is_the_exact_argmax_on_near_ties_that_need_the_error_margin():
    generator = torch.Generator().manual_seed(7)
    vocab, width, rows = 4096, 64, 256
    weight = torch.randn(vocab, width, generator=generator) / width**0.5
    hidden = torch.randn(rows, width, generator=generator) * 30
    # Near ties: half the rows' exact best token gets a rival that differs from it by a hair.
    for row, token in enumerate(_exact_argmax(weight, hidden)[:128]):
        weight[(token + 1 + row) % vocab] = weight[token] + 1e-3 * torch.randn(width, generator=generator)
    expected = _exact_argmax(weight, hidden)

    screen = GreedyScreen(weight)
    assert screen.pick(hidden) == expected

    screen.error_per_norm = 0.0  # keep only the tokens whose estimate ties the best estimate
    assert screen.pick(hidden) != expected, "these ties no longer need the margin; make them closer"


def test_a_row_alone_gets_the_same_pick_as_in_a_batch():
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(2048, 32, generator=generator).to(torch.bfloat16).float()  # as Gemma's are
    hidden = torch.randn(16, 32, generator=generator) * 10
    screen = GreedyScreen(weight)
    batched = screen.pick(hidden)
    assert batched == _exact_argmax(weight, hidden)
    assert [screen.pick(hidden[row : row + 1])[0] for row in range(16)] == batched


def test_a_broken_row_falls_back_to_the_plain_argmax_and_leaves_the_others_alone():
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(8192, 32, generator=generator)
    hidden = torch.randn(4, 32, generator=generator)
    expected = _exact_argmax(weight, hidden)
    hidden[1, 3] = float("nan")
    hidden[2, 0] = float("inf")
    hidden[3] = 0.0  # every logit ties: more candidates than MAX_CANDIDATES

    picks = GreedyScreen(weight).pick(hidden)

    assert picks[0] == expected[0]
    assert picks[1:] == [int((weight @ hidden[row]).argmax()) for row in (1, 2, 3)]
