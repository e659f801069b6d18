"""LayerNorm: Triton kernels, autograd, torch reference.

``y = (x - mean) / sqrt(var + eps) * weight + bias`` over the last dimension; statistics in
fp32, output in the input dtype. The forward keeps the fp32 mean and rstd of each row so the
backward reads x and dy once and never recomputes the statistics' reductions.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import register_impl
from .common import (
    as_rows,
    new_like,
    op_call,
    reduce_partials,
    row_launch,
    row_reason,
    row_stats,
    triton_reason,
    upcast,
    vector,
)

#: From this BLOCK_N on, dbias is summed outside the backward kernel (see layer_norm_bwd).
SEPARATE_DBIAS = 16384


@triton.jit
def _layer_norm_fwd_kernel(
    X, W, B, Y, MEAN, RSTD,
    M, N, stride_x, stride_y, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < N
    mask = rmask[:, None] & cmask[None, :]
    r64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    # One pass, two independent reductions, over values shifted by the row's first element:
    # the shift is within a few std of the mean, so E[xs^2] - E[xs]^2 keeps its precision
    # even when |mean| >> std (the cancellation of the unshifted form). Padding adds 0.
    shift = tl.load(X + rows.to(tl.int64) * stride_x, mask=rmask, other=0.0).to(tl.float32)
    xs = tl.where(mask, x - shift[:, None], 0.0)
    mean_s = tl.sum(xs, axis=1) / N
    var = tl.maximum(tl.sum(xs * xs, axis=1) / N - mean_s * mean_s, 0.0)
    mean = mean_s + shift
    rstd = tl.math.rsqrt(var + eps)
    y = (xs - mean_s[:, None]) * rstd[:, None]
    if HAS_W:
        y = y * tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + r64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=rmask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _layer_norm_bwd_kernel(
    DY, X, W, MEAN, RSTD, DX, DW, DB,
    M, N, stride_dy, stride_x, stride_dx, rows_per_prog,
    HAS_W: tl.constexpr, HAS_DW: tl.constexpr, HAS_DB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    row_start = pid * rows_per_prog
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_DW:
        dw = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_DB:
        db = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(0, rows_per_prog, BLOCK_M):
        local = i + tl.arange(0, BLOCK_M)
        rows = row_start + local
        rmask = (local < rows_per_prog) & (rows < M)
        mask = rmask[:, None] & cmask[None, :]
        r64 = rows.to(tl.int64)[:, None]
        x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + r64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=rmask, other=0.0)[:, None]
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)[:, None]
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        wdy = dy
        if HAS_W:
            wdy = dy * w
        if HAS_DW:
            dw += dy * xhat
        if HAS_DB:
            db += dy
        # dx = rstd * (wdy - mean(wdy) - xhat * mean(xhat * wdy)); padding holds zeros.
        c1 = tl.sum(xhat * wdy, axis=1)[:, None] / N
        c2 = tl.sum(wdy, axis=1)[:, None] / N
        dx = (wdy - (xhat * c1 + c2)) * rstd
        tl.store(DX + r64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    if HAS_DW:
        tl.store(DW + pid * N + cols, tl.sum(dw, axis=0), mask=cmask)
    if HAS_DB:
        tl.store(DB + pid * N + cols, tl.sum(db, axis=0), mask=cmask)


@torch.library.custom_op("kernforge::layer_norm_fwd", mutates_args=())
def layer_norm_fwd(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton LayerNorm forward: (y, mean, rstd), the statistics fp32 per row."""
    n = x.shape[-1]
    x2 = as_rows(x)
    weight, bias = vector(weight), vector(bias)
    y, mean, rstd = new_like(x), row_stats(x), row_stats(x)
    m = x2.shape[0]
    if x.numel() > 0:
        cfg = row_launch(n, x.element_size(), "layer_norm_fwd")
        _layer_norm_fwd_kernel[cfg.grid(m)](
            x2, weight if weight is not None else x2, bias if bias is not None else x2,
            y, mean, rstd,
            m, n, x2.stride(0), n, eps,
            HAS_W=weight is not None, HAS_B=bias is not None,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
        )  # fmt: skip
    return y, mean, rstd


