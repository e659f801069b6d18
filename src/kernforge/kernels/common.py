"""Helpers shared by the kernel families: support checks, 2-D row views, output allocation,
launch sizes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .. import device

#: dtypes the Triton kernels take (they compute in fp32 and store in the input dtype).
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Widest row a single-pass row kernel holds in registers.
MAX_ROW = 65536

_poison = False
_pdl = False


@contextmanager
def dependent_launches(enabled: bool = True) -> Iterator[None]:
    """Inside, the kernels of an LLM decode step (rms_norm forward, the GEMV, rope_append_kv,
    decode attention, silu_and_mul) launch as programmatic dependent launches on Hopper: each
    may start while the previous kernel finishes (its blocks wait with ``griddepcontrol.wait``
    before reading anything that kernel wrote; ``rope_append_fmha_decode`` first loads the
    cached keys, which the kernel before it does not write). A no-op before sm_90 and under
    the interpreter."""
    global _pdl
    before = _pdl
    _pdl = (
        enabled
        and not device.INTERPRET
        and device.cuda_available()
        and device.capability(torch.cuda.current_device())[0] >= 9
    )
    try:
        yield
    finally:
        _pdl = before


@triton.jit
def dependent_start(PDL: tl.constexpr):
    """First statement of a kernel that may be a dependent launch: wait until the previous
    kernel's writes are visible, then let the next kernel start launching."""
    if PDL:
        # Waiting first measured faster than letting the next kernel launch before the wait
        # (more blocks parked on the SMs): Qwen2.5-1.5B decode 608 against 578 tok/s.
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


def pdl() -> bool:
    """Whether kernels launched now should be programmatic dependent launches."""
    return _pdl


def pdl_args() -> dict:
    """Launch keywords of a Triton kernel with a ``PDL: tl.constexpr = False`` parameter."""
    return {"PDL": True, "launch_pdl": True} if _pdl else {}


def poison_outputs(enabled: bool) -> None:
    """Fill every kernel output with NaN before the kernel runs (tests use this to prove that
    every element is written)."""
    global _poison
    _poison = enabled


def new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A contiguous output buffer for a kernel to fill (NaN-poisoned while testing)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if _poison and not torch.compiler.is_compiling():
        out.fill_(float("nan") if dtype.is_floating_point else -1)
    return out


def new_like(x: torch.Tensor) -> torch.Tensor:
    """A contiguous output of x's shape, dtype and device (see :func:`new_output`)."""
    return new_output(x.shape, x.dtype, x.device)


def row_stats(x: torch.Tensor) -> torch.Tensor:
    """An fp32 buffer of one statistic (mean, rstd) per row of x (see :func:`new_output`)."""
    return new_output(x.shape[:-1], torch.float32, x.device)


def reduce_partials(part: torch.Tensor, rows: int, dtype: torch.dtype) -> torch.Tensor:
    """A parameter gradient from a persistent backward's [programs, n] fp32 partial sums (no
    rows: nothing was written, the gradient is zero)."""
    if rows == 0:
        return torch.zeros(part.shape[1:], dtype=dtype, device=part.device)
    return part.sum(0).to(dtype)


def op_call(op, *args):
    """Call kernforge custom op ``op`` (a ``torch.library.custom_op``).

    Traced code (torch.compile) goes through the op, which it needs. Eager code calls the op's
    Python implementation directly: the custom-op dispatcher costs host time on every call
    (measured 60-150 us on the H100 machine), as much as a short kernel takes on the GPU.
    """
    if torch.compiler.is_compiling():
        return op(*args)
    return op._init_fn(*args)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the dtype references compute in: fp32, or fp64 for fp64 input."""
    return x if x.dtype == torch.float64 else x.float()


def wants_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will record a call on ``tensors`` (None skipped)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def triton_reason(*tensors: torch.Tensor | None) -> str | None:
    """None when Triton can run on these tensors' device and dtypes, else the reason."""
    for t in tensors:
        if t is None:
            continue
        if t.dtype not in TRITON_DTYPES:
            return f"dtype {t.dtype} (Triton kernels take float16, bfloat16, float32)"
        reason = device.triton_runs_on(t.device)
        if reason is not None:
            return reason
    return None


def row_reason(n: int) -> str | None:
    """None when a row of ``n`` features fits the single-pass row kernels."""
    if n > MAX_ROW:
        return f"rows of {n} features exceed the single-pass limit of {MAX_ROW}"
    return None


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a 2-D [rows, features] tensor with unit feature stride, a view when possible."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x.reshape(x.shape[:-1].numel(), x.shape[-1])  # not (-1, n): n may be 0


