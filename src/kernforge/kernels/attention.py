"""Flash attention (``ops.fmha``, ``ops.fmha_varlen``): launch configs, custom ops, autograd,
input checks and the torch reference.

The Triton kernels live in :mod:`.attention_fwd` (forward) and :mod:`.attention_bwd`
(backward). Both read q, k, v through (batch, seq, head) strides with a unit head-dim stride, so
the [B, S, H, D] and [B, H, S, D] layouts and views need no copies; packed variable-length
batches use the same kernels with per-sequence offsets from ``cu_seqlens``. Outputs (out, dq,
dk, dv) are contiguous in their input's layout. Eager calls run the kernels directly; under
torch.compile the same work goes through ``kernforge::fmha_fwd``/``fmha_bwd``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .. import checks, device
from ..dispatch import get_backend, register_impl
from ..errors import ArgumentError, DTypeError, ShapeError
from ..tune import space as tune_space
from .attention_bwd import group_sum, launch_bwd
from .attention_fwd import launch_fwd
from .common import new_output, op_call, triton_reason

#: Input dtypes of the Triton kernels (fp32 and fp64 run on the torch backend).
KERNEL_DTYPES = (torch.float16, torch.bfloat16)
#: Largest head dim the kernels hold (FlashAttention 2's limit too); it must be a multiple of 8.
MAX_HEAD_DIM = 256


@dataclass(frozen=True)
class FwdConfig:
    """Tiles of the forward kernel: BLOCK_M queries per program, BLOCK_N keys per step; ``tma``
    reads through tensor descriptors (sm_90), ``warp_spec`` adds warp specialization to it."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    tma: bool = False
    warp_spec: bool = False


