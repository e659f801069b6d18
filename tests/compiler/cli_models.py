"""Model factories for the CLI tests (``kernforge compile tests/compiler/cli_models.py:NAME``)."""

from __future__ import annotations

import torch


def tiny_mlp() -> torch.nn.Module:
    """Linear -> ReLU -> Linear on 8 features, seeded random weights."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def not_a_model():
    return 42
