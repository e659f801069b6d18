"""Cross-entropy over large vocabularies: Triton kernels, autograd, torch reference.

Per row of logits x [N, V] with target t (``ignore_index`` rows count for nothing)::

    loss = (1 - eps) * (lse - x[t]) + eps * (lse - mean(x)) + z * lse**2,   lse = logsumexp(x)
    dx   = g * (softmax(x) * (1 + 2 z lse) - (1 - eps) * onehot(t) - eps / V)

which is ``F.cross_entropy(x.float(), t, label_smoothing=eps)`` plus PaLM's z-loss. One kernel
does both halves, chosen by constexprs: the forward sweeps each row once in tiles of V with an
online max/sum (no fp32 copy of the logits exists at any time) and writes the fp32 loss and lse
per row; the backward reads the row again and writes dx in the logits' dtype, one pass. The
fused linear cross-entropy (:mod:`.fused_linear_ce`) runs both in one launch over a chunk of
logits and writes the gradient over the logits in place (Liger-Kernel's trick): two passes over
the row, the second of which often comes from L2.

Targets outside ``[0, V)`` that are not ``ignore_index`` are caught on the host when
``KERNFORGE_CHECK_INDICES=1``; the kernel itself never reads outside the row for them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .. import device
from ..dispatch import register_impl
from .common import as_rows, new_like, new_output, op_call, triton_reason, upcast

REDUCTIONS = ("mean", "sum", "none")


@triton.jit
def _ce_kernel(
    X, DX, T, LOSS, LSE, G,
    V, stride_x, stride_dx, stride_g, ignore_index, smooth, z_loss,
    STATS: tl.constexpr, GRAD: tl.constexpr, SMOOTH: tl.constexpr, ZLOSS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):  # fmt: skip
    """One row per program. STATS: online logsumexp pass -> LOSS, LSE (else LSE is read).
    GRAD: a second pass writing ``G[row] * dloss/dx`` to DX (which may be X itself)."""
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_x
    t = tl.load(T + row).to(tl.int64)
    valid = t != ignore_index
    offs = tl.arange(0, BLOCK_V)
    if STATS:
        # An ignored row is not read at all (padding tokens cost no bandwidth).
        n_read = tl.where(valid, V, 0)
        # -FLT_MAX, not -inf: a tile of all -inf then rescales by exp(0), not exp(nan).
        m = -3.4028234663852886e38
        s = tl.zeros([BLOCK_V], dtype=tl.float32)
        sx = tl.zeros([BLOCK_V], dtype=tl.float32)
        for start in range(0, n_read, BLOCK_V):
            cols = start + offs
            cmask = cols < V
            x = tl.load(X + cols, mask=cmask, other=-float("inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
            m = m_new
            if SMOOTH:
                sx += tl.where(cmask, x, 0.0)
        # sum(s) >= 1 for a row that was read (its max contributes exp(0)); the floor only keeps
        # log() finite for an ignored row, whose result is discarded below.
        lse = m + tl.log(tl.maximum(tl.sum(s, axis=0), 1e-30))
        lse = tl.where(valid, lse, 0.0)  # an ignored row was not read: lse 0, loss 0
        in_range = valid & (t >= 0) & (t < V)
        xt = tl.load(X + t, mask=in_range, other=0.0).to(tl.float32)
        loss = lse - xt
        if SMOOTH:
            loss = (1.0 - smooth) * loss + smooth * (lse - tl.sum(sx, axis=0) / V)
        if ZLOSS:
            loss += z_loss * lse * lse
        tl.store(LOSS + row, tl.where(valid, loss, 0.0))
        tl.store(LSE + row, lse)
    else:
        lse = tl.load(LSE + row)
    if GRAD:
        DX += row * stride_dx
        g = tl.where(valid, tl.load(G + row * stride_g).to(tl.float32), 0.0)
        coef = g
        if ZLOSS:
            coef = g * (1.0 + 2.0 * z_loss * lse)
        g_target = g * (1.0 - smooth)
        g_uniform = g * smooth / V
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            cmask = cols < V
            # Ignored rows are written (zeros) but not read.
            x = tl.load(X + cols, mask=cmask & valid, other=0.0).to(tl.float32)
            dx = coef * tl.exp(x - lse) - tl.where(cols == t, g_target, 0.0)
            if SMOOTH:
                dx -= g_uniform
            dx = tl.where(valid, dx, 0.0)
            tl.store(DX + cols, dx.to(DX.dtype.element_ty), mask=cmask)


@dataclass(frozen=True)
class CELaunch:
    """Vocabulary tile of one step (at most) and warps per program (one program per row)."""

    block_v: int
    num_warps: int


#: Launch sizes per pass, for rows wider than the tile (smaller rows take a tile of their
#: width). GPU sizes are the best of bench.cases_losses.sweep_ce on an H100 (bf16, 8192 x
#: 128256; tiles 4096/8192/16384 x 8/16 warps): forward 2.90 TB/s, backward 2.88, fused in
#: place 2.93 (bytes moved over time: 1, 2 and 3 passes over the logits); most others were
#: within 2%, 16 warps on 8192-wide forward tiles 12% slower. Under the interpreter one
#: program runs at a time, so the tile is as large as is cheap, yet small enough that the
#: tests cross tile edges.
LAUNCH: dict[str, CELaunch] = (
    {"fwd": CELaunch(4096, 1), "bwd": CELaunch(4096, 1), "fused": CELaunch(4096, 1)}
    if device.INTERPRET
    else {"fwd": CELaunch(8192, 8), "bwd": CELaunch(16384, 16), "fused": CELaunch(8192, 8)}
)


def _config(kind: str, v: int) -> tuple[int, int]:
    cfg = LAUNCH[kind]
    block = min(triton.next_power_of_2(max(v, 1)), cfg.block_v)
    if block == cfg.block_v:
        return block, cfg.num_warps
    # Rows narrower than the tile: fewer warps, ~16 elements per thread.
    return block, max(1, min(cfg.num_warps, block // 512))


def launch_ce(
    x2: torch.Tensor,
    dx2: torch.Tensor | None,
    target: torch.Tensor,
    losses: torch.Tensor | None,
    lse: torch.Tensor,
    g: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
) -> None:
    """Run the cross-entropy kernel over the rows of ``x2`` [n, V] (unit column stride).

    ``losses`` given: the statistics pass writes losses and ``lse`` (else ``lse`` is read).
    ``dx2`` given: the gradient pass writes ``g[row] * dloss/dx`` to it (``dx2`` may be ``x2``:
    in place); ``g`` is fp32 [n] or a one-element tensor for every row.
    """
    n, v = x2.shape
    if n == 0:
        return
    stats, grad = losses is not None, dx2 is not None
    kind = "fused" if stats and grad else ("fwd" if stats else "bwd")
    block, warps = _config(kind, v)
    g_stride = 0 if g is None or g.numel() == 1 else g.stride(0)
    _ce_kernel[(n,)](
        x2, dx2 if grad else x2, target, losses if stats else lse, lse, g if grad else lse,
        v, x2.stride(0), dx2.stride(0) if grad else 0, g_stride, ignore_index,
        float(label_smoothing), float(z_loss),
        STATS=stats, GRAD=grad, SMOOTH=label_smoothing != 0.0, ZLOSS=z_loss != 0.0,
        BLOCK_V=block, num_warps=warps,
    )  # fmt: skip


def _flat_target(target: torch.Tensor) -> torch.Tensor:
    return target.reshape(-1).contiguous()


@torch.library.custom_op("kernforge::cross_entropy_fwd", mutates_args=())
def cross_entropy_fwd(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int, label_smoothing: float,
    z_loss: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Triton forward: (loss, lse) per row, fp32 [N] (0 at ignored rows)."""
    x2 = as_rows(logits)
    n = x2.shape[0]
    losses = new_output((n,), torch.float32, logits.device)
    lse = new_output((n,), torch.float32, logits.device)
    launch_ce(x2, None, _flat_target(target), losses, lse, None, ignore_index, label_smoothing,
              z_loss)  # fmt: skip
    return losses, lse


