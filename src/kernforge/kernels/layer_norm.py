"""LayerNorm: Triton kernels, autograd, torch reference.

``y = (x - mean) / sqrt(var + eps) * weight + bias`` over the last dimension; statistics in
fp32, output in the input dtype.
"""

from __future__ import annotations

import torch

from ..dispatch import register_impl
from .common import upcast


@register_impl("layer_norm", "torch")
def layer_norm_torch(x, weight, bias, eps):
    """Reference: eager torch in fp32 (fp64 for fp64 input), output in x's dtype."""
    xf = upcast(x)
    mean = xf.mean(-1, keepdim=True)
    var = (xf - mean).pow(2).mean(-1, keepdim=True)
    y = (xf - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(xf.dtype)
    if bias is not None:
        y = y + bias.to(xf.dtype)
    return y.to(x.dtype)
