"""``rope_append_kv``: the decode step's work between the q/k/v projection and attention, in one
kernel: split the fused projection into heads, RMS-normalize q and k per head (Qwen3's
qk-norm, optional), rotate them by the rope table at each sequence's position, write k and v
into the KV cache (contiguous or paged) and return the rotated q.

Unfused this is two to four launches per layer (rope, append_kv, two norms), each a few
microseconds of launch latency for a few kilobytes of data: at batch 1 a 28-layer model spends
more time launching them than computing. One program per (sequence, head): programs of the q
heads write q, those of the KV heads write k and v to the cache. The norm and rotation
(:func:`norm_rope`) also serve the decode attention kernel, which runs them for
``rope_append_fmha_decode`` (what kernforge.llm's decode step calls).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import register_impl
from .common import dependent_start, new_output, op_call, pdl_args, triton_reason


@triton.jit
def norm_rope(ptr, x, mask, offs_d, cs, sn, W, eps, D: tl.constexpr, NORM: tl.constexpr):
    """Rows ``x`` [R, BLOCK_D] (as loaded from ``ptr + offs_d``, ``ptr`` [R, 1]) RMS-normalized
    per head by weight ``W`` (Qwen3's q/k norm, rounded as Hugging Face's) when NORM, then
    rotated by the position's cos/sin rows ``cs``/``sn`` [BLOCK_D] (rotate-half: feature d
    pairs with d + D/2); fp32. Each row is read a second time in its partner order, so no
    lane has to exchange halves with another. Shared with the decode attention kernel's
    ``rope_append_fmha_decode`` mode."""
    half: tl.constexpr = D // 2
    lower = offs_d < half
    rot = tl.where(lower, offs_d + half, offs_d - half)
    dt = x.dtype
    xr = tl.load(ptr + rot[None, :], mask=mask, other=0.0).to(tl.float32)
    x = x.to(tl.float32)
    if NORM:
        r = tl.rsqrt(tl.sum(x * x, 1) / D + eps)[:, None]
        d_ok = offs_d < D
        w = tl.load(W + offs_d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        wr = tl.load(W + rot, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        x = ((x * r).to(dt).to(tl.float32) * w).to(dt).to(tl.float32)
        xr = ((xr * r).to(dt).to(tl.float32) * wr).to(dt).to(tl.float32)
    return x * cs[None, :] + tl.where(lower[None, :], -xr, xr) * sn[None, :]


@triton.jit
def _rope_append_kernel(
    QKV, Cos, Sin, Seqlens, KC, VC, BT, Q, QN, KN, eps,
    HQ, HK, s_qkv, s_cos, s_bt, s_kcp, s_kct, s_kch, s_vcp, s_vct, s_vch, page_size,
    D: tl.constexpr, BLOCK: tl.constexpr, PAGED: tl.constexpr, NORM: tl.constexpr,
    PDL: tl.constexpr = False,
):  # fmt: skip
    dependent_start(PDL)
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    pos = tl.load(Seqlens + b).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < D
    row = QKV + b * s_qkv + h.to(tl.int64) * D
    x = tl.load(row + offs[None, :], mask=ok[None, :], other=0.0)
    cs = tl.load(Cos + pos * s_cos + offs, mask=ok, other=0.0).to(tl.float32)
    sn = tl.load(Sin + pos * s_cos + offs, mask=ok, other=0.0).to(tl.float32)
    if h < HQ:
        y = norm_rope(row, x, ok[None, :], offs, cs, sn, QN, eps, D, NORM)
        tl.store(Q + (b * HQ + h) * D + offs[None, :], y.to(Q.dtype.element_ty), mask=ok[None, :])
    else:
        y = norm_rope(row, x, ok[None, :], offs, cs, sn, KN, eps, D, NORM)
        j = (h - HQ).to(tl.int64)
        if PAGED:
            page = tl.load(BT + b * s_bt + pos // page_size).to(tl.int64)
            slot = pos % page_size
        else:
            page = b
            slot = pos
        k_dst = KC + page * s_kcp + slot * s_kct + j * s_kch
        tl.store(k_dst + offs[None, :], y.to(KC.dtype.element_ty), mask=ok[None, :])
        v = tl.load(QKV + b * s_qkv + (HQ + HK + j) * D + offs, mask=ok)
        tl.store(VC + page * s_vcp + slot * s_vct + j * s_vch + offs, v.to(VC.dtype.element_ty),
                 mask=ok)  # fmt: skip


@torch.library.custom_op("kernforge::rope_append_kv", mutates_args=("k_cache", "v_cache"))
def rope_append_kv_kernel(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          cache_seqlens: torch.Tensor, k_cache: torch.Tensor,
                          v_cache: torch.Tensor, num_heads: int,
                          block_table: torch.Tensor | None, q_norm: torch.Tensor | None,
                          k_norm: torch.Tensor | None, eps: float) -> torch.Tensor:  # fmt: skip
    """Launch the fused kernel (inputs checked by ``ops.rope_append_kv``)."""
    bsz = qkv.shape[0]
    hk, d = k_cache.shape[-2], k_cache.shape[-1]
    q = new_output((bsz, num_heads, d), qkv.dtype, qkv.device)
    if bsz == 0:
        return q
    paged = block_table is not None
    norm = q_norm is not None
    _rope_append_kernel[(bsz, num_heads + hk)](
        qkv, cos, sin, cache_seqlens, k_cache, v_cache, block_table if paged else cache_seqlens,
        q, q_norm if norm else qkv, k_norm if norm else qkv, eps, num_heads, hk,
        qkv.stride(0), cos.stride(0), block_table.stride(0) if paged else 0,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        k_cache.shape[1] if paged else 1,
        D=d, BLOCK=triton.next_power_of_2(d), PAGED=paged, NORM=norm, num_warps=1,
        **pdl_args(),
    )  # fmt: skip
    return q


@rope_append_kv_kernel.register_fake
def _(qkv, cos, sin, cache_seqlens, k_cache, v_cache, num_heads, block_table, q_norm, k_norm,
      eps):  # fmt: skip
    return qkv.new_empty((qkv.shape[0], num_heads, k_cache.shape[-1]))


def _supports_triton(qkv, cos, sin, cache_seqlens, k_cache, v_cache, num_heads, block_table=None,
                     q_norm=None, k_norm=None, eps=1e-6):  # fmt: skip
    reason = triton_reason(qkv, cos, sin, k_cache, v_cache, q_norm, k_norm)
    if reason is None and qkv.stride(-1) != 1:
        reason = "qkv's last dimension is not contiguous"
    if reason is None and any(t.stride(-1) != 1 for t in (cos, sin, k_cache, v_cache)):
        reason = "cos/sin or the caches are not contiguous in their last dimension"
    return reason


@register_impl("rope_append_kv", "triton", supports=_supports_triton)
def rope_append_kv_triton(qkv, cos, sin, cache_seqlens, k_cache, v_cache, num_heads,
                          block_table=None, q_norm=None, k_norm=None, eps=1e-6):  # fmt: skip
    return op_call(rope_append_kv_kernel, qkv, cos, sin, cache_seqlens, k_cache, v_cache,
                   num_heads, block_table, q_norm, k_norm, eps)  # fmt: skip


@register_impl("rope_append_kv", "torch")
def rope_append_kv_torch(qkv, cos, sin, cache_seqlens, k_cache, v_cache, num_heads,
                         block_table=None, q_norm=None, k_norm=None, eps=1e-6):  # fmt: skip
    """Reference: the unfused ops (rms_norm, rope, append_kv) on the torch backend."""
    from .. import ops
    from ..dispatch import backend

    bsz = qkv.shape[0]
    hk, d = k_cache.shape[-2], k_cache.shape[-1]
    q = qkv[:, : num_heads * d].view(bsz, 1, num_heads, d)
    k = qkv[:, num_heads * d : (num_heads + hk) * d].view(bsz, 1, hk, d)
    v = qkv[:, (num_heads + hk) * d :].view(bsz, 1, hk, d)
    with backend("torch"):
        if q_norm is not None:
            q, k = ops.rms_norm(q, q_norm, eps), ops.rms_norm(k, k_norm, eps)
        q, k = ops.rope(q, k, cos, sin, position_ids=cache_seqlens.long()[:, None])
        ops.append_kv(k, v.to(v_cache.dtype), k_cache, v_cache, cache_seqlens, block_table)
    return q[:, 0].contiguous()
