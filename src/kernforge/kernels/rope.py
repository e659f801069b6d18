"""Rotary position embedding (rotate-half, as Hugging Face's ``apply_rotary_pos_emb``): Triton
kernels, autograd, torch reference.

With ``x1, x2`` the two halves of the first ``R`` features of a head and ``c1, c2`` / ``s1, s2``
the halves of the cos/sin row at that token's position::

    out1 = x1 * c1 - x2 * s1        out2 = x2 * c2 + x1 * s2

and features ``R:`` are copied through. The backward is the transposed rotation
(``dx1 = d1 * c1 + d2 * s2``, ``dx2 = d2 * c2 - d1 * s1``), i.e. the forward with the sin
halves swapped and negated, so one kernel serves both directions. Gradients flow to q and k
only: cos/sin are treated as constant tables (they are in every model that precomputes them)
and get no gradient.

A program takes one token (a block of tokens for small heads) of q or of k: it gathers the
token's cos/sin row once and applies it to every head, reading through the batch/seq/head
strides, so bshd and bhsd layouts, GQA (different head counts) and views such as a slice of a
fused qkv projection need no copies. Eager calls launch the kernel directly; under
torch.compile the same work goes through the custom ops ``kernforge::rope_fwd``/``rope_bwd``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .. import device
from ..dispatch import register_impl
from .common import new_like, op_call, row_reason, triton_reason

#: position_ids dtypes the kernel loads.
_POS_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


@triton.jit
def _rope_heads(
    X, Y, tok_x, tok_y, h_start, n_heads, H, stride_xh, stride_yh, c1, c2, s1, s2, tmask,
    HALF, R, D,
    BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, HAS_PASS: tl.constexpr,
):  # fmt: skip
    """Rotate heads ``[h_start, h_start + n_heads)`` (clipped to ``H``) of a block of tokens
    (``tok_x``/``tok_y``: their int64 offsets)."""
    cols = tl.arange(0, BLOCK_R)[None, None, :]
    cmask = cols < HALF
    pcols = R + tl.arange(0, BLOCK_P)[None, None, :]
    pmask = pcols < D
    tm = tmask[:, None, None]
    for h0 in range(0, n_heads, BLOCK_H):
        heads = (h_start + h0 + tl.arange(0, BLOCK_H)).to(tl.int64)
        hm = tm & (heads < H)[None, :, None]
        xo = tok_x[:, None, None] + heads[None, :, None] * stride_xh
        yo = tok_y[:, None, None] + heads[None, :, None] * stride_yh
        m = hm & cmask
        x1 = tl.load(X + xo + cols, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(X + xo + HALF + cols, mask=m, other=0.0).to(tl.float32)
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
        tl.store(Y + yo + cols, y1.to(Y.dtype.element_ty), mask=m)
        tl.store(Y + yo + HALF + cols, y2.to(Y.dtype.element_ty), mask=m)
        if HAS_PASS:
            mp = hm & pmask
            xp = tl.load(X + xo + pcols, mask=mp, other=0.0)
            tl.store(Y + yo + pcols, xp.to(Y.dtype.element_ty), mask=mp)


@triton.jit
def _rope_kernel(
    Q, K, QO, KO, COS, SIN, POS,
    T, S, HQ, HK, HPP_Q, HPP_K, GROUPS_Q, GROUPS, HALF, R, D, n_table,
    s_qb, s_qs, s_qh, s_kb, s_ks, s_kh,
    s_qob, s_qos, s_qoh, s_kob, s_kos, s_koh,
    s_cb, s_cs, s_pb, s_ps,
    HAS_POS: tl.constexpr, BACKWARD: tl.constexpr, HAS_PASS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    # A program takes one head group (GROUPS_Q groups of HPP_Q q heads, then groups of HPP_K
    # k heads) of one token block. The group varies fastest over program ids, so neighbouring
    # programs touch neighbouring memory.
    pid = tl.program_id(0)
    tb = pid // GROUPS
    g = pid % GROUPS
    tok = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = tok < T
    b = (tok // S).to(tl.int64)
    s = (tok % S).to(tl.int64)
    if HAS_POS:
        pos = tl.load(POS + b * s_pb + s * s_ps, mask=tmask, other=0).to(tl.int64)
    else:
        pos = s
    # Out-of-range positions (possible only with KERNFORGE_CHECK_INDICES=0) read NaN rather
    # than memory outside the table, so the bad rows show in the output.
    valid = (tmask & (pos >= 0) & (pos < n_table))[:, None]
    cols = tl.arange(0, BLOCK_R)[None, :]
    cm = valid & (cols < HALF)
    row = (b * s_cb + pos * s_cs)[:, None]
    nan = float("nan")
    c1 = tl.load(COS + row + cols, mask=cm, other=nan).to(tl.float32)[:, None, :]
    c2 = tl.load(COS + row + HALF + cols, mask=cm, other=nan).to(tl.float32)[:, None, :]
    s1 = tl.load(SIN + row + cols, mask=cm, other=nan).to(tl.float32)[:, None, :]
    s2 = tl.load(SIN + row + HALF + cols, mask=cm, other=nan).to(tl.float32)[:, None, :]
    if BACKWARD:  # the transposed rotation: swap the sin halves and negate them
        s1, s2 = -s2, -s1
    if g < GROUPS_Q:
        _rope_heads(
            Q, QO, b * s_qb + s * s_qs, b * s_qob + s * s_qos, g * HPP_Q, HPP_Q, HQ, s_qh, s_qoh,
            c1, c2, s1, s2, tmask, HALF, R, D, BLOCK_HQ, BLOCK_R, BLOCK_P, HAS_PASS,
        )  # fmt: skip
    else:
        _rope_heads(
            K, KO, b * s_kb + s * s_ks, b * s_kob + s * s_kos, (g - GROUPS_Q) * HPP_K, HPP_K, HK,
            s_kh, s_koh, c1, c2, s1, s2, tmask, HALF, R, D, BLOCK_HK, BLOCK_R, BLOCK_P, HAS_PASS,
        )  # fmt: skip


@dataclass(frozen=True)
class RopeLaunch:
    """Launch sizes of the rope kernel. A program takes BLOCK_T tokens and ``hpp_q`` q heads or
    ``hpp_k`` k heads, in steps of BLOCK_HQ / BLOCK_HK heads; a head is two rotated halves of
    BLOCK_R features plus BLOCK_P pass-through features."""

    block_t: int
    block_hq: int
    block_hk: int
    hpp_q: int
    hpp_k: int
    block_r: int
    block_p: int
    num_warps: int


#: Launch sizes measured best on the GPU, keyed by (q heads, k heads, rot_dim, head dim,
#: element bytes). Missing keys use the heuristic of :func:`rope_launch`.
TUNED: dict[tuple[int, int, int, int, int], RopeLaunch] = {}


def _pow2_floor(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def rope_launch(hq: int, hk: int, rot: int, dim: int, elem_bytes: int) -> RopeLaunch:
    """Launch sizes for q/k of ``hq``/``hk`` heads of ``dim`` features, ``rot`` of which rotate:
    the :data:`TUNED` entry on the GPU, else :func:`_heuristic_launch`."""
    if not device.INTERPRET:
        tuned = TUNED.get((hq, hk, rot, dim, elem_bytes))
        if tuned is not None:
            return tuned
    return _heuristic_launch(hq, hk, rot, dim, elem_bytes)


@functools.cache  # host time per call matters: at small batch rope moves little data
def _heuristic_launch(hq: int, hk: int, rot: int, dim: int, elem_bytes: int) -> RopeLaunch:
    """On the GPU a program takes every head of one token of q (or of k), in steps of about
    4 KiB of input (16 heads of a 128-wide bf16 token) with one 16-byte access per thread per
    half. Measured on the H100 (q, k [1, 32768, 32, 128] bf16): 2.94 TB/s, against at most
    2.6 TB/s with a program per step (more, smaller programs) and 2.7-2.85 TB/s with bigger
    steps or more warps. Under the interpreter a program takes every head of many tokens,
    since programs run one after another."""
    block_r = triton.next_power_of_2(max(rot // 2, 1))
    block_p = triton.next_power_of_2(dim - rot) if dim > rot else 1
    per_head = 2 * block_r + (block_p if dim > rot else 0)
    tile = (1 << 18 if device.INTERPRET else 1 << 12) // elem_bytes  # elements per step
    block_h = min(triton.next_power_of_2(max(hq, hk, 1)), _pow2_floor(tile // per_head))
    block_t = max(1, min(64, _pow2_floor(tile // (block_h * per_head))))
    block_hq = min(block_h, triton.next_power_of_2(max(hq, 1)))
    block_hk = min(block_h, triton.next_power_of_2(max(hk, 1)))
    vec = max(1, 16 // elem_bytes)
    warps = block_t * block_h * block_r // (vec * 32)  # a 16-byte access per thread per half
    num_warps = max(1, min(16, triton.next_power_of_2(max(warps, 1))))
    hpp_q, hpp_k = max(hq, 1), max(hk, 1)
    return RopeLaunch(block_t, block_hq, block_hk, hpp_q, hpp_k, block_r, block_p, num_warps)


def _bshd(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``x`` as a [B, S, H, D] view (no copy unless the feature stride is not 1)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x if layout == "bshd" else x.transpose(1, 2)


def _strides(t: torch.Tensor) -> tuple[int, ...]:
    """Strides with those of size-1 dims zeroed (they never move the pointer)."""
    return tuple(st if n > 1 else 0 for n, st in zip(t.shape, t.stride(), strict=True))


def _tables(cos: torch.Tensor, sin: torch.Tensor):
    """cos/sin as [Bc, S', R] with unit feature stride and shared (batch, row) strides."""
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    if cos.stride(-1) != 1 or sin.stride(-1) != 1 or _strides(cos) != _strides(sin):
        cos, sin = cos.contiguous(), sin.contiguous()
    sb, ss, _ = _strides(cos)
    return cos, sin, sb, ss


def _apply(q, k, cos, sin, position_ids, layout: str, backward: bool):
    """Rotate q and k (either may be None) into new tensors of their shapes; a None input
    gets an empty output."""
    ref = q if q is not None else k
    s_ax = 1 if layout == "bshd" else 2
    b, s, d = ref.shape[0], ref.shape[s_ax], ref.shape[-1]
    qo = new_like(q) if q is not None else cos.new_empty(0)
    ko = new_like(k) if k is not None else cos.new_empty(0)
    hq = q.shape[3 - s_ax] if q is not None else 0
    hk = k.shape[3 - s_ax] if k is not None else 0
    if b * s == 0 or (hq == 0 and hk == 0):
        return qo, ko
    # An absent input runs zero heads: its pointers and strides are placeholders.
    q4 = _bshd(q, layout) if q is not None else None
    k4 = _bshd(k, layout) if k is not None else None
    qo4 = _bshd(qo, layout) if q is not None else None
    ko4 = _bshd(ko, layout) if k is not None else None
    q4, qo4 = (q4, qo4) if q4 is not None else (k4, ko4)
    k4, ko4 = (k4, ko4) if k4 is not None else (q4, qo4)
    c, sn, s_cb, s_cs = _tables(cos, sin)
    rot = c.shape[-1]
    if position_ids is None:
        pos, s_pb, s_ps = c, 0, 0
    else:
        pos = position_ids if position_ids.dim() == 2 else position_ids[None]
        s_pb, s_ps = _strides(pos)
    cfg = rope_launch(hq, hk, rot, d, ref.element_size())
    groups_q, groups_k = triton.cdiv(hq, cfg.hpp_q), triton.cdiv(hk, cfg.hpp_k)
    tblocks = triton.cdiv(b * s, cfg.block_t)
    grid = (tblocks * (groups_q + groups_k),)
    _rope_kernel[grid](
        q4, k4, qo4, ko4, c, sn, pos,
        b * s, s, hq, hk, cfg.hpp_q, cfg.hpp_k, groups_q, groups_q + groups_k,
        rot // 2, rot, d, c.shape[1],
        q4.stride(0), q4.stride(1), q4.stride(2), k4.stride(0), k4.stride(1), k4.stride(2),
        qo4.stride(0), qo4.stride(1), qo4.stride(2), ko4.stride(0), ko4.stride(1), ko4.stride(2),
        s_cb, s_cs, s_pb, s_ps,
        HAS_POS=position_ids is not None, BACKWARD=backward, HAS_PASS=d > rot,
        BLOCK_T=cfg.block_t, BLOCK_HQ=cfg.block_hq, BLOCK_HK=cfg.block_hk,
        BLOCK_R=cfg.block_r, BLOCK_P=cfg.block_p, num_warps=cfg.num_warps,
    )  # fmt: skip
    return qo, ko


@torch.library.custom_op("kernforge::rope_fwd", mutates_args=())
def rope_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None,
    layout: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton rope forward: (q_rot, k_rot), contiguous in q's and k's shapes."""
    return _apply(q, k, cos, sin, position_ids, layout, backward=False)


@rope_fwd.register_fake
def _(q, k, cos, sin, position_ids, layout):
    return new_like(q), new_like(k)


@torch.library.custom_op("kernforge::rope_bwd", mutates_args=())
def rope_bwd(
    dq: torch.Tensor | None,
    dk: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None,
    layout: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton rope backward: (dq, dk) from the output gradients; an absent gradient (None)
    gives an empty tensor."""
    return _apply(dq, dk, cos, sin, position_ids, layout, backward=True)


@rope_bwd.register_fake
def _(dq, dk, cos, sin, position_ids, layout):
    def out(g):
        return cos.new_empty(0) if g is None else new_like(g)

    return out(dq), out(dk)


class RopeFunction(torch.autograd.Function):
    """Autograd for the Triton rope: gradients to q and k, none to cos, sin, position_ids."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, position_ids, layout):
        q_rot, k_rot = op_call(rope_fwd, q, k, cos, sin, position_ids, layout)
        ctx.save_for_backward(cos, sin, position_ids)
        ctx.layout = layout
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no work
        return q_rot, k_rot

    @staticmethod
    def backward(ctx, dq_rot, dk_rot):
        cos, sin, position_ids = ctx.saved_tensors
        dq_rot = dq_rot if ctx.needs_input_grad[0] else None
        dk_rot = dk_rot if ctx.needs_input_grad[1] else None
        if dq_rot is None and dk_rot is None:
            return None, None, None, None, None, None
        dq, dk = op_call(rope_bwd, dq_rot, dk_rot, cos, sin, position_ids, ctx.layout)
        return (
            dq if dq_rot is not None else None,
            dk if dk_rot is not None else None,
            None, None, None, None,
        )  # fmt: skip


def _supports_triton(q, k, cos, sin, position_ids, layout):
    reason = triton_reason(q, k, cos, sin) or row_reason(q.shape[-1])
    if reason is None and position_ids is not None and position_ids.dtype not in _POS_DTYPES:
        reason = f"position_ids dtype {position_ids.dtype} (Triton path takes int8-int64, uint8)"
    return reason


@register_impl("rope", "triton", supports=_supports_triton)
def rope_triton(q, k, cos, sin, position_ids, layout):
    """Triton rope: one pass over q and k in fp32, outputs in q's dtype (see the module docs)."""
    return RopeFunction.apply(q, k, cos, sin, position_ids, layout)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``cat(-x2, x1)`` of x's two halves along the last dim (GPT-NeoX / Hugging Face rope)."""
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
        out = (xr * c + rotate_half(xr) * s).to(x.dtype)
        return torch.cat((out, xp), dim=-1) if xp.shape[-1] else out

    return apply(q), apply(k)
