"""Rotary position embedding (rotate-half, as Hugging Face's ``apply_rotary_pos_emb``): Triton
kernels, autograd, torch reference."""

from __future__ import annotations

import torch

from ..dispatch import register_impl


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_tables(cos, sin, position_ids, batch: int, seq: int, layout: str):
    """cos/sin rows for every (batch, position), shaped to broadcast against q in ``layout``."""
    if position_ids is None:
        cos, sin = cos[..., :seq, :], sin[..., :seq, :]
    else:
        pos = position_ids.reshape(-1, seq).expand(batch, seq).long()
        if cos.dim() == 2:
            cos, sin = cos[pos], sin[pos]
        else:
            idx = pos[..., None].expand(batch, seq, cos.shape[-1])
            cos = cos.expand(batch, *cos.shape[1:]).gather(1, idx)
            sin = sin.expand(batch, *sin.shape[1:]).gather(1, idx)
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    head_axis = 2 if layout == "bshd" else 1
    return cos.unsqueeze(head_axis), sin.unsqueeze(head_axis)


@register_impl("rope", "torch")
def rope_torch(q, k, cos, sin, position_ids, layout):
    """Reference: Hugging Face's formula, with partial rotary over the first rot_dim features."""
    s_ax = 1 if layout == "bshd" else 2
    c, s = rope_tables(cos, sin, position_ids, q.shape[0], q.shape[s_ax], layout)
    rot = cos.shape[-1]

    def apply(x):
        xr, xp = x[..., :rot], x[..., rot:]
        out = (xr * c + _rotate_half(xr) * s).to(x.dtype)
        return torch.cat((out, xp), dim=-1) if xp.shape[-1] else out

    return apply(q), apply(k)