@dataclass(frozen=True)
class KernelConfig:
    """Tiles of one backward kernel (dK/dV: BLOCK_N keys own a program; dQ: BLOCK_M queries)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    tma: bool = False


@dataclass(frozen=True)
class BwdConfig:
    """Tiles of the two backward kernels."""

    dkdv: KernelConfig
    dq: KernelConfig


#: Under the interpreter programs run one after another: small tiles so that short test
#: sequences still cross tile edges, few launches' worth of numpy work each.
INTERPRET_FWD = FwdConfig(32, 16, 4, 1)
INTERPRET_BWD = BwdConfig(KernelConfig(16, 32, 4, 1), KernelConfig(32, 16, 4, 1))

#: GPU configs by (padded head dim, causal-or-windowed[, sequence bucket]): the fastest correct
#: candidate on an H100 of benchmarks/attention_sweep.py (bf16, 16k tokens per batch; results in
#: benchmarks/results/attention_fmha.sweep.json, docs/attention.md). A key without a bucket
#: serves every bucket not listed.
# TODO(tune): hand the best few per key to kernforge.tune once shapes beyond the bars matter.
SEQ_BUCKETS = (1024, 4096, 16384)
_F, _K = FwdConfig, KernelConfig
FWD_CONFIGS: dict[tuple, FwdConfig] = {
    (64, False, 1024): _F(128, 64, 8, 3),
    (64, False, 4096): _F(128, 64, 8, 3),
    (64, False, 16384): _F(128, 64, 4, 3, tma=True),
    (64, True, 1024): _F(128, 64, 8, 3),
    (64, True, 4096): _F(128, 64, 8, 3),
    (64, True, 16384): _F(128, 64, 8, 3),
    (128, False, 1024): _F(64, 64, 4, 3, tma=True),
    (128, False, 4096): _F(128, 128, 8, 3, tma=True),
    (128, False, 16384): _F(128, 64, 8, 3, tma=True),
    (128, True, 1024): _F(64, 64, 4, 3),
    (128, True, 4096): _F(128, 128, 8, 3, tma=True),
    (128, True, 16384): _F(128, 128, 8, 3, tma=True),
    (256, False): _F(128, 64, 8, 2, tma=True),
}
BWD_CONFIGS: dict[tuple, BwdConfig] = {
    (64, False, 1024): BwdConfig(_K(32, 64, 4, 3), _K(128, 64, 8, 3, True)),
    (64, False): BwdConfig(_K(32, 128, 4, 3, True), _K(128, 64, 8, 3, True)),
    # Re-timed (session 7) at [4, 2048, 32 q / 8 kv heads, 64] (the issue-7 training step) and
    # [16, 1024, 32, 64]: dkdv 0.495 / 0.456 ms (was 0.507 / 0.457), dq 0.321 / 0.268 ms (was
    # 0.380 / 0.274 with TMA).
    (64, True, 1024): BwdConfig(_K(32, 128, 4, 3), _K(64, 32, 4, 3)),
    (64, True, 4096): BwdConfig(_K(32, 64, 4, 3, True), _K(64, 64, 4, 3, True)),
    (64, True, 16384): BwdConfig(_K(32, 128, 4, 3, True), _K(64, 64, 4, 3, True)),
    (128, False, 1024): BwdConfig(_K(32, 64, 4, 3), _K(128, 64, 8, 3, True)),
    (128, False): BwdConfig(_K(32, 64, 4, 3, True), _K(128, 64, 8, 3, True)),
    (128, True, 1024): BwdConfig(_K(32, 64, 4, 3), _K(64, 64, 4, 2, True)),
    (128, True): BwdConfig(_K(32, 64, 4, 3, True), _K(128, 64, 8, 4, True)),
    (256, False): BwdConfig(_K(32, 32, 4, 2), _K(32, 32, 4, 2, True)),
}


#: Packed (varlen) batches by (padded head dim, causal-or-windowed), where they differ from the
#: dense table: measured on an H100 on the issue's mix of ten lengths (16k tokens, 16 heads,
#: bf16, tiles scheduled costliest first; benchmarks/results/attention.md). Short sequences
#: make short programs, and two 64-row programs per SM hide each other's set-up and write-back.
VARLEN_FWD_CONFIGS: dict[tuple, FwdConfig] = {
    (128, False): _F(64, 64, 4, 3, tma=True),
    (128, True): _F(128, 128, 8, 3),
}


def seq_bucket(seq: int) -> int:
    """The :data:`SEQ_BUCKETS` entry nearest ``seq`` (in log scale)."""
    return 1024 if seq <= 2048 else 4096 if seq <= 8192 else 16384


def _lookup(table: dict, head_dim: int, masked: bool, seq: int):
    bd = max(64, _block_d(head_dim))  # head dims under 64 take the 64 configs
    for key in ((bd, masked, seq_bucket(seq)), (bd, masked), (bd, False)):
        if key in table:
            return table[key]
    raise KeyError(f"no attention config for head dim {head_dim}")


_forced: dict[str, object] = {}


@contextmanager
def force_config(fwd: FwdConfig | None = None, bwd: BwdConfig | None = None) -> Iterator[None]:
    """Run the kernels with these configs inside (tests cover every code path with it; the
    sweep times candidates). A TMA config still falls back to pointer loads for unaligned
    inputs."""
    before = dict(_forced)
    _forced.update({k: v for k, v in (("fwd", fwd), ("bwd", bwd)) if v is not None})
    try:
        yield
    finally:
        _forced.clear()
        _forced.update(before)


def _block_d(head_dim: int) -> int:
    return max(16, 1 << (head_dim - 1).bit_length())


def fwd_config(head_dim: int, masked: bool, seq: int = 4096) -> FwdConfig:
    """The forward config for this head dim, causal/windowed or not, and longest sequence."""
    forced = _forced.get("fwd")
    if forced is not None:
        return forced  # type: ignore[return-value]
    if device.INTERPRET:
        return INTERPRET_FWD
    return _lookup(FWD_CONFIGS, head_dim, masked, seq)


def bwd_config(head_dim: int, masked: bool, seq: int = 4096) -> BwdConfig:
    """The backward configs for this head dim, causal/windowed or not, and longest sequence."""
    forced = _forced.get("bwd")
    if forced is not None:
        return forced  # type: ignore[return-value]
    if device.INTERPRET:
        return INTERPRET_BWD
    return _lookup(BWD_CONFIGS, head_dim, masked, seq)


# ---------------------------------------------------------------------------------------------
# Argument normalisation and checks (the public ops in kernforge.ops call these)


def window_bounds(causal: bool, window) -> tuple[int, int]:
    """``(left, right)`` key offsets around the diagonal, -1 for unbounded; causal sets right 0."""
    if window is None:
        left, right = -1, -1
    elif isinstance(window, int) and not isinstance(window, bool):
        left, right = window, -1
    elif (
        isinstance(window, tuple | list)
        and len(window) == 2
        and all(isinstance(w, int) and not isinstance(w, bool) for w in window)
    ):
        left, right = int(window[0]), int(window[1])
    else:
        raise ArgumentError(
            f"window={window!r}; use None, an int (left size) or a (left, right) pair of ints, "
            "-1 meaning unbounded"
        )
    if left < -1 or right < -1:
        raise ArgumentError(f"window={window!r}: sizes must be >= 0, or -1 for unbounded")
    if causal:
        right = 0
    return left, right


def softcap_value(softcap) -> float:
    """The softcap as a float, 0.0 meaning none."""
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, int | float) or softcap < 0:
        raise ArgumentError(f"softcap={softcap!r}; use None (or 0) for none, or a positive float")
    return float(softcap)


def scale_value(scale, head_dim: int) -> float:
    """The score scale: 1/sqrt(head_dim) unless given."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, int | float):
        raise ArgumentError(f"scale={scale!r}; use None (1/sqrt(head_dim)) or a float")
    return float(scale)