@layer_norm_fwd.register_fake
def _(x, weight, bias, eps):
    return new_like(x), row_stats(x), row_stats(x)


@torch.library.custom_op("kernforge::layer_norm_bwd", mutates_args=())
def layer_norm_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    weight_grad: bool,
    bias_grad: bool,
    bias_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton LayerNorm backward: (dx, dweight, dbias).

    dweight (needs ``weight``) and dbias are computed only when ``weight_grad`` / ``bias_grad``
    ask for them, else returned empty; dbias takes ``bias_dtype``.
    """
    n = x.shape[-1]
    x2, dy2, weight = as_rows(x), as_rows(dy), vector(weight)
    want_dw = weight_grad and weight is not None
    dx = new_like(x)
    m = x2.shape[0]
    cfg = row_launch(n, x.element_size(), "layer_norm_bwd")
    programs = cfg.programs(m)
    # Wide rows: a dbias accumulator on top of x, dy, w and dweight's overflows the registers
    # (1.27 TB/s at 14336 features on the H100); summing dy in a second pass costs less.
    db_in_kernel = bias_grad and cfg.block_n < SEPARATE_DBIAS
    # Per-program partial sums; reduced below (programs x n fp32 is small next to x and dy).
    dw_part = torch.empty((programs, n), dtype=torch.float32, device=x.device) if want_dw else x2
    db_part = (
        torch.empty((programs, n), dtype=torch.float32, device=x.device) if db_in_kernel else x2
    )
    if x.numel() > 0:
        _layer_norm_bwd_kernel[(programs,)](
            dy2, x2, weight if weight is not None else x2, mean, rstd, dx, dw_part, db_part,
            m, n, dy2.stride(0), x2.stride(0), n, triton.cdiv(m, programs),
            HAS_W=weight is not None, HAS_DW=want_dw, HAS_DB=db_in_kernel,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )  # fmt: skip
    dw = reduce_partials(dw_part, m, weight.dtype) if want_dw else x.new_empty(0)
    if db_in_kernel:
        db = reduce_partials(db_part, m, bias_dtype)
    elif bias_grad:
        db = dy2.sum(0, dtype=torch.float32).to(bias_dtype)
    else:
        db = x.new_empty(0)
    return dx, dw, db


@layer_norm_bwd.register_fake
def _(dy, x, weight, mean, rstd, weight_grad, bias_grad, bias_dtype):
    n = x.shape[-1]
    want_dw = weight_grad and weight is not None
    dw = x.new_empty((n,), dtype=weight.dtype) if want_dw else x.new_empty(0)
    db = x.new_empty((n,), dtype=bias_dtype) if bias_grad else x.new_empty(0)
    return new_like(x), dw, db


class LayerNormFunction(torch.autograd.Function):
    """Autograd for the Triton LayerNorm."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, mean, rstd = op_call(layer_norm_fwd, x, weight, bias, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.bias_dtype = bias.dtype if bias is not None else x.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        # Frozen weight/bias (no grad wanted) skip their accumulators and partial buffers.
        want_dw = weight is not None and ctx.needs_input_grad[1]
        want_db = ctx.needs_input_grad[2]
        dx, dw, db = op_call(
            layer_norm_bwd, dy, x, weight, mean, rstd, want_dw, want_db, ctx.bias_dtype
        )
        return dx, (dw if want_dw else None), (db if want_db else None), None


def _supports_triton(x, weight, bias, eps):
    return triton_reason(x, weight, bias) or row_reason(x.shape[-1])


@register_impl("layer_norm", "triton", supports=_supports_triton)
def layer_norm_triton(x, weight, bias, eps):
    """Triton LayerNorm: one read and one write of x forward, one pass over x and dy backward."""
    return LayerNormFunction.apply(x, weight, bias, float(eps))


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
