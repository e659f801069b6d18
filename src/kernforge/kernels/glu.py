"""Gated linear units: silu_and_mul, swiglu, geglu (tanh and exact). Triton kernels, autograd,
torch reference.

``out = act(gate) * up`` elementwise. One forward and one backward kernel serve every op: the
activation is a constexpr, and gate and up are read through their own row strides, so
``silu_and_mul`` hands the kernels the two halves of ``x`` [..., 2d] as views (no copy) and its
backward writes dgate and dup straight into the two halves of one dx [..., 2d]. The backward
recomputes the activation from the saved inputs instead of saving it. Math is in fp32;
outputs take the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .. import device
from ..dispatch import register_impl
from .common import (
    as_rows,
    dependent_start,
    new_like,
    new_output,
    op_call,
    pdl_args,
    triton_reason,
)

#: The ACT constexpr of the kernels, by activation name (the custom ops take the name).
ACTS = {"silu": 0, "gelu_tanh": 1, "gelu_erf": 2}


@triton.jit
def _activate(g, ACT: tl.constexpr):
    """``(act(g), act'(g))`` in fp32; the compiler drops the derivative where it is unused."""
    if ACT == 0:  # silu
        s = tl.sigmoid(g)
        a = g * s
        da = s + g * s * (1.0 - s)
    elif ACT == 1:  # gelu, tanh approximation
        # 0.5 * (1 + tanh(u)) == sigmoid(2u): exact where 1 + tanh(u) would cancel (g << 0).
        u2 = 1.5957691216057308 * g * (1.0 + 0.044715 * g * g)  # 2 * sqrt(2/pi) * (...)
        s = tl.sigmoid(u2)
        a = g * s
        # 0.5 * g * (1 - tanh^2) * du/dg, with 1 - tanh^2 = 4 s (1 - s). g is clamped there only
        # to keep g^3 finite (0 * inf); past |g| = 10 the term is below 1e-34 anyway.
        gc = tl.minimum(tl.maximum(g, -10.0), 10.0)
        da = s + 1.5957691216057308 * gc * s * (1.0 - s) * (1.0 + 0.134145 * gc * gc)
    else:  # gelu, exact (erf)
        a = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
        da = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476)) + (
            g * tl.exp(-0.5 * g * g) * 0.3989422804014327  # 1 / sqrt(2 pi)
        )
    return a, da


