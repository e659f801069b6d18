"""The one-kernel greedy step (kernels/argmax.py): tokens = argmax(logits), lens += 1, against
torch.argmax on fresh random logits (ties, NaN, several slices per row, repeated launches)."""

from __future__ import annotations

import pytest
import torch

from kernforge.errors import ShapeError
from kernforge.kernels import argmax
from tests.helpers import DEVICE, randn


@pytest.mark.parametrize("vocab", [1, 37, argmax.BLOCK, 2 * argmax.BLOCK + 5], ids=str)
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_greedy_step_matches_torch_argmax(dtype, rows, vocab):
    step = argmax.GreedyStep(rows, vocab, torch.device(DEVICE))
    tokens = torch.full((rows,), -1, dtype=torch.long, device=DEVICE)
    lens = torch.randint(0, 100, (rows,), dtype=torch.int32, device=DEVICE)
    start = lens.clone()
    for i in range(2):  # the second launch finds its counters reset
        logits = randn((rows, vocab), dtype, layout="padded")  # row stride != vocab
        step(logits, tokens, lens)
        assert torch.equal(tokens, torch.argmax(logits, dim=-1)), i
        assert torch.equal(lens, start + i + 1)
    assert torch.equal(step.counters, torch.zeros_like(step.counters))


def test_greedy_step_ties_take_the_lowest_index_and_nan_counts_as_inf():
    vocab = argmax.BLOCK + 100
    logits = randn((3, vocab)).clamp(max=5.0)
    logits[0, [7, argmax.BLOCK + 3]] = 9.0  # a tie across two slices
    logits[1, [argmax.BLOCK + 50, argmax.BLOCK + 60]] = 9.0  # a tie inside one slice
    logits[2, argmax.BLOCK + 9] = float("nan")
    tokens = torch.zeros(3, dtype=torch.long, device=DEVICE)
    lens = torch.zeros(3, dtype=torch.int32, device=DEVICE)
    argmax.GreedyStep(3, vocab, torch.device(DEVICE))(logits, tokens, lens)
    assert tokens.tolist() == [7, argmax.BLOCK + 50, argmax.BLOCK + 9]
    assert torch.equal(tokens, torch.argmax(logits, dim=-1))


def test_greedy_step_errors():
    step = argmax.GreedyStep(2, 50, torch.device(DEVICE))
    tokens = torch.zeros(2, dtype=torch.long, device=DEVICE)
    lens = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ShapeError, match="logits"):
        step(randn((2, 49)), tokens, lens)
    with pytest.raises(ShapeError, match="logits"):
        step(randn((50, 2)).t(), tokens, lens)
    with pytest.raises(ShapeError, match="lens"):
        step(randn((2, 50)), tokens, lens[:1])


def test_greedy_step_torch_path_where_triton_cannot_run(monkeypatch):
    monkeypatch.setattr(argmax, "triton_reason", lambda *t: "no Triton on this device")
    logits = randn((2, 300))
    tokens = torch.full((2,), -1, dtype=torch.long, device=DEVICE)
    lens = torch.tensor([4, 9], dtype=torch.int32, device=DEVICE)
    argmax.GreedyStep(2, 300, torch.device(DEVICE))(logits, tokens, lens)
    assert torch.equal(tokens, torch.argmax(logits, dim=-1))
    assert lens.tolist() == [5, 10]
