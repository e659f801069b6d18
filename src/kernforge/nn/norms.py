"""Normalisation layers on kernforge's kernels: ``RMSNorm`` (Hugging Face's ``LlamaRMSNorm``
names) and ``LayerNorm`` (``torch.nn.LayerNorm``'s names).

Both keep the attribute and state-dict names of the layer they replace, and their forwards
read nothing else, so an existing instance can be switched over by assigning ``__class__``
(how :func:`kernforge.patch` converts a Hugging Face model in place).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import ops
from ..errors import ArgumentError, ShapeError


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension: ``x / sqrt(mean(x**2) + eps) * weight``.

    Replaces Hugging Face's ``LlamaRMSNorm`` (and the Mistral/Qwen2/Qwen3 copies of it):
    parameter ``weight`` [hidden_size] (ones at init), attribute ``variance_epsilon``;
    state dict ``{"weight"}``. ``forward(x, residual=None)`` runs :func:`kernforge.ops.rms_norm`
    and returns ``y`` in x's dtype, or with ``residual`` the pair ``(y, x + residual)``
    (the pre-norm residual add fused into the norm). Statistics are in fp32; the result can
    differ from Hugging Face's by one rounding of x's dtype (Hugging Face rounds the normalised
    value before multiplying by the weight, the kernel rounds once at the end).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, device=None, dtype=None) -> None:
        super().__init__()
        if not isinstance(hidden_size, int) or hidden_size < 1:
            raise ArgumentError(f"RMSNorm: hidden_size={hidden_size!r}; use a positive int")
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.variance_epsilon = float(eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """``ops.rms_norm(x, weight, eps)``; with ``residual``, ``(y, x + residual)``."""
        return ops.rms_norm(x, self.weight, self.variance_epsilon, residual)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class LayerNorm(nn.LayerNorm):
    """``torch.nn.LayerNorm`` on :func:`kernforge.ops.layer_norm`.

    Same constructor, attributes (``normalized_shape``, ``eps``, ``elementwise_affine``,
    ``weight``, ``bias``) and state dict as torch's; it subclasses it, so it is one wherever
    code checks ``isinstance(m, nn.LayerNorm)``. A normalized_shape of several dimensions
    normalises over their flattened span (the same numbers), one kernel pass per row.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """LayerNorm of x over its last ``len(normalized_shape)`` dimensions, in x's dtype."""
        shape = tuple(self.normalized_shape)
        weight, bias = self.weight, self.bias
        if len(shape) == 1:
            return ops.layer_norm(x, weight, bias, self.eps)
        if tuple(x.shape[x.dim() - len(shape) :]) != shape:
            raise ShapeError(
                f"LayerNorm: input of shape {tuple(x.shape)} does not end with normalized_shape "
                f"{shape}; pass an input whose trailing dimensions are {shape}"
            )
        # Normalising over k trailing dims is normalising over their flattened product.
        n = math.prod(shape)
        flat = x.reshape(*x.shape[: x.dim() - len(shape)], n)
        y = ops.layer_norm(
            flat,
            None if weight is None else weight.reshape(n),
            None if bias is None else bias.reshape(n),
            self.eps,
        )
        return y.reshape(x.shape)
