"""Mixture-of-experts building blocks: top-k routing, token permute and unpermute. Triton
kernels, autograd, torch references.

- ``moe_route(logits [T, E], top_k)``: softmax (or sigmoid) scores over the experts in fp32, the
  top ``k`` per token (ties go to the lower expert index, so the choice is deterministic),
  optionally renormalised to sum to 1; a ``bias`` [E] (DeepSeek-V3's correction) is added to
  the scores for the choice only. One program takes a block of tokens with all E scores in
  registers and picks the k experts by k rounds of "max, then the lowest index at the max".
  Differentiable in the logits through the weights.
- ``moe_permute(x [T, H], ids [T, k], E)``: the T*k (token, choice) rows sorted by expert,
  stably (by token, then choice, within an expert), as a counting sort on the device: a
  per-block histogram of the expert ids, a cumulative sum over blocks (torch, [blocks, E]),
  then each entry's destination = its expert's start + the block's offset + its rank in the
  block (a cumulative sum of the one-hot ids). No host sync, no atomics. ``order[t*k + j]`` is
  the row of ``x_sorted`` that holds token t's j-th choice; the rows are copied by a scatter
  in which every destination row is written exactly once.
- ``moe_unpermute(y_sorted [T*k, H], order, weights [T, k])``: ``y[t] = sum_j weights[t, j] *
  y_sorted[order[t*k + j]]``, each token gathering its k rows (fp32 accumulate, no atomics:
  deterministic). Its backward scatters ``weights * dy`` back to the sorted rows and takes
  ``dweights`` as row dot products, in one pass. The backward of ``moe_permute`` is the same
  gather with unit weights.

Eager calls run the custom ops' Python bodies directly; torch.compile traces the custom ops
``kernforge::moe_*`` (fake implementations give their shapes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import device
from ..dispatch import register_impl
from .common import new_output, op_call, triton_reason, upcast

#: Most experts the Triton routing and permute kernels hold in one tile (more run on torch).
MAX_EXPERTS = 1024
#: ids and order dtypes the ops take.
INDEX_DTYPES = (torch.int32, torch.int64)
#: Added to the sum of the k scores before renormalising: keeps an all-zero choice (sigmoid of
#: very negative logits) finite; far below fp32 resolution of any real sum (>= 1/E softmax).
RENORM_EPS = 1e-20

# ---------------------------------------------------------------------------------------------
# Routing
# ---------------------------------------------------------------------------------------------


@triton.jit
def _scores(L, rows, cols, T, E, stride_l, SIGMOID: tl.constexpr):
    """fp32 scores [BLOCK_T, BLOCK_E] of a block of tokens: softmax or sigmoid of the logits;
    padded experts score 0 (softmax) or 0 (sigmoid of -inf)."""
    rmask = rows < T
    cmask = cols < E
    lg = tl.load(
        L + rows[:, None] * stride_l + cols[None, :],
        mask=rmask[:, None] & cmask[None, :],
        other=0.0,
    ).to(tl.float32)
    # Padded experts get -inf (never chosen, weight 0); padded tokens keep finite zeros so that
    # their (unstored) softmax does not compute inf - inf.
    lg = tl.where(cmask[None, :], lg, float("-inf"))
    if SIGMOID:
        s = tl.sigmoid(lg)
    else:
        m = tl.max(lg, axis=1)
        e = tl.exp(lg - m[:, None])
        s = e / tl.sum(e, axis=1)[:, None]
    return s


@triton.jit
def _route_fwd_kernel(
    L, BIAS, W, I,
    T, E, stride_l,
    TOP_K: tl.constexpr, SIGMOID: tl.constexpr, RENORM: tl.constexpr, HAS_BIAS: tl.constexpr,
    EPS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rows = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    cmask = cols < E
    s = _scores(L, rows, cols, T, E, stride_l, SIGMOID)
    c = s
    if HAS_BIAS:
        b = tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)
        c = s + b[None, :]
    avail = (cols < E)[None, :] & (rows >= 0)[:, None]  # [BLOCK_T, BLOCK_E]
    kcols = tl.arange(0, BLOCK_K)
    wt = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    it = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        cm = tl.where(avail, c, float("-inf"))
        m = tl.max(cm, axis=1)
        # The lowest index among the experts at the max: ties are broken deterministically.
        idx = tl.min(tl.where(avail & (cm == m[:, None]), cols[None, :], BLOCK_E), axis=1)
        # A NaN row matches nothing: take the lowest expert still free (as a sort would, some
        # expert must be named; the NaN weights say the row is bad).
        first = tl.min(tl.where(avail, cols[None, :], BLOCK_E), axis=1)
        idx = tl.where(idx < BLOCK_E, idx, first)
        sel = cols[None, :] == idx[:, None]
        wj = tl.sum(tl.where(sel, s, 0.0), axis=1)
        avail = avail & ~sel
        here = kcols[None, :] == j
        wt = tl.where(here, wj[:, None], wt)
        it = tl.where(here, idx[:, None], it)
    if RENORM:
        wt = wt / (tl.sum(wt, axis=1) + EPS)[:, None]
    out = rows[:, None] * TOP_K + kcols[None, :]
    mask = (rows < T)[:, None] & (kcols < TOP_K)[None, :]
    tl.store(W + out, wt, mask=mask)
    tl.store(I + out, it, mask=mask)


@triton.jit
def _route_bwd_kernel(
    DW, L, I, DL,
    T, E, stride_l, stride_dl,
    TOP_K: tl.constexpr, SIGMOID: tl.constexpr, RENORM: tl.constexpr, EPS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    rows = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    rmask = rows < T
    s = _scores(L, rows, cols, T, E, stride_l, SIGMOID)
    # w_j = s[id_j] / S with S = sum_j s[id_j] (+ eps): ds[id_j] = (dw_j - sum_i dw_i w_i) / S.
    total = tl.zeros((BLOCK_T,), dtype=tl.float32)
    dot = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        idj = tl.load(I + rows * TOP_K + j, mask=rmask, other=0).to(tl.int32)
        dwj = tl.load(DW + rows * TOP_K + j, mask=rmask, other=0.0).to(tl.float32)
        sj = tl.sum(tl.where(cols[None, :] == idj[:, None], s, 0.0), axis=1)
        total += sj
        dot += dwj * sj
    if RENORM:
        total = total + EPS
        dot = dot / total
    ds = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        idj = tl.load(I + rows * TOP_K + j, mask=rmask, other=0).to(tl.int32)
        dwj = tl.load(DW + rows * TOP_K + j, mask=rmask, other=0.0).to(tl.float32)
        if RENORM:
            gj = (dwj - dot) / total
        else:
            gj = dwj
        ds += tl.where(cols[None, :] == idj[:, None], gj[:, None], 0.0)
    if SIGMOID:
        dl = ds * s * (1.0 - s)
    else:
        dl = s * (ds - tl.sum(ds * s, axis=1)[:, None])
    mask = rmask[:, None] & (cols < E)[None, :]
    tl.store(DL + rows[:, None] * stride_dl + cols[None, :], dl.to(DL.dtype.element_ty), mask=mask)


def _route_launch(t: int, e: int) -> tuple[int, int, int]:
    """``(BLOCK_T, BLOCK_E, num_warps)``: all E scores of a token in one tile, ~4K scores per
    program on the GPU (larger under the interpreter, where programs run one by one)."""
    block_e = triton.next_power_of_2(max(e, 2))
    per = 1 << 16 if device.INTERPRET else 1 << 12
    block_t = max(1, min(triton.next_power_of_2(max(t, 1)), per // block_e))
    return block_t, block_e, 4


@torch.library.custom_op("kernforge::moe_route_fwd", mutates_args=())
def moe_route_fwd(
    logits: torch.Tensor, top_k: int, sigmoid: bool, renormalize: bool, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton routing: ``(weights [T, k] fp32, ids [T, k] int32)``."""
    t, e = logits.shape
    weights = new_output((t, top_k), torch.float32, logits.device)
    ids = new_output((t, top_k), torch.int32, logits.device)
    if t:
        if logits.stride(-1) != 1:
            logits = logits.contiguous()
        bt, be, warps = _route_launch(t, e)
        _route_fwd_kernel[(triton.cdiv(t, bt),)](
            logits, bias.contiguous() if bias is not None else logits, weights, ids,
            t, e, logits.stride(0),
            TOP_K=top_k, SIGMOID=sigmoid, RENORM=renormalize, HAS_BIAS=bias is not None,
            EPS=RENORM_EPS, BLOCK_T=bt, BLOCK_E=be, BLOCK_K=triton.next_power_of_2(top_k),
            num_warps=warps,
        )  # fmt: skip
    return weights, ids