def _check_qkv(op: str, q, k, v, rank: int, what: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != rank:
            raise ShapeError(f"{op}: {name} must be {rank}-D {what}, got shape {tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise DTypeError(f"{op}: {name} has dtype {t.dtype}; expected float16 or bfloat16")
    checks.same_dtype(op, q=q, k=k, v=v)
    checks.same_device(op, q=q, k=k, v=v)
    if k.shape != v.shape:
        raise ShapeError(f"{op}: k {tuple(k.shape)} and v {tuple(v.shape)} must have one shape")
    d = q.shape[-1]
    if k.shape[-1] != d:
        raise ShapeError(
            f"{op}: head dims differ: q has {d}, k and v have {k.shape[-1]}; they must match"
        )
    if d % 8 or not 8 <= d <= MAX_HEAD_DIM:
        raise ShapeError(
            f"{op}: head dim {d} is not supported; use a multiple of 8 up to {MAX_HEAD_DIM} "
            "(64, 96, 128 and 256 are tuned), padding the head dim if needed"
        )


def _check_heads(op: str, hq: int, hk: int) -> None:
    if hk == 0 or hq % hk:
        raise ShapeError(
            f"{op}: q has {hq} heads and k/v have {hk}: the kv heads must divide the q heads "
            "(GQA/MQA); repeat or regroup the kv heads"
        )


def check_fmha(q, k, v, causal, scale, window, softcap, layout, return_lse) -> None:
    """Input checks of ``ops.fmha`` (raise before any kernel runs)."""
    op = "fmha"
    if layout not in ("bshd", "bhsd"):
        raise ArgumentError(f"fmha: layout={layout!r}; use 'bshd' or 'bhsd'")
    what = "[batch, seq, heads, head_dim]" if layout == "bshd" else "[batch, heads, seq, head_dim]"
    _check_qkv(op, q, k, v, 4, what)
    h_ax = 2 if layout == "bshd" else 1
    if k.shape[0] != q.shape[0]:
        raise ShapeError(f"fmha: q has batch {q.shape[0]}, k/v have {k.shape[0]}; they must match")
    _check_heads(op, q.shape[h_ax], k.shape[h_ax])
    window_bounds(bool(causal), window)
    softcap_value(softcap)
    scale_value(scale, q.shape[-1])


def check_fmha_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                      causal, scale, window, softcap, return_lse) -> None:  # fmt: skip
    """Input checks of ``ops.fmha_varlen``; the cu_seqlens values are checked (a device sync)
    only when ``KERNFORGE_CHECK_INDICES=1``."""
    op = "fmha_varlen"
    _check_qkv(op, q, k, v, 3, "[total_tokens, heads, head_dim]")
    _check_heads(op, q.shape[1], k.shape[1])
    for name, cu, total in (("cu_seqlens_q", cu_seqlens_q, q.shape[0]),
                            ("cu_seqlens_k", cu_seqlens_k, k.shape[0])):  # fmt: skip
        if not isinstance(cu, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(cu).__name__}")
        if cu.dtype != torch.int32:
            raise DTypeError(f"{op}: {name} must be int32, got {cu.dtype}; use .int()")
        if cu.dim() != 1 or cu.shape[0] < 1:
            raise ShapeError(f"{op}: {name} must be 1-D [batch + 1], got shape {tuple(cu.shape)}")
        if cu.device != q.device:
            from ..errors import DeviceError

            raise DeviceError(f"{op}: {name} is on {cu.device}, q on {q.device}")
        del total
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ShapeError(
            f"{op}: cu_seqlens_q {tuple(cu_seqlens_q.shape)} and cu_seqlens_k "
            f"{tuple(cu_seqlens_k.shape)} must both be [batch + 1]"
        )
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise ArgumentError(f"{op}: {name}={m!r}; use a non-negative int")
    window_bounds(bool(causal), window)
    softcap_value(softcap)
    scale_value(scale, q.shape[-1])
    if checks.index_checks_on():
        for name, cu, total, most in (
            ("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q),
            ("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k),
        ):
            vals = cu.tolist()
            lens = [b - a for a, b in zip(vals[:-1], vals[1:], strict=True)]
            if vals[0] != 0 or any(n < 0 for n in lens) or vals[-1] != total:
                raise ShapeError(
                    f"{op}: {name} must start at 0, not decrease, and end at the token count "
                    f"{total}; got {vals[:8]}{'...' if len(vals) > 8 else ''} (set "
                    "KERNFORGE_CHECK_INDICES=0 to skip this check, which syncs the device)"
                )
            if lens and max(lens) > most:
                raise ShapeError(
                    f"{op}: a sequence has {max(lens)} tokens, more than max_seqlen "
                    f"{most} ({name}); pass the true maximum"
                )


# ---------------------------------------------------------------------------------------------
# Launch wrappers


def _bsh_strides(t: torch.Tensor, layout: str) -> tuple[int, int, int]:
    """(batch, seq, head) strides of a q/k/v/o-like tensor; packed ("thd") has no batch."""
    if layout == "bshd":
        return t.stride(0), t.stride(1), t.stride(2)
    if layout == "bhsd":
        return t.stride(0), t.stride(2), t.stride(1)
    return 0, t.stride(0), t.stride(1)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _tma_ok(*tensors: torch.Tensor) -> bool:
    """Tensor descriptors need 16-byte aligned bases and strides (and sm_90)."""
    if device.INTERPRET:
        return True
    cap = device.capability()
    if cap is None or cap < (9, 0):
        return False
    for t in tensors:
        es = t.element_size()
        if t.data_ptr() % 16 or any((s * es) % 16 for s in t.stride()[:-1]):
            return False
    return True


def _no_tma(cfg):
    import dataclasses

    if isinstance(cfg, BwdConfig):
        return BwdConfig(
            dataclasses.replace(cfg.dkdv, tma=False), dataclasses.replace(cfg.dq, tma=False)
        )
    return dataclasses.replace(cfg, tma=False, warp_spec=False)


def _ensure_allocator() -> None:
    """Device-made tensor descriptors need scratch memory from a Triton allocator. Triton keeps
    it in a ContextVar, so each thread (autograd runs the backward on its own) needs one."""
    if device.INTERPRET:
        return
    from triton.runtime import _allocation

    if _allocation._allocator.get() is _allocation._NULL_ALLOCATOR:
        _allocation.set_allocator(_alloc)


def _alloc(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _dims(q, k, layout: str):
    """(batch, hq, hk, seq_q, seq_k) of the inputs (varlen: batch and seqs come from cu)."""
    if layout == "bshd":
        return q.shape[0], q.shape[2], k.shape[2], q.shape[1], k.shape[1]
    if layout == "bhsd":
        return q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    return 0, q.shape[1], k.shape[1], 0, 0


def forward(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float, left: int, right: int,
            softcap: float, layout: str):  # fmt: skip
    """Triton forward: ``(out, lse)``; ``layout`` "bshd", "bhsd" or "thd" (packed, with cu)."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    varlen = layout == "thd"
    batch, hq, hk, seq_q, seq_k = _dims(q, k, layout)
    if varlen:
        batch = cu_q.shape[0] - 1
        lse_shape = (hq, q.shape[0])
    else:
        max_q, max_k = seq_q, seq_k
        lse_shape = (batch, hq, seq_q)
    out = new_output(q.shape, q.dtype, q.device)
    lse = new_output(lse_shape, torch.float32, q.device)
    if out.numel() == 0:
        return out, lse
    if max_q == 0:  # no query rows (a varlen batch of empty sequences)
        return out, lse
    if max_k == 0:  # no keys anywhere: every row is empty
        out.zero_()
        lse.fill_(float("inf"))
        return out, lse
    d = q.shape[-1]
    masked = right >= 0 or left >= 0
    strides = (
        *_bsh_strides(q, layout), *_bsh_strides(k, layout), *_bsh_strides(v, layout),
        *_bsh_strides(out, layout), *_lse_strides(lse, varlen),
    )  # fmt: skip
    cu_q_arg = cu_q if varlen else lse
    cu_k_arg = cu_k if varlen else lse

    def run(cfg: FwdConfig) -> None:
        if cfg.tma and not _tma_ok(q, k, v, out):
            cfg = _no_tma(cfg)
        if cfg.tma:
            _ensure_allocator()
        launch_fwd(
            q, k, v, out, lse, cu_q_arg, cu_k_arg, strides, hq, hq // hk, batch, max_q,
            seq_q, seq_k, left, right, scale, softcap, d, cfg, device.INTERPRET, varlen,
        )  # fmt: skip

    cfg = fwd_config(d, masked, max(max_q, max_k))
    if varlen and "fwd" not in _forced and not device.INTERPRET:
        cfg = VARLEN_FWD_CONFIGS.get((max(64, _block_d(d)), masked), cfg)
    if not varlen and "fwd" not in _forced:
        # The shipped table's config unless this shape was tuned (kernforge tune
        # attention_fwd) or a trained model picks one (docs/tuning.md).
        cfg = tune_space.attention_fwd_config(q, k, masked, layout, run, cfg)
    run(cfg)
    return out, lse


def _lse_strides(lse: torch.Tensor, varlen: bool) -> tuple[int, int]:
    return (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))


def backward(do, q, k, v, out, lse, cu_q, cu_k, max_q: int, max_k: int, scale: float,
             left: int, right: int, softcap: float, layout: str,
             parts: tuple[str, ...] = ("delta", "dkdv", "dq")):  # fmt: skip
    """Triton backward: ``(dq, dk, dv)`` (``parts``: only these launches, for timing)."""
    q, k, v, out, do = (_unit_last(t) for t in (q, k, v, out, do))
    varlen = layout == "thd"
    batch, hq, hk, seq_q, seq_k = _dims(q, k, layout)
    if varlen:
        batch = cu_q.shape[0] - 1
    else:
        max_q, max_k = seq_q, seq_k
    dq = new_output(q.shape, q.dtype, q.device)
    dk = new_output(k.shape, k.dtype, k.device)
    dv = new_output(v.shape, v.dtype, v.device)
    if dq.numel() == 0 and dk.numel() == 0:
        return dq, dk, dv
    if max_k == 0 or max_q == 0 or q.shape[0] == 0 or k.shape[0] == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    d = q.shape[-1]
    cfg = bwd_config(d, right >= 0 or left >= 0, max(max_q, max_k))
    if (cfg.dkdv.tma or cfg.dq.tma) and not _tma_ok(q, k, v, do):
        cfg = _no_tma(cfg)
    if cfg.dkdv.tma or cfg.dq.tma:
        _ensure_allocator()
    delta = torch.empty(lse.shape, dtype=torch.float32, device=q.device)
    group = hq // hk
    if group > 1:  # one fp32 dK, dV slice per q head, summed over each group below
        shape = list(k.shape)
        shape[{"bshd": 2, "bhsd": 1, "thd": 1}[layout]] = hq
        dk_part = torch.empty(shape, dtype=torch.float32, device=q.device)
        dv_part = torch.empty(shape, dtype=torch.float32, device=q.device)
    else:
        dk_part, dv_part = dk, dv
    st = {name: _bsh_strides(t, layout) for name, t in
          (("q", q), ("k", k), ("v", v), ("o", out), ("do", do), ("dq", dq), ("dk", dk_part),
           ("dv", dv_part))}  # fmt: skip
    st["lse"] = _lse_strides(lse, varlen)
    cu_q_arg = cu_q if varlen else lse
    cu_k_arg = cu_k if varlen else lse
    launch_bwd(
        q, k, v, out, do, lse, dq, dk_part, dv_part, delta, cu_q_arg, cu_k_arg, st, hq, hk,
        group, batch, max_q, max_k, seq_q, seq_k, left, right, scale, softcap, d, cfg,
        device.INTERPRET, varlen, parts,
    )  # fmt: skip
    if group > 1:
        ax = {"bshd": 2, "bhsd": 1, "thd": 1}[layout]
        for part, grad in ((dk_part, dk), (dv_part, dv)):
            group_sum(part, grad, hk, group, ax)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# Custom ops and autograd


@torch.library.custom_op("kernforge::fmha_fwd", mutates_args=())
def fmha_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    layout: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton flash attention forward: ``(out, lse)`` (see :func:`forward`)."""
    return forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                   window_left, window_right, softcap, layout)  # fmt: skip


@fmha_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left,
      window_right, softcap, layout):  # fmt: skip
    if layout == "thd":
        lse_shape = (q.shape[1], q.shape[0])
    else:
        b, hq, _, sq, _ = _dims(q, k, layout)
        lse_shape = (b, hq, sq)
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("kernforge::fmha_bwd", mutates_args=())
def fmha_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    layout: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton flash attention backward: ``(dq, dk, dv)`` (see :func:`backward`)."""
    return backward(do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                    max_seqlen_k, scale, window_left, window_right, softcap, layout)  # fmt: skip


@fmha_bwd.register_fake
def _(do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
      window_left, window_right, softcap, layout):  # fmt: skip
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


class FmhaFunction(torch.autograd.Function):
    """Autograd for the Triton flash attention: gradients to q, k, v (the log-sum-exp output
    gets none, as in FlashAttention)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right, softcap, layout):
        out, lse = op_call(fmha_fwd, q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right,
                           softcap, layout)  # fmt: skip
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.args = (max_q, max_k, scale, left, right, softcap, layout)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        if dout is None:
            return (None,) * 12
        dq, dk, dv = op_call(fmha_bwd, dout, q, k, v, out, lse, cu_q, cu_k, *ctx.args)
        return (dq, dk, dv) + (None,) * 9


def _supports_triton(q, k, v, *rest, **kw):
    if q.dtype not in KERNEL_DTYPES:
        return f"dtype {q.dtype} (the Triton kernels take float16 and bfloat16)"
    return triton_reason(q, k, v)


#: Head dims at which, on Hopper, auto dispatch hands a dense call that SDPA computes the same
#: way to torch's SDPA (its cuDNN backend): measured faster there than the Triton kernels at
#: every dense shape of the attention benchmark (benchmarks/results/attention.md: forward 0.65-
#: 0.93x of cuDNN's speed, backward 0.77x) and in the issue-7 training step (D64).
SDPA_HEAD_DIMS_SM90 = (64, 128)


def sdpa_route(q, seq_q: int, seq_k: int, left: int, right: int, softcap: float,
               return_lse: bool) -> bool:  # fmt: skip
    """Whether ``ops.fmha`` under the "auto" backend runs on torch's SDPA instead of the Triton
    kernels: on sm_90, float16/bfloat16, head dim in :data:`SDPA_HEAD_DIMS_SM90`, no lse
    asked, no softcap or window, causal only with as many queries as keys (SDPA's causal mask
    is aligned top-left). Naming the backend (``kernforge.backend("triton")``) runs ours."""
    if get_backend() != "auto" or return_lse or not q.is_cuda or device.INTERPRET:
        return False
    if device.capability(q.device.index or 0) != (9, 0):
        return False
    if q.shape[-1] not in SDPA_HEAD_DIMS_SM90 or q.dtype not in KERNEL_DTYPES:
        return False
    return _sdpa_ok(q, left, right, softcap, seq_q, seq_k)


@register_impl("fmha", "triton", supports=_supports_triton)
def fmha_triton(q, k, v, causal, scale, window, softcap, layout, return_lse):
    """Triton flash attention over a dense batch (see ``ops.fmha``); on Hopper, the calls of
    :func:`sdpa_route` run on torch's SDPA (cuDNN), measured faster there."""
    left, right = window_bounds(bool(causal), window)
    cap = softcap_value(softcap)
    s = 1 if layout == "bshd" else 2  # the sequence axis
    if sdpa_route(q, q.shape[s], k.shape[s], left, right, cap, return_lse):
        return fmha_torch(q, k, v, causal, scale, window, softcap, layout, return_lse)
    sc = scale_value(scale, q.shape[-1])
    out, lse = FmhaFunction.apply(q, k, v, None, None, 0, 0, sc, left, right, cap, layout)
    return (out, lse) if return_lse else out


@register_impl("fmha_varlen", "triton", supports=_supports_triton)
def fmha_varlen_triton(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                       scale, window, softcap, return_lse):  # fmt: skip
    """Triton flash attention over packed variable-length sequences (see ``ops.fmha_varlen``)."""
    left, right = window_bounds(bool(causal), window)
    sc = scale_value(scale, q.shape[-1])
    out, lse = FmhaFunction.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q),
                                  int(max_seqlen_k), sc, left, right, softcap_value(softcap),
                                  "thd")  # fmt: skip
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------------
# Torch reference