@dataclass(frozen=True)
class RowLaunch:
    """Tile and launch sizes of a row kernel: BLOCK_M rows of BLOCK_N (>= n) features."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int = 1  # software pipelining of loops over rows (backward kernels)
    programs_per_sm: int = 2  # persistent kernels (backward): programs looping over rows

    def grid(self, rows: int) -> tuple[int]:
        """One program per BLOCK_M rows."""
        return (triton.cdiv(rows, self.block_m),)

    def programs(self, rows: int) -> int:
        """Programs of a persistent kernel over ``rows``: a few per SM, each looping."""
        return max(1, min(triton.cdiv(rows, self.block_m), device.num_sms() * self.programs_per_sm))


#: Launch sizes measured best on the GPU, keyed by (kernel, BLOCK_N, element bytes): from
#: benchmarks/sweep_rows.py on an H100 (bf16; benchmarks/results/NOTES.md). Forward kernels
#: matched the heuristic below, so only the persistent backward kernels are listed.
TUNED: dict[tuple[str, int, int], RowLaunch] = {
    ("rms_norm_bwd", 4096, 2): RowLaunch(1, 4096, 8, num_stages=2, programs_per_sm=2),
    ("rms_norm_bwd", 16384, 2): RowLaunch(1, 16384, 32, num_stages=1, programs_per_sm=1),
    ("layer_norm_bwd", 4096, 2): RowLaunch(1, 4096, 16, num_stages=2, programs_per_sm=2),
    ("layer_norm_bwd", 16384, 2): RowLaunch(1, 16384, 16, num_stages=2, programs_per_sm=1),
    # One-pass softmax rows of 32768: 32 warps beat the heuristic's cap of 16.
    ("softmax_fwd", 32768, 2): RowLaunch(1, 32768, 32),
    ("softmax_bwd", 32768, 2): RowLaunch(1, 32768, 32),
}


def row_launch(n: int, elem_bytes: int = 2, kernel: str = "") -> RowLaunch:
    """Launch sizes for rows of ``n`` features of ``elem_bytes``-byte elements.

    ``kernel`` names the kernel for the measured :data:`TUNED` table (GPU only). Otherwise a
    tile holds about 16 KiB of input per program on the GPU (several rows when rows are short),
    with 16-byte accesses per thread; under the interpreter a tile is as large as is cheap,
    since programs run one after another.
    """
    block_n = triton.next_power_of_2(max(n, 1))
    if not device.INTERPRET:
        tuned = TUNED.get((kernel, block_n, elem_bytes))
        if tuned is not None:
            return tuned
    tile_bytes = 1 << 18 if device.INTERPRET else 1 << 14
    block_m = max(1, min(64, tile_bytes // (block_n * elem_bytes)))
    vec = max(1, 16 // elem_bytes)  # elements per 16-byte access
    warps = block_m * block_n // (vec * 32 * 2)  # two 16-byte accesses per thread
    num_warps = max(1, min(16, triton.next_power_of_2(max(warps, 1))))
    return RowLaunch(block_m, block_n, num_warps)


#: Arrival counters of kernels whose last block (or program) to finish a tile does the final
#: reduction: one zeroed int32 buffer per (device, stream). Each kernel resets the counters it
#: used, so the buffer is zero again for the next launch in stream order (kernels of one
#: stream share it safely).
_arrival: dict[tuple[str, int], torch.Tensor] = {}


def arrival_counters(dev: torch.device, count: int) -> torch.Tensor | None:
    """A zeroed int32 buffer of at least ``count`` counters for the current stream of ``dev``
    (see :data:`_arrival`); None when a larger one would have to be allocated during CUDA-graph
    capture (the caller then runs without a cross-block reduction)."""
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        key = (f"cuda:{index}", torch.cuda.current_stream(index).cuda_stream)
    else:
        key = (str(dev), 0)
    buf = _arrival.get(key)
    if buf is not None and buf.numel() >= count:
        return buf
    if dev.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None  # no allocation inside a graph capture
    buf = torch.zeros(max(count, 4096), dtype=torch.int32, device=dev)
    _arrival[key] = buf
    return buf


def vector(w: torch.Tensor | None) -> torch.Tensor | None:
    """A per-feature parameter made contiguous (kernels index it with unit stride)."""
    return None if w is None else w.contiguous()


@triton.jit
def tile_order(tile, tiles_m, tiles_n, GROUP_M: tl.constexpr):
    """``(pid_m, pid_n)`` of output tile ``tile`` of a tiles_m x tiles_n GEMM grid, taken GROUP_M
    row tiles at a time: the programs that run together share rows of A and columns of B, which
    they then read from L2 instead of HBM (the GEMM kernels' grouped ordering)."""
    in_group = GROUP_M * tiles_n
    first_m = (tile // in_group) * GROUP_M
    size_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (tile % in_group) % size_m
    pid_n = (tile % in_group) // size_m
    return pid_m, pid_n
