"""Fused linear cross-entropy: ``cross_entropy(hidden @ weight.T + bias, target)`` without ever
holding the [tokens, vocab] logits.

The tokens are taken a chunk at a time. Per chunk: the chunk's logits by cuBLAS
(``torch.mm``/``addmm`` in the input dtype, into one reused buffer), then one launch of the
cross-entropy kernel (:mod:`.cross_entropy`) that writes the chunk's losses and overwrites its
logits with ``dloss/dlogits`` (already divided by the "mean" denominator, which is counted on
the device up front), then ``dh_chunk = dlogits @ W`` straight into its rows of one dh,
``dW += dlogits.T @ h_chunk`` (``addmm_`` into one dW in the weight's dtype: an fp32
accumulator would double dW's memory) and ``db += dlogits.sum(0)``. So the gradients are
finished during the forward (as in Liger-Kernel) and the backward only scales them by the
incoming gradient, in place. Extra memory: one chunk of logits (:data:`CHUNK_BYTES` at most by
default) besides the gradients themselves.

``reduction="none"`` cannot finish the gradients early (each token's incoming gradient is
only known in the backward): its forward computes the losses alone, and its backward
recomputes the logits chunk by chunk (one more GEMM). With no gradient needed (inference, or
no input requiring grad), the forward computes the losses alone too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import register_impl
from ..errors import UnsupportedError
from .common import new_output, op_call, triton_reason
from .cross_entropy import cross_entropy_torch, launch_ce, valid_count

#: Default chunk: the most tokens whose logits fit in this many bytes, a power of two between
#: :data:`MIN_CHUNK` and the token count. Measured on an H100 (bf16, 8192 tokens x 4096 x
#: 128256, forward+backward; the unfused eager path: 52.6 ms, 14.7 GB extra): chunks of 512
#: tokens 47.7 ms / 1.25 GB, 1024 (this default) 41.1 ms / 1.38 GB, 2048 40.9 ms / 1.64 GB.
#: Smaller chunks cost time because the dW GEMM re-reads and re-writes all of dW per chunk.
CHUNK_BYTES = 256 << 20
MIN_CHUNK = 64


def default_chunk(tokens: int, vocab: int, elem_bytes: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Tokens per chunk when ``chunk_size`` is None: the most whose logits fit in
    ``chunk_bytes`` (see :data:`CHUNK_BYTES`), a power of two, at least :data:`MIN_CHUNK`."""
    rows = max(1, chunk_bytes // max(1, vocab * elem_bytes))
    chunk = max(MIN_CHUNK, 1 << (rows.bit_length() - 1))
    return max(1, min(chunk, tokens))


@triton.jit
def _rescale_kernel(X, Y, G, APPLIED, n, IN_PLACE: tl.constexpr, BLOCK: tl.constexpr):
    """``Y = X * G / APPLIED``. In place (Y is X) nothing is read or written when the factor is
    1: a grad_output of 1, the usual case, costs no pass over dW."""
    f = tl.load(G).to(tl.float32) / tl.load(APPLIED)
    if (f != 1.0) | (not IN_PLACE):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(X + offs, mask=mask).to(tl.float32)
        tl.store(Y + offs, (x * f).to(Y.dtype.element_ty), mask=mask)


def _rescale(t: torch.Tensor, g: torch.Tensor, applied: torch.Tensor, in_place: bool):
    """``t * g / applied`` (one-element fp32 tensors), in place or into a new tensor."""
    out = t if in_place else torch.empty_like(t)
    n = t.numel()
    if n:
        block = 4096
        _rescale_kernel[(triton.cdiv(n, block),)](t, out, g, applied, n, IN_PLACE=in_place,
                                                   BLOCK=block, num_warps=8)  # fmt: skip
    return out


def _empty(like: torch.Tensor) -> torch.Tensor:
    return torch.empty(0, dtype=like.dtype, device=like.device)


def _chunks(
    h2, weight, target, bias, g, ignore_index, label_smoothing, z_loss, chunk,
    need_dh, need_dw, need_db, losses, lse,
):  # fmt: skip
    """The chunk loop. Writes per-token ``losses``/``lse``; with ``g`` (one element, or one per
    token) also returns the gradients ``(dh, dW, db)`` for that incoming gradient (empty where
    not needed)."""
    n, hidden = h2.shape
    v = weight.shape[0]
    grad = g is not None and (need_dh or need_dw or need_db)
    dh = new_output((n, hidden), h2.dtype, h2.device) if grad and need_dh else _empty(h2)
    if grad and need_dw:
        dw = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    else:
        dw = _empty(weight)
    db = torch.zeros(v, dtype=torch.float32, device=h2.device) if grad and need_db else None
    if grad and need_dw and n == 0:
        dw.zero_()
    logits = torch.empty((min(chunk, n), v), dtype=h2.dtype, device=h2.device)
    wt = weight.t()
    for c0 in range(0, n, chunk):
        c1 = min(c0 + chunk, n)
        hc, lg = h2[c0:c1], logits[: c1 - c0]
        if bias is None:
            torch.mm(hc, wt, out=lg)
        else:
            torch.addmm(bias, hc, wt, out=lg)
        gc = g if g is None or g.numel() == 1 else g[c0:c1]
        launch_ce(lg, lg if grad else None, target[c0:c1], losses[c0:c1], lse[c0:c1], gc,
                  ignore_index, label_smoothing, z_loss)  # fmt: skip
        if not grad:
            continue
        if need_dh:
            torch.mm(lg, weight, out=dh[c0:c1])
        if need_dw:
            if c0 == 0:
                torch.mm(lg.t(), hc, out=dw)
            else:
                dw.addmm_(lg.t(), hc)
        if need_db:
            db += lg.sum(0, dtype=torch.float32)
    db = db.to(bias.dtype) if db is not None else _empty(h2)
    return dh, dw, db


@torch.library.custom_op("kernforge::fused_linear_ce_fwd", mutates_args=())
def fused_linear_ce_fwd(
    hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None,
    ignore_index: int, label_smoothing: float, z_loss: float, mean: bool, chunk: int,
    need_dh: bool, need_dw: bool, need_db: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per-token (loss, lse) fp32 [N] and the gradients (dh, dW, db) of the "mean" (``mean``)
    or "sum" loss for an incoming gradient of 1; a gradient not asked for is empty."""
    n = hidden.shape[0]
    losses = new_output((n,), torch.float32, hidden.device)
    lse = new_output((n,), torch.float32, hidden.device)
    t = target.reshape(-1).contiguous()
    if mean:
        g = (1.0 / valid_count(t, ignore_index).float()).reshape(1)
    else:
        g = torch.ones(1, dtype=torch.float32, device=hidden.device)
    dh, dw, db = _chunks(hidden, weight, t, bias, g, ignore_index, label_smoothing, z_loss, chunk,
                         need_dh, need_dw, need_db, losses, lse)  # fmt: skip
    return losses, lse, dh, dw, db


def _grad_shapes(hidden, weight, bias, need_dh, need_dw, need_db):
    def like(t: torch.Tensor) -> torch.Tensor:
        return torch.empty(t.shape, dtype=t.dtype, device=t.device)  # contiguous, as the op's

    dh = like(hidden) if need_dh else _empty(hidden)
    dw = like(weight) if need_dw else _empty(weight)
    db = like(bias) if bias is not None and need_db else _empty(hidden)
    return dh, dw, db


@fused_linear_ce_fwd.register_fake
def _(hidden, weight, target, bias, ignore_index, label_smoothing, z_loss, mean, chunk,
      need_dh, need_dw, need_db):  # fmt: skip
    row = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    return (row, torch.empty_like(row),
            *_grad_shapes(hidden, weight, bias, need_dh, need_dw, need_db))  # fmt: skip


@torch.library.custom_op("kernforge::fused_linear_ce_bwd", mutates_args=())
def fused_linear_ce_bwd(
    hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None,
    g: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float, chunk: int,
    need_dh: bool, need_dw: bool, need_db: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Gradients (dh, dW, db) for per-token incoming gradients ``g`` [N] (``reduction="none"``):
    the logits are recomputed chunk by chunk."""
    n = hidden.shape[0]
    losses = torch.empty(n, dtype=torch.float32, device=hidden.device)  # recomputed, unused
    lse = torch.empty_like(losses)
    t = target.reshape(-1).contiguous()
    g = g.float().contiguous()
    return _chunks(hidden, weight, t, bias, g, ignore_index, label_smoothing, z_loss, chunk,
                   need_dh, need_dw, need_db, losses, lse)  # fmt: skip


@fused_linear_ce_bwd.register_fake
def _(hidden, weight, target, bias, g, ignore_index, label_smoothing, z_loss, chunk,
      need_dh, need_dw, need_db):  # fmt: skip
    return _grad_shapes(hidden, weight, bias, need_dh, need_dw, need_db)


class FusedLinearCEFunction(torch.autograd.Function):
    """Autograd for the fused linear cross-entropy on 2-D hidden [N, H].

    "mean"/"sum": the gradients come out of the forward (for an incoming gradient of 1) and
    the first backward scales them in place by the incoming gradient g1 and hands them out
    (no copy: autograd then moves them into ``.grad``). A later backward through a retained
    graph returns new tensors scaled by g2 / g1 (so it is wrong, NaN, only when g1 was 0).
    Under torch.compile the scaling is out of place. "none": the backward recomputes.
    """

    @staticmethod
    def forward(ctx, hidden, weight, target, bias, ignore_index, label_smoothing, z_loss,
                reduction, chunk, need_dh, need_dw, need_db):  # fmt: skip
        grad = need_dh or need_dw or need_db
        early = grad and reduction != "none"
        losses, _, dh, dw, db = op_call(
            fused_linear_ce_fwd,
            hidden,
            weight,
            target,
            bias,
            ignore_index,
            label_smoothing,
            z_loss,
            reduction == "mean",
            chunk,
            need_dh and early,
            need_dw and early,
            need_db and early,
        )
        ctx.args = (ignore_index, label_smoothing, z_loss, reduction, chunk)
        ctx.need = (need_dh, need_dw, need_db)
        ctx.has_bias = bias is not None
        if reduction == "none":
            ctx.save_for_backward(hidden, weight, target, bias)
            return losses.view(target.shape)
        ctx.save_for_backward(dh, dw, db)
        if not torch.compiler.is_compiling():
            # The incoming gradient applied to the saved gradients (1 until the first backward).
            ctx.applied = torch.ones(1, dtype=torch.float32, device=hidden.device)
            ctx.handed_out = False
        if reduction == "mean":
            return losses.sum() / valid_count(target, ignore_index)
        return losses.sum()

    @staticmethod
    def backward(ctx, grad):
        ignore_index, label_smoothing, z_loss, reduction, chunk = ctx.args
        need_dh, need_dw, need_db = ctx.need
        if reduction == "none":
            hidden, weight, target, bias = ctx.saved_tensors
            dh, dw, db = op_call(
                fused_linear_ce_bwd,
                hidden,
                weight,
                target,
                bias,
                grad.reshape(-1),
                ignore_index,
                label_smoothing,
                z_loss,
                chunk,
                need_dh,
                need_dw,
                need_db,
            )
        else:
            try:
                dh, dw, db = ctx.saved_tensors
            except RuntimeError as exc:  # the first backward's results were modified in .grad
                raise UnsupportedError(
                    "fused_linear_cross_entropy: a second backward through a retained graph, "
                    "after the first one's gradients went into .grad and were added to there. "
                    "The gradients are computed in the forward and handed to .grad without a "
                    "copy (a copy of dW would double the memory); run the forward again, or "
                    "take repeated gradients with torch.autograd.grad"
                ) from exc
            g = grad.float().reshape(1)
            if torch.compiler.is_compiling():
                dh, dw, db = (t * g.reshape(()) for t in (dh, dw, db))  # fp32 math, t's dtype
            elif not ctx.handed_out:
                # In place: a copy of dW (1 GB at a 128k vocabulary) would cost as much memory
                # as everything else here together.
                dh, dw, db = (_rescale(t, g, ctx.applied, True) for t in (dh, dw, db))
                ctx.applied.copy_(g)
                ctx.handed_out = True
            else:  # the first results are the caller's now: leave them alone
                dh, dw, db = (_rescale(t, g, ctx.applied, False) for t in (dh, dw, db))
        return (dh if need_dh else None, dw if need_dw else None, None,
                db if ctx.has_bias and need_db else None,
                None, None, None, None, None, None, None, None)  # fmt: skip


def _supports_triton(hidden, weight, target, bias, ignore_index, label_smoothing, z_loss,
                     reduction, chunk_size):  # fmt: skip
    return triton_reason(hidden, weight, bias) or (
        None if target.device == hidden.device else f"target is on {target.device}"
    )


@register_impl("fused_linear_cross_entropy", "triton", supports=_supports_triton)
def fused_linear_cross_entropy_triton(hidden, weight, target, bias, ignore_index,
                                      label_smoothing, z_loss, reduction, chunk_size):  # fmt: skip
    """Chunked cuBLAS logits + the in-place Triton cross-entropy; no [N, V] logits."""
    h2 = hidden.reshape(-1, hidden.shape[-1])
    chunk = chunk_size or default_chunk(h2.shape[0], weight.shape[0], hidden.element_size())
    grad_on = torch.is_grad_enabled()
    need_dh = grad_on and hidden.requires_grad
    need_dw = grad_on and weight.requires_grad
    need_db = grad_on and bias is not None and bias.requires_grad
    return FusedLinearCEFunction.apply(
        h2,
        weight,
        target.reshape(-1),
        bias,
        ignore_index,
        label_smoothing,
        z_loss,
        reduction,
        chunk,
        need_dh,
        need_dw,
        need_db,
    ).view(target.shape if reduction == "none" else ())


@register_impl("fused_linear_cross_entropy", "torch")
def fused_linear_cross_entropy_torch(hidden, weight, target, bias, ignore_index,
                                     label_smoothing, z_loss, reduction, chunk_size):  # fmt: skip
    """Reference: the whole logits (in the input dtype), then :func:`cross_entropy_torch`."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return cross_entropy_torch(logits, target, ignore_index, label_smoothing, z_loss, reduction)