@cross_entropy_fwd.register_fake
def _(logits, target, ignore_index, label_smoothing, z_loss):
    n = logits.shape[:-1].numel()
    row = torch.empty(n, dtype=torch.float32, device=logits.device)
    return row, torch.empty_like(row)


@torch.library.custom_op("kernforge::cross_entropy_bwd", mutates_args=())
def cross_entropy_bwd(
    logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, g: torch.Tensor,
    ignore_index: int, label_smoothing: float, z_loss: float,
) -> torch.Tensor:  # fmt: skip
    """Triton backward: dlogits (logits' shape and dtype, contiguous) for per-row gradients
    ``g`` (fp32 [N], or one element for every row)."""
    x2 = as_rows(logits)
    dx = new_like(logits)
    launch_ce(x2, dx.view(x2.shape), _flat_target(target), None, lse, g.float(), ignore_index,
              label_smoothing, z_loss)  # fmt: skip
    return dx


@cross_entropy_bwd.register_fake
def _(logits, target, lse, g, ignore_index, label_smoothing, z_loss):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def valid_count(target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Non-ignored targets, at least 1 (the "mean" divisor: no targets gives 0, not NaN); a
    device tensor, so no host sync."""
    return (target != ignore_index).sum().clamp(min=1)


def reduce_losses(losses: torch.Tensor, target: torch.Tensor, ignore_index: int,
                  reduction: str) -> torch.Tensor:  # fmt: skip
    """Per-row fp32 losses -> the reduced loss (``"none"``: target's shape)."""
    if reduction == "mean":
        return losses.sum() / valid_count(target, ignore_index)
    if reduction == "sum":
        return losses.sum()
    return losses.view(target.shape)


def row_grads(g: torch.Tensor, target: torch.Tensor, ignore_index: int,
              reduction: str) -> torch.Tensor:  # fmt: skip
    """The gradient reaching each row's loss, fp32: one element for "mean"/"sum", [N] else."""
    g = g.float()
    if reduction == "mean":
        return (g / valid_count(target, ignore_index)).reshape(1)
    if reduction == "sum":
        return g.reshape(1)
    return g.reshape(-1)


class CrossEntropyFunction(torch.autograd.Function):
    """Autograd for the Triton cross-entropy: saves logits, target and lse (fp32 [N])."""

    @staticmethod
    def forward(ctx, logits, target, ignore_index, label_smoothing, z_loss, reduction):
        losses, lse = op_call(
            cross_entropy_fwd, logits, target, ignore_index, label_smoothing, z_loss
        )
        ctx.save_for_backward(logits, target, lse)
        ctx.args = (ignore_index, label_smoothing, z_loss, reduction)
        return reduce_losses(losses, target, ignore_index, reduction)

    @staticmethod
    def backward(ctx, grad):
        logits, target, lse = ctx.saved_tensors
        ignore_index, label_smoothing, z_loss, reduction = ctx.args
        g = row_grads(grad, target, ignore_index, reduction)
        dx = op_call(cross_entropy_bwd, logits, target, lse, g, ignore_index, label_smoothing,
                     z_loss)  # fmt: skip
        return dx, None, None, None, None, None


def _supports_triton(logits, target, ignore_index, label_smoothing, z_loss, reduction):
    return triton_reason(logits) or (
        None if target.device == logits.device else f"target is on {target.device}"
    )


@register_impl("cross_entropy", "triton", supports=_supports_triton)
def cross_entropy_triton(logits, target, ignore_index, label_smoothing, z_loss, reduction):
    """Triton cross-entropy (forward and backward kernels; no fp32 copy of the logits)."""
    return CrossEntropyFunction.apply(
        logits, target, ignore_index, label_smoothing, z_loss, reduction
    )


@register_impl("cross_entropy", "torch")
def cross_entropy_torch(logits, target, ignore_index, label_smoothing, z_loss, reduction):
    """Reference: the formula in eager torch on an fp32 (fp64 for fp64) copy of the logits."""
    v = logits.shape[-1]
    x = upcast(logits).reshape(-1, v)
    t = target.reshape(-1).long()
    valid = t != ignore_index
    lse = torch.logsumexp(x, dim=-1)
    xt = x.gather(1, torch.where(valid, t, 0).clamp(0, v - 1)[:, None]).squeeze(1)
    loss = lse - xt
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - x.mean(-1))
    if z_loss:
        loss = loss + z_loss * lse * lse
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "mean":
        return loss.sum() / valid.sum().clamp(min=1)
    if reduction == "sum":
        return loss.sum()
    return loss.view(target.shape)