def attention_mask(seq_q: int, seq_k: int, left: int, right: int, dev) -> torch.Tensor | None:
    """[seq_q, seq_k] bool, True where query i attends key j (bottom-right aligned window);
    None when every pair attends."""
    if left < 0 and right < 0:
        return None
    i = torch.arange(seq_q, device=dev)[:, None] + (seq_k - seq_q)
    j = torch.arange(seq_k, device=dev)[None, :]
    keep = torch.ones(seq_q, seq_k, dtype=torch.bool, device=dev)
    if right >= 0:
        keep &= j <= i + right
    if left >= 0:
        keep &= j >= i - left
    return keep


def attention_math(q, k, v, scale: float, left: int, right: int, softcap: float):
    """softmax(q k^T * scale (softcapped), masked) v for [B, H, S, D] inputs, in fp32 (fp64 for
    fp64 input): ``(out, lse)``. A row that sees no key gets output 0 and lse +inf."""
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    if k.shape[2] == 0:  # no keys: every row is empty
        lse = torch.full(q.shape[:3], float("inf"), dtype=ct, device=q.device)
        return torch.zeros_like(q), lse.float() if ct == torch.float32 else lse
    group = q.shape[1] // k.shape[1]
    kk = k.to(ct).repeat_interleave(group, dim=1)
    vv = v.to(ct).repeat_interleave(group, dim=1)
    s = torch.matmul(q.to(ct), kk.transpose(-1, -2)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    keep = attention_mask(q.shape[2], k.shape[2], left, right, q.device)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    e = torch.exp(s - m)
    den = e.sum(-1, keepdim=True)
    empty = den == 0
    p = e / torch.where(empty, torch.ones_like(den), den)
    out = torch.matmul(p, vv)
    lse = torch.where(empty, torch.full_like(den, float("inf")), m + torch.log(den)).squeeze(-1)
    return out.to(q.dtype), lse.float() if ct == torch.float32 else lse


def _sdpa_ok(q, left: int, right: int, softcap: float, seq_q: int, seq_k: int) -> bool:
    return (
        q.is_cuda
        and q.dtype in KERNEL_DTYPES
        and softcap == 0
        and left < 0
        and (right < 0 or (right == 0 and seq_q == seq_k))
    )


@register_impl("fmha", "torch")
def fmha_torch(q, k, v, causal=False, scale=None, window=None, softcap=None, layout="bshd",
               return_lse=False):  # fmt: skip
    """Reference: softmax(q k^T) v with the masks in fp32 (SDPA where it computes the same
    thing and no lse is asked)."""
    left, right = window_bounds(bool(causal), window)
    sc, cap = scale_value(scale, q.shape[-1]), softcap_value(softcap)
    if layout == "bshd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if not return_lse and _sdpa_ok(q, left, right, cap, q.shape[2], k.shape[2]):
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=right == 0, scale=sc, enable_gqa=q.shape[1] != k.shape[1]
        )
        lse = None
    else:
        out, lse = attention_math(q, k, v, sc, left, right, cap)
    if layout == "bshd":
        out = out.transpose(1, 2)
    return (out, lse) if return_lse else out


@register_impl("fmha_varlen", "torch")
def fmha_varlen_torch(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                      causal=False, scale=None, window=None, softcap=None,
                      return_lse=False):  # fmt: skip
    """Reference: :func:`fmha_torch` on each packed sequence in turn."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for i in range(len(cq) - 1):
        spans = ((q, cq[i], cq[i + 1]), (k, ck[i], ck[i + 1]), (v, ck[i], ck[i + 1]))
        qi, ki, vi = (t[a:b].transpose(0, 1)[None] for t, a, b in spans)
        left, right = window_bounds(bool(causal), window)
        sc, cap = scale_value(scale, q.shape[-1]), softcap_value(softcap)
        o, lse = attention_math(qi, ki, vi, sc, left, right, cap)
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0])
    out = torch.cat(outs, 0) if outs else q.new_empty((0, *q.shape[1:]))
    if not return_lse:
        return out
    lse = torch.cat(lses, 1) if lses else q.new_empty((q.shape[1], 0), dtype=torch.float32)
    return out, lse
