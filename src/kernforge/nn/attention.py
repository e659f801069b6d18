"""``kernforge.nn.Attention``: multi-head self-attention (GQA/MQA, optional Qwen3 qk-norm) on
``ops.rope`` and ``ops.fmha``, with Hugging Face's projection names."""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..errors import ArgumentError, ShapeError
from .norms import RMSNorm


def _positive(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ArgumentError(f"Attention: {name}={v!r}; use a positive int")
    return v


class Attention(nn.Module):
    """Self-attention: ``o_proj(fmha(rope(q_proj(x)), rope(k_proj(x)), v_proj(x)))``.

    ``Attention(hidden_size, num_heads, num_kv_heads=None, head_dim=None, bias=False,
    causal=True, window=None, softcap=None, qk_norm=False, eps=1e-6)``; kernforge extras:
    ``scale`` (default ``head_dim ** -0.5``), ``o_bias`` (o_proj's bias, default ``bias``;
    Qwen2 has q/k/v biases and none on o_proj), ``device``, ``dtype``.

    Parameters as Hugging Face's Llama/Mistral/Qwen2/Qwen3 attention names them:
    ``q_proj`` [num_heads * head_dim, hidden], ``k_proj`` and ``v_proj`` [num_kv_heads *
    head_dim, hidden], ``o_proj`` [hidden, num_heads * head_dim], and with ``qk_norm`` (Qwen3)
    ``q_norm.weight`` and ``k_norm.weight`` [head_dim] (RMSNorm over each head, before rope).

    ``forward(x [B, S, hidden], position_embeddings=(cos, sin) or None)`` returns
    [B, S, hidden]. cos/sin are [B, S, R] or [S, R] as :class:`RotaryEmbedding` returns them
    (R < head_dim: partial rotary). The heads stay in the projections' [B, S, H, D] memory
    from start to end: rope and flash attention read and write that layout (no transposes or
    copies). ``causal`` masks future keys; ``window`` is ``ops.fmha``'s (an int: keys up to
    ``window`` positions back, so Hugging Face's ``sliding_window=W`` is ``window=W - 1``);
    ``softcap`` caps the scores (Gemma 2). No attention mask or KV cache: padding-free
    training and prefill (use ``ops.fmha_varlen`` for packed sequences).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        bias: bool = False,
        causal: bool = True,
        window: int | tuple[int, int] | None = None,
        softcap: float | None = None,
        qk_norm: bool = False,
        eps: float = 1e-6,
        scale: float | None = None,
        o_bias: bool | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        hidden_size = _positive("hidden_size", hidden_size)
        num_heads = _positive("num_heads", num_heads)
        num_kv_heads = _positive("num_kv_heads", num_kv_heads or num_heads)
        if num_heads % num_kv_heads:
            raise ArgumentError(
                f"Attention: num_kv_heads={num_kv_heads} must divide num_heads={num_heads} "
                "(GQA/MQA: each kv head serves a group of q heads)"
            )
        if head_dim is None:
            if hidden_size % num_heads:
                raise ArgumentError(
                    f"Attention: hidden_size={hidden_size} is not a multiple of num_heads="
                    f"{num_heads}; pass head_dim explicitly"
                )
            head_dim = hidden_size // num_heads
        head_dim = _positive("head_dim", head_dim)
        self.hidden_size, self.head_dim = hidden_size, head_dim
        self.num_heads, self.num_key_value_heads = num_heads, num_kv_heads
        self.num_key_value_groups = num_heads // num_kv_heads
        self.scaling = float(scale) if scale is not None else head_dim**-0.5
        self.is_causal = bool(causal)
        self.window, self.softcap = window, softcap
        kw = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias, **kw)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias, **kw)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias, **kw)
        o_bias = bias if o_bias is None else o_bias
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=o_bias, **kw)
        if qk_norm:
            self.q_norm = RMSNorm(head_dim, eps, **kw)
            self.k_norm = RMSNorm(head_dim, eps, **kw)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        x: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Attention of x [B, S, hidden] over itself -> [B, S, hidden]."""
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.hidden_size:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ShapeError(
                f"Attention: x must be [batch, seq, hidden_size={self.hidden_size}], got {got}"
            )
        b, s, _ = x.shape
        d = self.head_dim
        q = self.q_proj(x).view(b, s, -1, d)
        k = self.k_proj(x).view(b, s, -1, d)
        v = self.v_proj(x).view(b, s, -1, d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if position_embeddings is not None:
            cos, sin = position_embeddings
            q, k = ops.rope(q, k, cos, sin, None, "bshd")
        o = ops.fmha(q, k, v, causal=self.is_causal, scale=self.scaling, window=self.window,
                     softcap=self.softcap, layout="bshd")  # fmt: skip
        return self.o_proj(o.reshape(b, s, self.num_heads * d))

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, kv_heads={self.num_key_value_heads}, head_dim={self.head_dim}"
            f", causal={self.is_causal}, window={self.window}, softcap={self.softcap}"
        )