@moe_route_fwd.register_fake
def _(logits, top_k, sigmoid, renormalize, bias):
    t = logits.shape[0]
    return (
        torch.empty((t, top_k), dtype=torch.float32, device=logits.device),
        torch.empty((t, top_k), dtype=torch.int32, device=logits.device),
    )


@torch.library.custom_op("kernforge::moe_route_bwd", mutates_args=())
def moe_route_bwd(
    dweights: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor, sigmoid: bool,
    renormalize: bool,
) -> torch.Tensor:  # fmt: skip
    """Triton backward of the routing: dlogits [T, E] in the logits' dtype."""
    t, e = logits.shape
    dlogits = new_output((t, e), logits.dtype, logits.device)
    if t:
        if logits.stride(-1) != 1:
            logits = logits.contiguous()
        bt, be, warps = _route_launch(t, e)
        _route_bwd_kernel[(triton.cdiv(t, bt),)](
            dweights.contiguous(), logits, ids.contiguous(), dlogits,
            t, e, logits.stride(0), dlogits.stride(0),
            TOP_K=ids.shape[1], SIGMOID=sigmoid, RENORM=renormalize, EPS=RENORM_EPS,
            BLOCK_T=bt, BLOCK_E=be, num_warps=warps,
        )  # fmt: skip
    return dlogits


