"""RMSNorm, optionally fused with a residual add: Triton kernels, autograd, torch reference.

``y = x / sqrt(mean(x**2, -1) + eps) * weight``; with ``residual``, ``h = x + residual`` is
normalized instead and returned too (the pre-norm transformer's residual stream), so the sum is
written once and never re-read. Statistics are in fp32; outputs take the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import register_impl
from .common import (
    as_rows,
    dependent_start,
    new_like,
    op_call,
    pdl_args,
    reduce_partials,
    row_launch,
    row_reason,
    row_stats,
    triton_reason,
    upcast,
    vector,
)


@triton.jit
def _rms_norm_fwd_kernel(
    X, R, W, Y, H, RSTD,
    M, N, stride_x, stride_r, stride_y, stride_h, eps,
    HAS_RES: tl.constexpr, HAS_W: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr = False,
):  # fmt: skip
    dependent_start(PDL)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    rmask = rows < M
    mask = rmask[:, None] & (cols < N)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(R + r64 * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = (x + r).to(H.dtype.element_ty)  # normalize the sum as stored, rounded like torch's
        tl.store(H + r64 * stride_h + cols[None, :], h, mask=mask)
        x = h.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / N + eps)
    y = x * rstd[:, None]
    if HAS_W:
        y = y * tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + r64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, DH, X, W, RSTD, DX, DW,
    M, N, stride_dy, stride_dh, stride_x, stride_dx, rows_per_prog,
    HAS_DH: tl.constexpr, HAS_W: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    row_start = pid * rows_per_prog
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        dw = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(0, rows_per_prog, BLOCK_M):
        local = i + tl.arange(0, BLOCK_M)
        rows = row_start + local
        rmask = (local < rows_per_prog) & (rows < M)
        mask = rmask[:, None] & cmask[None, :]
        r64 = rows.to(tl.int64)[:, None]
        x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + r64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)[:, None]
        xhat = x * rstd
        if HAS_W:
            wdy = dy * w
            dw += dy * xhat
        else:
            wdy = dy
        c = tl.sum(xhat * wdy, axis=1)[:, None] / N
        dx = (wdy - xhat * c) * rstd
        if HAS_DH:
            dx += tl.load(DH + r64 * stride_dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + r64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    if HAS_W:
        tl.store(DW + pid * N + cols, tl.sum(dw, axis=0), mask=cmask)


def _fwd(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None, eps: float):
    n = x.shape[-1]
    x2, weight = as_rows(x), vector(weight)
    r2 = as_rows(residual) if residual is not None else x2
    y = new_like(x)
    h = new_like(x) if residual is not None else y
    rstd = row_stats(x)
    m = x2.shape[0]
    if m > 0 and n > 0:
        cfg = row_launch(n, x.element_size(), "rms_norm_fwd")
        _rms_norm_fwd_kernel[cfg.grid(m)](
            x2, r2, weight if weight is not None else x2, y, h, rstd,
            m, n, x2.stride(0), r2.stride(0), n, n, eps,
            HAS_RES=residual is not None, HAS_W=weight is not None,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, **pdl_args(),
        )  # fmt: skip
    return y, h, rstd


@torch.library.custom_op("kernforge::rms_norm_fwd", mutates_args=())
def rms_norm_fwd(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton RMSNorm forward: (y, rstd) with rstd the fp32 reciprocal RMS per row."""
    y, _, rstd = _fwd(x, None, weight, eps)
    return y, rstd


@rms_norm_fwd.register_fake
def _(x, weight, eps):
    return new_like(x), row_stats(x)


@torch.library.custom_op("kernforge::add_rms_norm_fwd", mutates_args=())
def add_rms_norm_fwd(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton residual-add + RMSNorm forward: (y, h = x + residual, rstd)."""
    return _fwd(x, residual, weight, eps)


@add_rms_norm_fwd.register_fake
def _(x, residual, weight, eps):
    return new_like(x), new_like(x), row_stats(x)


@torch.library.custom_op("kernforge::rms_norm_bwd", mutates_args=())
def rms_norm_bwd(
    dy: torch.Tensor,
    dh: torch.Tensor | None,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    rstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton RMSNorm backward: (dx, dweight); dweight is empty when there is no weight.

    ``x`` is the normalized input (``h`` in the residual form); ``dh``, the gradient reaching
    ``h`` directly, is added to dx.
    """
    n = x.shape[-1]
    x2, dy2, weight = as_rows(x), as_rows(dy), vector(weight)
    dh2 = as_rows(dh) if dh is not None else dy2
    dx = new_like(x)
    m = x2.shape[0]
    cfg = row_launch(n, x.element_size(), "rms_norm_bwd")
    programs = cfg.programs(m)
    dw_part = torch.empty((programs, n), dtype=torch.float32, device=x.device)
    if m > 0 and n > 0:
        _rms_norm_bwd_kernel[(programs,)](
            dy2, dh2, x2, weight if weight is not None else x2, rstd, dx, dw_part,
            m, n, dy2.stride(0), dh2.stride(0), x2.stride(0), n, triton.cdiv(m, programs),
            HAS_DH=dh is not None, HAS_W=weight is not None,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )  # fmt: skip
    if weight is None:
        return dx, x.new_empty(0)
    return dx, reduce_partials(dw_part, m, weight.dtype)


@rms_norm_bwd.register_fake
def _(dy, dh, x, weight, rstd):
    return new_like(x), (x.new_empty(0) if weight is None else torch.empty_like(weight))


class RMSNormFunction(torch.autograd.Function):
    """Autograd for the Triton RMSNorm (plain and residual forms)."""

    @staticmethod
    def forward(ctx, x, weight, residual, eps):
        if residual is None:
            y, rstd = op_call(rms_norm_fwd, x, weight, eps)
            h = x
        else:
            y, h, rstd = op_call(add_rms_norm_fwd, x, residual, weight, eps)
        ctx.save_for_backward(h, weight, rstd)
        ctx.has_residual = residual is not None
        return (y, h) if residual is not None else y

    @staticmethod
    def backward(ctx, dy, dh=None):
        h, weight, rstd = ctx.saved_tensors
        dh = dh if ctx.has_residual else None
        dx, dw = op_call(rms_norm_bwd, dy, dh, h, weight, rstd)
        dres = dx if ctx.has_residual and ctx.needs_input_grad[2] else None
        return dx, (dw if weight is not None else None), dres, None


def _supports_triton(x, weight, eps, residual):
    return triton_reason(x, weight, residual) or row_reason(x.shape[-1])


@register_impl("rms_norm", "triton", supports=_supports_triton)
def rms_norm_triton(x, weight, eps, residual):
    return RMSNormFunction.apply(x, weight, residual, eps)


@register_impl("rms_norm", "torch")
def rms_norm_torch(x, weight, eps, residual):
    """Reference: eager torch in fp32 statistics, output in x's dtype."""
    h = x if residual is None else x + residual
    hf = upcast(h)
    y = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(hf.dtype)
    y = y.to(x.dtype)
    return y if residual is None else (y, h)
