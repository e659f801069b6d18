"""Rotary position embeddings: ``RotaryEmbedding`` (the cos/sin tables, as Hugging Face's
``LlamaRotaryEmbedding``) and ``apply_rotary_pos_emb`` (a drop-in for transformers' function of
that name, running :func:`kernforge.ops.rope`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .. import ops
from ..errors import ArgumentError, ShapeError, UnsupportedError
from ..kernels.rope import rotate_half

#: rope_type values :class:`RotaryEmbedding` computes (Hugging Face's names).
ROPE_TYPES = ("default", "linear", "llama3")


def _hf_formula(q, k, cos, sin, unsqueeze_dim):
    """Hugging Face's eager formula, for inputs the kernel does not express."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


#: unsqueeze_dim -> the axis of the heads in q and k (1: [B, H, S, D]; 2: [B, S, H, D]).
_HEAD_AXIS = {1: 1, -3: 1, 2: 2, -2: 2}


def _formula_only(q, k, cos, sin) -> bool:
    """Whether these inputs need Hugging Face's formula: the kernel gives cos/sin no gradient,
    returns q's dtype (the formula promotes mixed dtypes), and takes cos/sin as [B | 1, S, R] or
    [S, R] tables only. Shapes that fit neither are left to ops.rope, which says what is wrong."""
    if not (isinstance(cos, torch.Tensor) and isinstance(sin, torch.Tensor)):
        return True
    if cos.dim() not in (2, 3) or sin.dim() != cos.dim():
        return True
    if cos.requires_grad or sin.requires_grad:
        return True
    return not (q.dtype == k.dtype == cos.dtype == sin.dtype)


