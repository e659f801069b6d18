"""Softmax and log-softmax: Triton kernels, autograd, torch reference."""

from __future__ import annotations

import torch

from ..dispatch import register_impl


@register_impl("softmax", "torch")
def softmax_torch(x, dim):
    """Reference: torch.softmax (accumulates in fp32 for half inputs)."""
    return torch.softmax(x, dim)


@register_impl("log_softmax", "torch")
def log_softmax_torch(x, dim):
    """Reference: torch.log_softmax."""
    return torch.log_softmax(x, dim)
