"""Gated linear units: silu_and_mul, swiglu, geglu (tanh and exact). Triton kernels, autograd,
torch reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..dispatch import register_impl


@register_impl("silu_and_mul", "torch")
def silu_and_mul_torch(x):
    """Reference: ``silu(x[..., :d]) * x[..., d:]`` in eager torch."""
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


@register_impl("swiglu", "torch")
def swiglu_torch(gate, up):
    """Reference: ``silu(gate) * up``."""
    return F.silu(gate) * up


@register_impl("geglu", "torch")
def geglu_torch(gate, up, approximate):
    """Reference: ``gelu(gate, approximate) * up``."""
    return F.gelu(gate, approximate=approximate) * up