@moe_route_bwd.register_fake
def _(dweights, logits, ids, sigmoid, renormalize):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


class RouteFunction(torch.autograd.Function):
    """Autograd for the Triton routing (gradient to the logits through the weights)."""

    @staticmethod
    def forward(ctx, logits, top_k, sigmoid, renormalize, bias):
        weights, ids = op_call(moe_route_fwd, logits, top_k, sigmoid, renormalize, bias)
        ctx.mark_non_differentiable(ids)
        ctx.save_for_backward(logits, ids)
        ctx.flags = (sigmoid, renormalize)
        return weights, ids

    @staticmethod
    def backward(ctx, dweights, _dids):
        logits, ids = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        dlogits = op_call(moe_route_bwd, dweights, logits, ids, *ctx.flags)
        return dlogits, None, None, None, None


# ---------------------------------------------------------------------------------------------
# Permute and unpermute
# ---------------------------------------------------------------------------------------------


@triton.jit
def _onehot(I, N, E, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    """The block's entries, their mask, and their one-hot expert ids [BLOCK_N, BLOCK_E]."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = offs < N
    e = tl.load(I + offs, mask=m, other=-1).to(tl.int32)
    cols = tl.arange(0, BLOCK_E)
    return offs, m, cols, (e[:, None] == cols[None, :]).to(tl.int32)


@triton.jit
def _count_kernel(I, C, N, E, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    """C[block, e] = entries of this block routed to expert e."""
    _, _, cols, oh = _onehot(I, N, E, BLOCK_N, BLOCK_E)
    tl.store(C + tl.program_id(0) * E + cols, tl.sum(oh, axis=0), mask=cols < E)


@triton.jit
def _position_kernel(I, BASE, O, N, E, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    """O[i] = destination row of entry i: BASE[block, e] (its expert's start plus the entries
    of e in earlier blocks) + its rank among the block's entries of e."""
    offs, m, cols, oh = _onehot(I, N, E, BLOCK_N, BLOCK_E)
    rank = tl.sum(tl.where(oh != 0, tl.cumsum(oh, axis=0), 0), axis=1) - 1
    base = tl.load(BASE + tl.program_id(0) * E + cols, mask=cols < E, other=0)
    pos = tl.sum(tl.where(oh != 0, base[None, :], 0), axis=1) + rank
    tl.store(O + offs, pos, mask=m)


@triton.jit
def _scatter_rows_kernel(
    X, O, XS, N, H, K, stride_x, stride_xs, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr
):
    """XS[O[i]] = X[i // K]: each destination row written once."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    h = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    rm = r < N
    mask = rm[:, None] & (h < H)[None, :]
    pos = tl.load(O + r, mask=rm, other=0).to(tl.int64)
    v = tl.load(X + (r // K)[:, None] * stride_x + h[None, :], mask=mask)
    tl.store(XS + pos[:, None] * stride_xs + h[None, :], v, mask=mask)


@triton.jit
def _gather_rows_kernel(
    YS, O, W, Y, T, H, K, stride_ys, stride_y,
    HAS_W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """Y[t] = sum_j W[t, j] * YS[O[t*K + j]] (W = 1 without HAS_W), in fp32."""
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    tm = t < T
    mask = tm[:, None] & (h < H)[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for j in range(0, K):
        pos = tl.load(O + t * K + j, mask=tm, other=0).to(tl.int64)
        v = tl.load(YS + pos[:, None] * stride_ys + h[None, :], mask=mask, other=0.0)
        v = v.to(tl.float32)
        if HAS_W:
            w = tl.load(W + t * K + j, mask=tm, other=0.0).to(tl.float32)
            v = v * w[:, None]
        acc += v
    tl.store(Y + t[:, None] * stride_y + h[None, :], acc.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _unpermute_bwd_kernel(
    DY, YS, O, W, DYS, DW, N, H, K, stride_dy, stride_ys, stride_dys,
    NEED_DYS: tl.constexpr, NEED_DW: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """For entry i = t*K + j at row p = O[i]: DYS[p] = W[i] * DY[t] and
    DW[i] = <DY[t], YS[p]>, one pass over the row."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = r < N
    pos = tl.load(O + r, mask=rm, other=0).to(tl.int64)
    tok = r // K
    w = tl.load(W + r, mask=rm, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        mask = rm[:, None] & (h < H)[None, :]
        dy = tl.load(DY + tok[:, None] * stride_dy + h[None, :], mask=mask, other=0.0)
        dy = dy.to(tl.float32)
        if NEED_DYS:
            dst = DYS + pos[:, None] * stride_dys + h[None, :]
            tl.store(dst, (dy * w[:, None]).to(DYS.dtype.element_ty), mask=mask)
        if NEED_DW:
            ys = tl.load(YS + pos[:, None] * stride_ys + h[None, :], mask=mask, other=0.0)
            acc += tl.sum(dy * ys.to(tl.float32), axis=1)
    if NEED_DW:
        tl.store(DW + r, acc.to(DW.dtype.element_ty), mask=rm)


def _index_block(e: int) -> tuple[int, int]:
    """``(BLOCK_N, BLOCK_E)`` of the counting kernels: ~8K one-hot entries per program."""
    block_e = triton.next_power_of_2(max(e, 2))
    per = 1 << 16 if device.INTERPRET else 1 << 13
    return max(16, per // block_e), block_e


def _row_tile(h: int, elem_bytes: int) -> tuple[int, int, int]:
    """``(BLOCK_R, BLOCK_H, num_warps)`` of the row copy kernels: 16 KiB per program on the
    GPU (rows of up to 4 KiB, 16-byte accesses), bigger under the interpreter."""
    tile = 1 << 16 if device.INTERPRET else (16384 // elem_bytes)
    block_h = min(triton.next_power_of_2(max(h, 1)), 4096 // elem_bytes * 2)
    block_r = max(1, tile // block_h)
    vec = max(1, 16 // elem_bytes)
    warps = max(1, min(8, triton.next_power_of_2(max(1, block_r * block_h // (vec * 32 * 2)))))
    return block_r, block_h, warps


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` [R, H] with a unit feature stride (a view when it has one)."""
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def _positions(ids: torch.Tensor, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(group_sizes [E] int32, order [N] int32)`` of the flat expert ids (counting sort)."""
    flat = ids.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    n = flat.numel()
    block_n, block_e = _index_block(e)
    blocks = triton.cdiv(n, block_n)
    counts = torch.empty((blocks, e), dtype=torch.int32, device=ids.device)
    _count_kernel[(blocks,)](flat, counts, n, e, BLOCK_N=block_n, BLOCK_E=block_e, num_warps=4)
    csum = counts.cumsum(0, dtype=torch.int32)
    group_sizes = csum[-1].clone()
    start = group_sizes.cumsum(0, dtype=torch.int32) - group_sizes
    base = (csum - counts).add_(start)
    order = new_output((n,), torch.int32, ids.device)
    _position_kernel[(blocks,)](flat, base, order, n, e, BLOCK_N=block_n, BLOCK_E=block_e,
                                num_warps=4)  # fmt: skip
    return group_sizes, order


def _gather(ys: torch.Tensor, order: torch.Tensor, weights: torch.Tensor | None, t: int,
            k: int) -> torch.Tensor:  # fmt: skip
    """``y[t] = sum_j weights[t, j] * ys[order[t*k + j]]`` (weights 1 when None)."""
    h = ys.shape[1]
    y = new_output((t, h), ys.dtype, ys.device)
    if t and h:
        ys = _rows(ys)
        bt, bh, warps = _row_tile(h, ys.element_size())
        grid = (triton.cdiv(t, bt), triton.cdiv(h, bh))
        w = weights.contiguous() if weights is not None else ys
        _gather_rows_kernel[grid](
            ys, order.contiguous(), w, y, t, h, k, ys.stride(0), y.stride(0),
            HAS_W=weights is not None, BLOCK_T=bt, BLOCK_H=bh, num_warps=warps,
        )  # fmt: skip
    return y


@torch.library.custom_op("kernforge::moe_permute_fwd", mutates_args=())
def moe_permute_fwd(
    x: torch.Tensor, ids: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton permute: ``(x_sorted [T*k, H], group_sizes [E] int32, order [T*k] int32)``."""
    t, h = x.shape
    k = ids.shape[1]
    n = t * k
    xs = new_output((n, h), x.dtype, x.device)
    if n == 0:
        return (
            xs,
            torch.zeros(num_experts, dtype=torch.int32, device=x.device),
            ids.new_empty(0, dtype=torch.int32),
        )
    group_sizes, order = _positions(ids, num_experts)
    if h:
        x2 = _rows(x)
        br, bh, warps = _row_tile(h, x.element_size())
        _scatter_rows_kernel[(triton.cdiv(n, br), triton.cdiv(h, bh))](
            x2, order, xs, n, h, k, x2.stride(0), xs.stride(0),
            BLOCK_R=br, BLOCK_H=bh, num_warps=warps,
        )  # fmt: skip
    return xs, group_sizes, order


@moe_permute_fwd.register_fake
def _(x, ids, num_experts):
    n = ids.shape[0] * ids.shape[1]
    return (
        torch.empty((n, x.shape[1]), dtype=x.dtype, device=x.device),
        torch.empty((num_experts,), dtype=torch.int32, device=x.device),
        torch.empty((n,), dtype=torch.int32, device=x.device),
    )


@torch.library.custom_op("kernforge::moe_gather_rows", mutates_args=())
def moe_gather_rows(
    ys: torch.Tensor, order: torch.Tensor, weights: torch.Tensor | None, num_tokens: int,
    top_k: int,
) -> torch.Tensor:  # fmt: skip
    """Triton ``y[t] = sum_j weights[t, j] * ys[order[t*k + j]]`` (unpermute; with weights None,
    the backward of permute)."""
    return _gather(ys, order, weights, num_tokens, top_k)


@moe_gather_rows.register_fake
def _(ys, order, weights, num_tokens, top_k):
    return torch.empty((num_tokens, ys.shape[1]), dtype=ys.dtype, device=ys.device)


@torch.library.custom_op("kernforge::moe_unpermute_bwd", mutates_args=())
def moe_unpermute_bwd(
    dy: torch.Tensor, ys: torch.Tensor, order: torch.Tensor, weights: torch.Tensor,
    need_dys: bool, need_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Triton backward of unpermute: ``(dy_sorted, dweights)``; one not needed is empty."""
    n, h = ys.shape
    t, k = weights.shape
    dys = new_output((n, h) if need_dys else (0, h), ys.dtype, ys.device)
    dw = new_output((t, k) if need_dw else (0, k), weights.dtype, weights.device)
    if n and (need_dys or need_dw):
        if h == 0:
            return dys, dw.zero_()
        dy, ys = _rows(dy), _rows(ys)
        br, bh, warps = _row_tile(h, ys.element_size())
        br = max(1, min(br, 16))  # a program loops over the row: few rows, many programs
        _unpermute_bwd_kernel[(triton.cdiv(n, br),)](
            dy, ys, order.contiguous(), weights.contiguous(), dys, dw, n, h, k,
            dy.stride(0), ys.stride(0), dys.stride(0) if need_dys else 0,
            NEED_DYS=need_dys, NEED_DW=need_dw, BLOCK_R=br, BLOCK_H=bh, num_warps=warps,
        )  # fmt: skip
    return dys, dw


@moe_unpermute_bwd.register_fake
def _(dy, ys, order, weights, need_dys, need_dw):
    n, h = ys.shape
    t, k = weights.shape
    return (
        torch.empty((n, h) if need_dys else (0, h), dtype=ys.dtype, device=ys.device),
        torch.empty((t, k) if need_dw else (0, k), dtype=weights.dtype, device=weights.device),
    )


class PermuteFunction(torch.autograd.Function):
    """Autograd for the Triton permute (gradient to x: each token sums its k sorted rows)."""

    @staticmethod
    def forward(ctx, x, ids, num_experts):
        xs, group_sizes, order = op_call(moe_permute_fwd, x, ids, num_experts)
        ctx.mark_non_differentiable(group_sizes, order)
        ctx.save_for_backward(order)
        ctx.tk = ids.shape
        return xs, group_sizes, order

    @staticmethod
    def backward(ctx, dxs, _dgs, _dorder):
        (order,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        t, k = ctx.tk
        return op_call(moe_gather_rows, dxs, order, None, t, k), None, None


class UnpermuteFunction(torch.autograd.Function):
    """Autograd for the Triton unpermute (gradients to y_sorted and to the weights)."""

    @staticmethod
    def forward(ctx, ys, order, weights):
        ctx.save_for_backward(ys, order, weights)
        t, k = weights.shape
        return op_call(moe_gather_rows, ys, order, weights, t, k)

    @staticmethod
    def backward(ctx, dy):
        ys, order, weights = ctx.saved_tensors
        need_dys, _, need_dw = ctx.needs_input_grad
        if not (need_dys or need_dw):
            return None, None, None
        dys, dw = op_call(moe_unpermute_bwd, dy, ys, order, weights, need_dys, need_dw)
        return (dys if need_dys else None), None, (dw if need_dw else None)


# ---------------------------------------------------------------------------------------------
# Registrations
# ---------------------------------------------------------------------------------------------


def _experts_reason(e: int) -> str | None:
    if e > MAX_EXPERTS:
        return f"{e} experts exceed the Triton kernels' limit of {MAX_EXPERTS}"
    return None


def _supports_route(logits, top_k, scoring, renormalize, bias):
    return triton_reason(logits, bias) or _experts_reason(logits.shape[1])


def _supports_permute(x, ids, num_experts):
    return triton_reason(x) or _experts_reason(num_experts)


def _supports_unpermute(y_sorted, order, weights):
    return triton_reason(y_sorted, weights)


@register_impl("moe_route", "triton", supports=_supports_route)
def moe_route_triton(logits, top_k, scoring, renormalize, bias):
    """Triton top-k routing."""
    return RouteFunction.apply(logits, top_k, scoring == "sigmoid", renormalize, bias)


@register_impl("moe_permute", "triton", supports=_supports_permute)
def moe_permute_triton(x, ids, num_experts):
    """Triton permute (counting sort of the expert ids, then a row scatter)."""
    return PermuteFunction.apply(x, ids, num_experts)


@register_impl("moe_unpermute", "triton", supports=_supports_unpermute)
def moe_unpermute_triton(y_sorted, order, weights):
    """Triton weighted unpermute (each token gathers its k rows)."""
    return UnpermuteFunction.apply(y_sorted, order, weights)


@register_impl("moe_route", "torch")
def moe_route_torch(logits, top_k, scoring, renormalize, bias):
    """Reference routing: scores in fp32 (fp64 for fp64 logits), a stable descending sort of
    the (bias-corrected) scores, so ties go to the lower expert index."""
    lg = upcast(logits)
    scores = torch.sigmoid(lg) if scoring == "sigmoid" else torch.softmax(lg, dim=-1)
    choice = scores.detach()
    if bias is not None:
        choice = choice + bias.detach().to(choice.dtype)
    ids = torch.sort(choice, dim=-1, descending=True, stable=True).indices[:, :top_k]
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + RENORM_EPS)
    return weights, ids.to(torch.int32)


@register_impl("moe_permute", "torch")
def moe_permute_torch(x, ids, num_experts):
    """Reference permute: a stable sort of the flat expert ids."""
    t, k = ids.shape
    flat = ids.reshape(-1).long()
    src = torch.sort(flat, stable=True).indices  # sorted row -> flat (token, choice)
    order = torch.empty_like(src)
    order[src] = torch.arange(flat.numel(), device=flat.device)
    # index_add_ (not bincount, whose output size needs the max id: a device sync).
    group_sizes = torch.zeros(num_experts, dtype=torch.int32, device=x.device)
    group_sizes.index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    return x[src // k], group_sizes, order.to(torch.int32)


@register_impl("moe_unpermute", "torch")
def moe_unpermute_torch(y_sorted, order, weights):
    """Reference unpermute: gather the k rows of each token, weight, sum (fp32 or fp64)."""
    t, k = weights.shape
    rows = y_sorted[order.long()].reshape(t, k, y_sorted.shape[1])
    acc = upcast(rows) * upcast(weights).unsqueeze(-1)
    return acc.sum(1).to(y_sorted.dtype)
