"""Softmax and log-softmax: Triton kernels, autograd, torch reference.

The kernels work on the last dimension (another ``dim`` is moved last first, at the cost of a
copy). A row that fits in registers (up to :data:`LOOP_ROW` features) is read once and written
once; a wider row (an LLM vocabulary of 152064 or 262144) is swept twice by the looped kernels:
an online max/sum pass, then a pass that writes. Statistics are in fp32; outputs take the
input dtype. Non-finite inputs behave like torch: ``-inf`` gets probability 0 (log-probability
``-inf``) beside finite values, and a row that is all ``-inf`` or holds ``+inf``/NaN is NaN.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import device
from ..dispatch import register_impl
from .common import RowLaunch, as_rows, new_like, op_call, row_launch, triton_reason

#: Rows wider than this run the two-pass looped kernels instead of the one-pass row kernels.
#: Measured on an H100 (bf16): one-pass backward spills registers at 65536 features (0.4 TB/s
#: against 1.8-2.3 looped), while up to 32768 one pass reaches 2.8-3.0 TB/s.
LOOP_ROW = 32768
#: Launch sizes of the looped kernels, one program per row (block_m unused): features per step
#: and warps, measured best on an H100 for rows of 65536 to 262144 bf16 features. Under the
#: interpreter large steps are cheaper.
LOOP_FWD = RowLaunch(1, 1 << 15, 1) if device.INTERPRET else RowLaunch(1, 8192, 16)
LOOP_BWD = RowLaunch(1, 1 << 15, 1) if device.INTERPRET else RowLaunch(1, 16384, 32)


@triton.jit
def _softmax_fwd_kernel(
    X, Y,
    M, N, stride_x, stride_y,
    LOG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    # -inf padding adds nothing to the sum; a row of -inf gets max -inf and so NaN, as in torch
    x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=-float("inf"))
    x = x.to(tl.float32)
    z = x - tl.max(x, axis=1)[:, None]
    e = tl.exp(z)
    s = tl.sum(e, axis=1)[:, None]
    if LOG:
        y = z - tl.log(s)
    else:
        y = e * (1.0 / s)
    tl.store(Y + r64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _softmax_bwd_kernel(
    DY, Y, DX,
    M, N, stride_dy, stride_y, stride_dx,
    LOG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    dy = tl.load(DY + r64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + r64 * stride_y + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if LOG:
        dx = dy - tl.exp(y) * tl.sum(dy, axis=1)[:, None]
    else:
        dx = y * (dy - tl.sum(dy * y, axis=1)[:, None])
    tl.store(DX + r64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _softmax_fwd_looped_kernel(
    X, Y,
    N, stride_x, stride_y,
    LOG: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_x
    Y += row * stride_y
    offs = tl.arange(0, BLOCK_N)
    # The running max starts at -FLT_MAX, not -inf, so that a step of all -inf rescales by
    # exp(0) and adds exp(-inf) = 0 instead of making NaN from -inf - -inf. A row of all -inf
    # still ends NaN (0 / 0), as in torch.
    m = -3.4028234663852886e38
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + offs
        x = tl.load(X + cols, mask=cols < N, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
        m = m_new
    total = tl.sum(s, axis=0)
    log_total = tl.log(total)
    inv_total = 1.0 / total
    for start in range(0, N, BLOCK_N):
        cols = start + offs
        cmask = cols < N
        x = tl.load(X + cols, mask=cmask, other=-float("inf")).to(tl.float32)
        if LOG:
            y = (x - m) - log_total
        else:
            y = tl.exp(x - m) * inv_total
        tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=cmask)


@triton.jit
def _softmax_bwd_looped_kernel(
    DY, Y, DX,
    N, stride_dy, stride_y, stride_dx,
    LOG: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    DY += row * stride_dy
    Y += row * stride_y
    DX += row * stride_dx
    offs = tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + offs
        cmask = cols < N
        dy = tl.load(DY + cols, mask=cmask, other=0.0).to(tl.float32)
        if LOG:
            acc += dy  # log-softmax needs only sum(dy): y is not read in this pass
        else:
            acc += dy * tl.load(Y + cols, mask=cmask, other=0.0).to(tl.float32)
    c = tl.sum(acc, axis=0)
    for start in range(0, N, BLOCK_N):
        cols = start + offs
        cmask = cols < N
        dy = tl.load(DY + cols, mask=cmask, other=0.0).to(tl.float32)
        y = tl.load(Y + cols, mask=cmask, other=0.0).to(tl.float32)
        if LOG:
            dx = dy - tl.exp(y) * c
        else:
            dx = y * (dy - c)
        tl.store(DX + cols, dx.to(DX.dtype.element_ty), mask=cmask)


@torch.library.custom_op("kernforge::softmax_fwd", mutates_args=())
def softmax_fwd(x: torch.Tensor, log: bool) -> torch.Tensor:
    """Triton softmax (or log-softmax when ``log``) over the last dimension of ``x``."""
    y = new_like(x)
    if x.numel() == 0:  # no launch for no work
        return y
    n = x.shape[-1]
    x2 = as_rows(x)
    m = x2.shape[0]
    if n > LOOP_ROW:
        _softmax_fwd_looped_kernel[(m,)](
            x2, y, n, x2.stride(0), n,
            LOG=log, BLOCK_N=LOOP_FWD.block_n, num_warps=LOOP_FWD.num_warps,
        )  # fmt: skip
    else:
        cfg = row_launch(n, x.element_size(), "softmax_fwd")
        _softmax_fwd_kernel[cfg.grid(m)](
            x2, y, m, n, x2.stride(0), n,
            LOG=log, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
        )  # fmt: skip
    return y


@softmax_fwd.register_fake
def _(x, log):
    return new_like(x)


@torch.library.custom_op("kernforge::softmax_bwd", mutates_args=())
def softmax_bwd(dy: torch.Tensor, y: torch.Tensor, log: bool) -> torch.Tensor:
    """Triton softmax backward from the forward output ``y``: ``y * (dy - sum(dy * y))``, or
    ``dy - exp(y) * sum(dy)`` for log-softmax (``log``)."""
    dx = new_like(y)
    if y.numel() == 0:
        return dx
    n = y.shape[-1]
    dy2, y2 = as_rows(dy), as_rows(y)
    m = y2.shape[0]
    if n > LOOP_ROW:
        _softmax_bwd_looped_kernel[(m,)](
            dy2, y2, dx, n, dy2.stride(0), y2.stride(0), n,
            LOG=log, BLOCK_N=LOOP_BWD.block_n, num_warps=LOOP_BWD.num_warps,
        )  # fmt: skip
    else:
        cfg = row_launch(n, y.element_size(), "softmax_bwd")
        _softmax_bwd_kernel[cfg.grid(m)](
            dy2, y2, dx, m, n, dy2.stride(0), y2.stride(0), n,
            LOG=log, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
        )  # fmt: skip
    return dx


@softmax_bwd.register_fake
def _(dy, y, log):
    return new_like(y)


class SoftmaxFunction(torch.autograd.Function):
    """Autograd for the Triton softmax and log-softmax over the last dimension."""

    @staticmethod
    def forward(ctx, x, log):
        y = op_call(softmax_fwd, x, log)
        ctx.save_for_backward(y)
        ctx.log = log
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return op_call(softmax_bwd, dy, y, ctx.log), None


def _last_dim(x: torch.Tensor, dim: int, log: bool) -> torch.Tensor:
    dim = dim % x.dim()
    if dim == x.dim() - 1:
        return SoftmaxFunction.apply(x, log)
    # movedim makes the features strided, so as_rows copies them into rows; the result is
    # returned as a view in x's dim order.
    return SoftmaxFunction.apply(x.movedim(dim, -1), log).movedim(-1, dim)


def _supports_triton(x, dim):
    return triton_reason(x)  # any row width: wide rows take the looped kernels


@register_impl("softmax", "triton", supports=_supports_triton)
def softmax_triton(x, dim):
    """Triton softmax along ``dim``."""
    return _last_dim(x, dim, log=False)


@register_impl("log_softmax", "triton", supports=_supports_triton)
def log_softmax_triton(x, dim):
    """Triton log-softmax along ``dim``."""
    return _last_dim(x, dim, log=True)


@register_impl("softmax", "torch")
def softmax_torch(x, dim):
    """Reference: torch.softmax (accumulates in fp32 for half inputs)."""
    return torch.softmax(x, dim)


@register_impl("log_softmax", "torch")
def log_softmax_torch(x, dim):
    """Reference: torch.log_softmax."""
    return torch.log_softmax(x, dim)