def apply_rotary_pos_emb(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    unsqueeze_dim: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k by cos/sin (rotate-half): a drop-in for transformers'
    ``apply_rotary_pos_emb``, on :func:`kernforge.ops.rope`.

    ``unsqueeze_dim=1``: q [B, Hq, S, D] and k [B, Hk, S, D] (Hugging Face passes transposed
    views of [B, S, H, D] projections: they are read in place, and the results come back with
    the same memory layout). ``unsqueeze_dim=2``: q and k are [B, S, H, D]. cos/sin are
    [B, S, R] (already gathered per position, as the rotary embedding returns them) or [S, R];
    R < D rotates the first R features and passes the rest through; a [S', R] table may have
    more rows than S (the first S are used). Gradients flow to q and k. Inputs the kernel does
    not express (cos/sin needing a gradient, dtypes that differ, q/k not 4-D, other unsqueeze
    dims, cos/sin of other ranks) run Hugging Face's formula instead; shapes that do not match
    raise ``ShapeError``.
    """
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"apply_rotary_pos_emb: {name} must be a torch.Tensor, got "
                            f"{type(t).__name__}")  # fmt: skip
    axis = _HEAD_AXIS.get(unsqueeze_dim) if q.dim() == 4 and k.dim() == 4 else None
    if axis is None:
        return _hf_formula(q, k, cos, sin, unsqueeze_dim)
    # Logical [B, S, H, D] views (no copies).
    qs, ks = (q.transpose(1, 2), k.transpose(1, 2)) if axis == 1 else (q, k)
    if _formula_only(qs, ks, cos, sin):
        return _hf_formula(q, k, cos, sin, unsqueeze_dim)
    # Run the kernel in the layout q is stored in, so that the (contiguous) outputs have q's
    # memory order: heads inside tokens ([B, S, H, D] memory) or tokens inside heads.
    if qs.stride(2) <= qs.stride(1):
        qo, ko = ops.rope(qs, ks, cos, sin, None, "bshd")
    else:
        qo, ko = ops.rope(qs.transpose(1, 2), ks.transpose(1, 2), cos, sin, None, "bhsd")
        qo, ko = qo.transpose(1, 2), ko.transpose(1, 2)
    return (qo.transpose(1, 2), ko.transpose(1, 2)) if axis == 1 else (qo, ko)


def _inv_freq(dim: int, base: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies [dim // 2] (fp32, CPU) for ``scaling``'s rope_type, computed as
    Hugging Face's ``ROPE_INIT_FUNCTIONS`` compute them."""
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rope_type = "default" if scaling is None else scaling.get("rope_type", "default")
    if rope_type == "default":
        return inv
    if rope_type == "linear":
        return inv / scaling["factor"]
    if rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise UnsupportedError(
        f"RotaryEmbedding: rope_type={rope_type!r} is not supported; use one of "
        f"{', '.join(ROPE_TYPES)} (or keep the model's own rotary embedding)"
    )


class RotaryEmbedding(nn.Module):
    """The rotary cos/sin tables of Hugging Face's ``LlamaRotaryEmbedding``.

    ``RotaryEmbedding(head_dim, max_position_embeddings=2048, base=10000.0, scaling=None)``:
    ``head_dim`` is the rotated dimension (even), ``base`` the rope theta, ``scaling`` None or
    a dict like Hugging Face's ``rope_parameters`` with ``rope_type`` "default", "linear"
    (``factor``) or "llama3" (``factor``, ``low_freq_factor``, ``high_freq_factor``,
    ``original_max_position_embeddings``). ``inv_freq`` is a non-persistent buffer (no
    state-dict entries, as in Hugging Face). ``forward(x, position_ids)`` returns ``(cos, sin)``
    [B, S, head_dim] in x's dtype, computed in fp32 (the values Hugging Face computes).
    :meth:`from_config` builds one from a transformers config.
    """

    def __init__(
        self,
        head_dim: int,
        max_position_embeddings: int = 2048,
        base: float = 10000.0,
        scaling: dict[str, Any] | None = None,
        device=None,
    ) -> None:
        super().__init__()
        if not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
            raise ArgumentError(f"RotaryEmbedding: head_dim={head_dim!r}; use an even int >= 2")
        if scaling is not None and not isinstance(scaling, dict):
            raise ArgumentError(
                f"RotaryEmbedding: scaling={scaling!r}; use None or a dict with 'rope_type'"
            )
        self.head_dim = head_dim
        self.max_seq_len_cached = self.original_max_seq_len = max_position_embeddings
        self.rope_type = "default" if scaling is None else scaling.get("rope_type", "default")
        self.attention_scaling = 1.0  # Hugging Face's post-scaling of cos/sin (1 for these)
        try:
            inv_freq = _inv_freq(head_dim, float(base), scaling)
        except KeyError as e:
            raise ArgumentError(
                f"RotaryEmbedding: scaling {scaling!r} lacks {e} for rope_type {self.rope_type!r}"
            ) from None
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone().to(device), persistent=False)

    @classmethod
    def from_config(cls, config, device=None) -> RotaryEmbedding:
        """The rotary embedding a transformers 5.x config describes (``rope_parameters`` with
        ``rope_theta`` and ``rope_type``; ``head_dim``, else hidden_size / heads; a
        ``partial_rotary_factor`` shortens the rotated dimension)."""
        params = dict(getattr(config, "rope_parameters", None) or {})
        head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads
        )
        partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
        base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        return cls(
            int(head_dim * (partial or 1.0)),
            max_position_embeddings=getattr(config, "max_position_embeddings", 2048),
            base=base,
            scaling=params or None,
            device=device,
        )

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        """``(cos, sin)`` [B, S, head_dim] in x's dtype for position_ids [B, S] (or [S])."""
        if not isinstance(position_ids, torch.Tensor) or position_ids.dim() not in (1, 2):
            pid = position_ids
            got = tuple(pid.shape) if isinstance(pid, torch.Tensor) else type(pid).__name__
            raise ShapeError(
                f"RotaryEmbedding: position_ids must be a [batch, seq] (or [seq]) tensor, got {got}"
            )
        pos = position_ids if position_ids.dim() == 2 else position_ids[None]
        dev = x.device.type if x.device.type in ("cuda", "cpu") else "cpu"
        with torch.autocast(device_type=dev, enabled=False):  # the tables are fp32 math
            inv = self.inv_freq.to(device=x.device, dtype=torch.float32)
            freqs = pos.to(device=x.device, dtype=torch.float32)[..., None] * inv
            emb = torch.cat((freqs, freqs), dim=-1)
            cos = emb.cos() * self.attention_scaling
            sin = emb.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)

    def extra_repr(self) -> str:
        # Reads only what a Hugging Face rotary embedding has too (its class may be swapped).
        return f"head_dim={2 * self.inv_freq.numel()}, rope_type={self.rope_type!r}"