@triton.jit
def _tile(M, N, tiles_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Consecutive programs take consecutive column tiles of the same rows: adjacent memory.
    pid = tl.program_id(0)
    pid_m = pid // tiles_n
    pid_n = pid - pid_m * tiles_n
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    # int64 columns: a flattened contiguous tensor is one row that may pass 2**31 elements.
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    return rows[:, None], cols[None, :], mask


@triton.jit
def _glu_fwd_kernel(
    G, U, O,
    M, N, stride_g, stride_u, stride_o, tiles_n, col_g, col_u,
    ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr = False,
):  # fmt: skip
    dependent_start(PDL)
    rows, cols, mask = _tile(M, N, tiles_n, BLOCK_M, BLOCK_N)
    g = tl.load(G + rows * stride_g + cols * col_g, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows * stride_u + cols * col_u, mask=mask, other=0.0).to(tl.float32)
    a, _ = _activate(g, ACT)
    tl.store(O + rows * stride_o + cols, (a * u).to(O.dtype.element_ty), mask=mask)


@triton.jit
def _glu_bwd_kernel(
    DY, G, U, DG, DU,
    M, N, stride_dy, stride_g, stride_u, stride_dg, stride_du, tiles_n,
    ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    rows, cols, mask = _tile(M, N, tiles_n, BLOCK_M, BLOCK_N)
    dy = tl.load(DY + rows * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + rows * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    a, da = _activate(g, ACT)
    tl.store(DG + rows * stride_dg + cols, (dy * u * da).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + rows * stride_du + cols, (dy * a).to(DU.dtype.element_ty), mask=mask)


#: Elements per program on the GPU, and the widest column tile (a row wider than that is split
#: over several programs). Measured on an H100 in bf16 (out [32768, 4096] and [4096, 14336]):
#: 4096 x 2048 with two 16-byte accesses per thread per operand runs every op at 2.88-3.01 TB/s
#: (a device copy: 2.95); 8192-element tiles drop the exact-gelu backward to 2.1 TB/s.
TILE = 4096
BLOCK_N_MAX = 2048
#: Under the interpreter programs run one after another, so tiles are larger (but small
#: enough that the tests still cross tile edges).
INTERPRET_TILE = 16384
INTERPRET_BLOCK_N_MAX = 2048


def _launch(m: int, n: int, elem_bytes: int):
    """``(grid, tiles_n, BLOCK_M, BLOCK_N, num_warps)`` for an [m, n] elementwise pass."""
    tile, cap = (INTERPRET_TILE, INTERPRET_BLOCK_N_MAX) if device.INTERPRET else (TILE, BLOCK_N_MAX)
    block_n = min(triton.next_power_of_2(n), cap if m > 1 else tile)
    block_m = min(triton.next_power_of_2(m), max(1, tile // block_n))
    vec = max(1, 16 // elem_bytes)  # elements per 16-byte access
    warps = block_m * block_n // (vec * 32 * 2)  # two 16-byte accesses per thread per operand
    num_warps = max(1, min(8, triton.next_power_of_2(max(warps, 1))))
    tiles_n = triton.cdiv(n, block_n)
    return (triton.cdiv(m, block_m) * tiles_n,), tiles_n, block_m, block_n, num_warps


def _flat(m: int, n: int, *row_strides: int) -> tuple[int, int, tuple[int, ...]]:
    """``(rows, cols, row_strides)`` the kernels walk: one long row when every operand is
    contiguous, so that narrow or odd rows do not leave most of each tile masked off. The
    strides of that one row are passed as 0, which Triton knows to be 16-aligned."""
    if m > 1 and all(s == n for s in row_strides):
        return 1, m * n, (0,) * len(row_strides)
    return m, n, row_strides


def _fwd(g2: torch.Tensor, u2: torch.Tensor, o2: torch.Tensor, act: str) -> None:
    m, n = g2.shape
    if m == 0 or n == 0:
        return
    cols_g, cols_u = g2.stride(1), u2.stride(1)
    if cols_g == cols_u == 1:
        rows, cols, strides = _flat(m, n, g2.stride(0), u2.stride(0), o2.stride(0))
    else:
        rows, cols, strides = m, n, (g2.stride(0), u2.stride(0), o2.stride(0))
    grid, tiles_n, bm, bn, warps = _launch(rows, cols, g2.element_size())
    _glu_fwd_kernel[grid](
        g2, u2, o2, rows, cols, *strides, tiles_n, cols_g, cols_u,
        ACT=ACTS[act], BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, **pdl_args(),
    )  # fmt: skip


def _bwd(dy2, g2, u2, dg2, du2, act: str) -> None:
    m, n = g2.shape
    if m == 0 or n == 0:
        return
    strides = (dy2.stride(0), g2.stride(0), u2.stride(0), dg2.stride(0), du2.stride(0))
    rows, cols, strides = _flat(m, n, *strides)
    grid, tiles_n, bm, bn, warps = _launch(rows, cols, g2.element_size())
    _glu_bwd_kernel[grid](
        dy2, g2, u2, dg2, du2, rows, cols, *strides, tiles_n,
        ACT=ACTS[act], BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
    )  # fmt: skip


def _half_shape(x: torch.Tensor) -> tuple[int, ...]:
    return (*x.shape[:-1], x.shape[-1] // 2)


@torch.library.custom_op("kernforge::glu_fwd", mutates_args=())
def glu_fwd(gate: torch.Tensor, up: torch.Tensor, act: str) -> torch.Tensor:
    """Triton ``act(gate) * up`` for ``act`` in ``ACTS``."""
    n = gate.shape[-1]
    out = new_like(gate)
    if out.numel():
        # Strided columns are read in place (fused_linear's interleaved gate/up halves).
        _fwd(gate.reshape(-1, n), up.reshape(-1, n), out.view(-1, n), act)
    return out


@glu_fwd.register_fake
def _(gate, up, act):
    return torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)


@torch.library.custom_op("kernforge::glu_bwd", mutates_args=())
def glu_bwd(
    dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton backward of ``act(gate) * up``: (dgate, dup), one pass over dy, gate and up."""
    n = gate.shape[-1]
    dgate = new_like(gate)
    dup = new_like(gate)
    if dgate.numel():
        dg2, du2 = dgate.view(-1, n), dup.view(-1, n)
        _bwd(as_rows(dy), as_rows(gate), as_rows(up), dg2, du2, act)
    return dgate, dup


@glu_bwd.register_fake
def _(dy, gate, up, act):
    return tuple(torch.empty(gate.shape, dtype=gate.dtype, device=gate.device) for _ in "gu")


@torch.library.custom_op("kernforge::silu_and_mul_fwd", mutates_args=())
def silu_and_mul_fwd(x: torch.Tensor) -> torch.Tensor:
    """Triton ``silu(x[..., :d]) * x[..., d:]``, reading the halves of x in place."""
    d = x.shape[-1] // 2
    out = new_output(_half_shape(x), x.dtype, x.device)
    if out.numel():
        x2 = as_rows(x)
        _fwd(x2[:, :d], x2[:, d:], out.view(-1, d), "silu")
    return out


@silu_and_mul_fwd.register_fake
def _(x):
    return torch.empty(_half_shape(x), dtype=x.dtype, device=x.device)


@torch.library.custom_op("kernforge::silu_and_mul_bwd", mutates_args=())
def silu_and_mul_bwd(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Triton backward of silu_and_mul: dx [..., 2d], dgate and dup written into its halves."""
    d = x.shape[-1] // 2
    dx = new_like(x)
    if dx.numel():
        x2, dx2 = as_rows(x), dx.view(-1, 2 * d)
        _bwd(as_rows(dy), x2[:, :d], x2[:, d:], dx2[:, :d], dx2[:, d:], "silu")
    return dx


@silu_and_mul_bwd.register_fake
def _(dy, x):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


class GLUFunction(torch.autograd.Function):
    """Autograd for the Triton ``act(gate) * up`` (swiglu, geglu)."""

    @staticmethod
    def forward(ctx, gate, up, act):
        ctx.save_for_backward(gate, up)
        ctx.act = act
        return op_call(glu_fwd, gate, up, act)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dgate, dup = op_call(glu_bwd, dy, gate, up, ctx.act)
        need = ctx.needs_input_grad
        return (dgate if need[0] else None), (dup if need[1] else None), None


class SiluAndMulFunction(torch.autograd.Function):
    """Autograd for the Triton silu_and_mul."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return op_call(silu_and_mul_fwd, x)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return op_call(silu_and_mul_bwd, dy, x)


def _supports_silu_and_mul(x):
    return triton_reason(x)


def _supports_glu(gate, up, approximate=None):
    return triton_reason(gate, up)


@register_impl("silu_and_mul", "triton", supports=_supports_silu_and_mul)
def silu_and_mul_triton(x):
    """Triton ``silu(x[..., :d]) * x[..., d:]``."""
    return SiluAndMulFunction.apply(x)


@register_impl("swiglu", "triton", supports=_supports_glu)
def swiglu_triton(gate, up):
    """Triton ``silu(gate) * up``."""
    return GLUFunction.apply(gate, up, "silu")


@register_impl("geglu", "triton", supports=_supports_glu)
def geglu_triton(gate, up, approximate):
    """Triton ``gelu(gate) * up``, tanh approximation or exact erf."""
    return GLUFunction.apply(gate, up, "gelu_tanh" if approximate == "tanh" else "gelu_erf")


@register_impl("silu_and_mul", "torch")
def silu_and_mul_torch(x):
    """Reference: ``silu(x[..., :d]) * x[..., d:]`` in eager torch."""
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


@register_impl("swiglu", "torch")
def swiglu_torch(gate, up):
    """Reference: ``silu(gate) * up``."""
    return F.silu(gate) * up


@register_impl("geglu", "torch")
def geglu_torch(gate, up, approximate):
    """Reference: ``gelu(gate, approximate) * up``."""
    return F.gelu(gate, approximate=approximate) * up
