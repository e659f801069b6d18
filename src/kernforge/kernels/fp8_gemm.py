"""fp8 (e4m3) GEMM for Hopper: ``out = (a @ b) * scale_a * scale_b + bias`` with fp8 operands,
fp32 accumulation and a bf16 (or fp16 / fp32) output; the fp8 quantizer; the torch reference.

The kernel is persistent (one program per SM walking output tiles in an L2-friendly order),
moves both operands with TMA from host-built tensor descriptors, multiplies them with fp8
``wgmma`` and applies the scales (per-tensor scalars, or a vector per row of a and per column of
b) and the bias in the epilogue, in fp32, before one rounding to the output dtype.

Layout: Hopper's fp8 ``wgmma`` takes both operands K-major, so ``a`` is [M, K] row-major and
``b`` is [K, N] with strides (1, K): the transposed view ``w.t()`` of an [N, K] weight (the
``nn.Linear`` layout), read in place. Any other layout of ``b`` (or a non-row-major ``a``) is
copied to that layout first, which costs a pass over it: store weights as [N, K].

Accumulation: by default the kernel lets ``wgmma`` accumulate fp8 products in its fast mode
(as cuBLAS's ``use_fast_accum=True`` does); a config with ``precise_every`` > 0 adds the
partial sums into a separate fp32 accumulator every that many K elements instead (slower,
closer to fp32).

Forward only: there is no gradient of fp8_matmul.

Other GPUs and the CPU: the Triton implementation supports sm_90 only. Elsewhere its
``supports`` gives the reason (naming the device's arch), so dispatch runs the torch reference,
which dequantizes to fp32 and multiplies (with a one-time ``FallbackWarning``), or raises
``UnsupportedError`` when ``KERNFORGE_DISABLE_FALLBACK=1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .. import device, tune
from ..dispatch import register_impl
from ..errors import ArgumentError, DTypeError
from .common import new_output, op_call, tile_order

FP8 = torch.float8_e4m3fn
#: Largest finite e4m3 value: scales map each tensor's (row's, column's) amax onto it.
FP8_MAX = 448.0
#: Output dtypes of the kernel.
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# ------------------------------------------------------------------------------ quantize


def quantize_fp8(x: torch.Tensor, axis: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_fp8, scale)`` with ``x ≈ x_fp8.float() * scale`` (e4m3, round to nearest).

    ``axis=None``: one fp32 scale for the whole tensor (a 0-d tensor). ``axis=1`` (rows of a
    2-D x, for ``a`` of fp8_matmul): a scale per row, shape [M]; ``axis=0`` (columns, for
    ``b``): a scale per column, shape [N]. ``scale = amax / 448`` over the tensor, row or
    column (floored at 1e-12 / 448, so an all-zero row gives zeros, not NaN). ``x_fp8`` keeps
    x's strides: quantizing ``w.t()`` gives the transposed fp8 view fp8_matmul wants for ``b``.
    Not differentiable.
    """
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        raise DTypeError(f"quantize_fp8: x must be a floating tensor, got {getattr(x, 'dtype', x)}")
    if axis is not None:
        if axis not in (0, 1, -1, -2) or x.dim() != 2:
            raise ArgumentError(
                f"quantize_fp8: axis={axis!r} for x of shape {tuple(x.shape)}; use None (per "
                "tensor), or 1 (per row) / 0 (per column) of a 2-D x"
            )
        axis %= 2
    with torch.no_grad():
        xf = x.float()
        if axis is None:
            amax = xf.abs().amax() if xf.numel() else xf.new_zeros(())
        else:
            amax = xf.abs().amax(dim=axis) if xf.shape[axis] else xf.new_zeros(x.shape[1 - axis])
        scale = amax.clamp(min=1e-12) / FP8_MAX
        s = scale if axis is None else scale.unsqueeze(axis)
        q = torch.empty_like(x, dtype=FP8)  # keeps x's strides
        q.copy_((xf / s).clamp(-FP8_MAX, FP8_MAX))
    return q, scale


# ------------------------------------------------------------------------------ Triton


@triton.jit
def _fp8_gemm_kernel(
    a_desc, b_desc, c_desc, C, SA, SB, BIAS,
    M, N, K, stride_cm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr, SCALE_A_ROWS: tl.constexpr, SCALE_B_COLS: tl.constexpr,
    HAS_BIAS: tl.constexpr, TMA_STORE: tl.constexpr, EPILOGUE_SUBTILE: tl.constexpr,
    FLATTEN: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, PRECISE_EVERY: tl.constexpr,
):  # fmt: skip
    start = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    total = tiles_m * tiles_n
    k_tiles = tl.cdiv(K, BLOCK_K)
    # The epilogue recomputes its tile from its own counter: with the loops flattened, the
    # pipeliner may run the next tile's loads before this tile's epilogue.
    tile_c = start - NUM_PROGRAMS
    scalar = 1.0
    if not SCALE_A_ROWS:
        scalar = scalar * tl.load(SA)
    if not SCALE_B_COLS:
        scalar = scalar * tl.load(SB)
    for tile in tl.range(start, total, NUM_PROGRAMS, flatten=FLATTEN,
                         warp_specialize=WARP_SPECIALIZE):  # fmt: skip
        pid_m, pid_n = tile_order(tile, tiles_m, tiles_n, GROUP_M)
        m0 = pid_m * BLOCK_M
        n0 = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            a = a_desc.load([m0, ki * BLOCK_K])
            b = b_desc.load([n0, ki * BLOCK_K])
            if PRECISE_EVERY > 0:
                acc = tl.dot(a, b.T, acc, max_num_imprecise_acc=PRECISE_EVERY)
            else:
                acc = tl.dot(a, b.T, acc)
        tile_c += NUM_PROGRAMS
        pid_m, pid_n = tile_order(tile_c, tiles_m, tiles_n, GROUP_M)
        m0 = pid_m * BLOCK_M
        n0 = pid_n * BLOCK_N
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        acc = acc * scalar
        if SCALE_A_ROWS:
            acc = acc * tl.load(SA + offs_m, mask=offs_m < M, other=0.0)[:, None]
        if SCALE_B_COLS:
            acc = acc * tl.load(SB + offs_n, mask=offs_n < N, other=0.0)[None, :]
        if HAS_BIAS:
            acc = acc + tl.load(BIAS + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        out_ty = C.dtype.element_ty
        if TMA_STORE:
            if EPILOGUE_SUBTILE:  # two half-width stores: half the epilogue's shared memory
                halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
                acc0, acc1 = tl.split(halves)
                c_desc.store([m0, n0], acc0.to(out_ty))
                c_desc.store([m0, n0 + BLOCK_N // 2], acc1.to(out_ty))
            else:
                c_desc.store([m0, n0], acc.to(out_ty))
        else:  # rows of c not 16-byte aligned for TMA: masked stores
            ptrs = C + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
            tl.store(ptrs, acc.to(out_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


# ------------------------------------------------------------------------------ configs


@dataclass(frozen=True)
class Fp8Config:
    """Launch config of the fp8 GEMM (see the kernel's constexprs)."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3
    epilogue_subtile: bool = True
    flatten: bool = True
    warp_specialize: bool = False
    precise_every: int = 0  # 0: wgmma's fast fp8 accumulation; else promote every N of K


#: Hopper candidates, measured by the tuner on first use of a shape bucket. Sweeps at 8192^3
#: on an H100 (benchmarks/sweep_fp8_grouped.py; results in benchmarks/results/fp8_grouped.*):
#: the 128x256x128 / 8-warp variants run at 1300-1500 TFLOP/s, within the run-to-run spread of
#: each other (cuBLAS bf16 varied 700-790 in the same runs; torch._scaled_mm 1230-1340);
#: 128x128 and 256x128 tiles ~10% slower; promoting the fp8 accumulator every 128 of K
#: (precise_every=128) costs 35% (887 TFLOP/s), so it is not a candidate.
CONFIGS = [
    Fp8Config(128, 256, 128, group_m=16, num_warps=8, num_stages=3),
    Fp8Config(128, 256, 128, num_warps=8, num_stages=3),
    Fp8Config(128, 256, 128, num_warps=8, num_stages=4),
    Fp8Config(128, 256, 128, num_warps=8, num_stages=3, epilogue_subtile=False),
    Fp8Config(128, 256, 128, num_warps=8, num_stages=3, flatten=False, warp_specialize=True),
    Fp8Config(128, 256, 64, num_warps=8, num_stages=4),
    Fp8Config(256, 128, 128, num_warps=8, num_stages=3),
    Fp8Config(128, 128, 128, num_warps=4, num_stages=4),
]
DEFAULT = CONFIGS[0]
#: Small problems: more, smaller tiles so that every SM gets work.
DEFAULT_SMALL = Fp8Config(128, 128, 128, num_warps=4, num_stages=4)

TUNER = tune.Tuner("fp8_matmul", configs=CONFIGS, version="2")


def _aligned(t: torch.Tensor) -> bool:
    """TMA can address 2-D ``t``: unit last stride, 16-byte aligned base and row stride."""
    return (
        t.stride(1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0
    )


def _k_major(t: torch.Tensor, k_pad: int) -> torch.Tensor:
    """2-D fp8 ``t`` [R, K] as a TMA-ready K-major tensor: the same one when it already is,
    else a copy (padded with zeros to ``k_pad`` columns when K is not a multiple of 16)."""
    if t.shape[1] == k_pad and _aligned(t):
        return t
    out = torch.zeros((t.shape[0], k_pad), dtype=t.dtype, device=t.device)
    out[:, : t.shape[1]] = t
    return out


def _scale_vector(s: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(fp32 contiguous 1-D scales, whether there is one per row/column)."""
    v = s.reshape(-1).to(torch.float32).contiguous()
    return v, v.numel() != 1


def _launch(a, bt, c, sa, sb, bias, rows, cols, cfg: Fp8Config) -> None:
    m, k = a.shape
    n = bt.shape[0]
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    tma_store = _aligned(c)
    a_desc = TensorDescriptor.from_tensor(a, [bm, bk])
    b_desc = TensorDescriptor.from_tensor(bt, [bn, bk])
    store_n = bn // 2 if cfg.epilogue_subtile else bn
    c_desc = TensorDescriptor.from_tensor(c, [bm, store_n]) if tma_store else None
    programs = max(1, min(device.num_sms(), triton.cdiv(m, bm) * triton.cdiv(n, bn)))
    _fp8_gemm_kernel[(programs,)](
        a_desc, b_desc, c_desc, c, sa, sb, bias,
        m, n, k, c.stride(0),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg.group_m, NUM_PROGRAMS=programs,
        SCALE_A_ROWS=rows, SCALE_B_COLS=cols, HAS_BIAS=bias is not None, TMA_STORE=tma_store,
        EPILOGUE_SUBTILE=cfg.epilogue_subtile, FLATTEN=cfg.flatten,
        WARP_SPECIALIZE=cfg.warp_specialize, PRECISE_EVERY=cfg.precise_every,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip


def fp8_forward(a, b, scale_a, scale_b, bias, out_dtype, cfg: Fp8Config | None = None):
    """The Triton fp8 GEMM: ``(a @ b) * scale_a * scale_b + bias`` in ``out_dtype``.
    ``cfg`` forces a config (benchmark sweeps); else the tuner picks one."""
    m, k = a.shape
    n = b.shape[1]
    c = new_output((m, n), out_dtype, a.device)
    if m == 0 or n == 0:
        return c
    if k == 0:
        c.copy_(bias.expand(m, n) if bias is not None else torch.zeros_like(c))
        return c
    k_pad = triton.cdiv(k, 16) * 16  # TMA: 16-byte row strides
    a = _k_major(a, k_pad)
    bt = _k_major(b.t(), k_pad)  # [N, K]: in place for b = w.t() of an [N, K] weight
    sa, rows = _scale_vector(scale_a)
    sb, cols = _scale_vector(scale_b)
    if bias is not None:
        bias = bias.contiguous()
    if cfg is None:
        small = triton.cdiv(m, 128) * triton.cdiv(n, 256) < device.num_sms()
        default = DEFAULT_SMALL if small else DEFAULT
        key = (tune.bucket(m), n, k, str(out_dtype).removeprefix("torch."))

        def run(c_: Fp8Config) -> None:
            _launch(a, bt, c, sa, sb, bias, rows, cols, c_)

        cfg = TUNER.pick(key, run, default)
    _launch(a, bt, c, sa, sb, bias, rows, cols, cfg)
    return c


# ------------------------------------------------------------------------------ custom op


def _dtype_code(dtype: torch.dtype) -> int:
    return OUT_DTYPES.index(dtype)


@torch.library.custom_op("kernforge::fp8_matmul", mutates_args=())
def fp8_matmul_op(
    a: torch.Tensor,
    b: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: int,
) -> torch.Tensor:
    """Triton fp8 GEMM (``out_dtype`` indexes :data:`OUT_DTYPES`)."""
    return fp8_forward(a, b, scale_a, scale_b, bias, OUT_DTYPES[out_dtype])


@fp8_matmul_op.register_fake
def _(a, b, scale_a, scale_b, bias, out_dtype):
    return a.new_empty((a.shape[0], b.shape[1]), dtype=OUT_DTYPES[out_dtype])


# ------------------------------------------------------------------------------ registrations


def hopper_reason(t: torch.Tensor) -> str | None:
    """None when the fp8 kernel can run on ``t``'s device (an sm_90 GPU), else why not."""
    if device.INTERPRET or t.device.type != "cuda":
        why = "Triton runs in the CPU interpreter here" if device.INTERPRET else str(t.device)
        return f"the fp8 (e4m3) GEMM needs an NVIDIA Hopper GPU (sm_90); this device is cpu ({why})"
    cap = device.capability(t.device.index or 0)
    if cap is None or cap[0] != 9:
        arch = "none" if cap is None else f"sm_{cap[0]}{cap[1]}"
        return f"the fp8 (e4m3) GEMM needs an NVIDIA Hopper GPU (sm_90); this GPU is {arch}"
    return None


def _supports(a, b, scale_a, scale_b, bias=None, out_dtype=torch.bfloat16):
    return hopper_reason(a)


@register_impl("fp8_matmul", "triton", supports=_supports)
def fp8_matmul_triton(a, b, scale_a, scale_b, bias=None, out_dtype=torch.bfloat16):
    """Triton fp8 GEMM on Hopper (forward only)."""
    return op_call(fp8_matmul_op, a, b, scale_a, scale_b, bias, _dtype_code(out_dtype))


@register_impl("fp8_matmul", "torch")
def fp8_matmul_torch(a, b, scale_a, scale_b, bias=None, out_dtype=torch.bfloat16):
    """Reference: dequantize a and b to fp32, multiply, add the bias, cast."""
    sa = scale_a.float().reshape(-1, 1) if scale_a.numel() != 1 else scale_a.float().reshape(())
    sb = scale_b.float().reshape(1, -1) if scale_b.numel() != 1 else scale_b.float().reshape(())
    y = (a.float() * sa) @ (b.float() * sb)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def _tune_cli(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """``kernforge tune fp8_matmul --shapes MxNxK`` (dtype: the output dtype)."""
    if len(shape) != 3:
        raise SystemExit("fp8_matmul shapes are MxNxK, e.g. 8192x8192x8192")
    m, n, k = shape
    a, sa = quantize_fp8(torch.randn(m, k, device="cuda"), axis=1)
    b, sb = quantize_fp8(torch.randn(n, k, device="cuda").t(), axis=0)
    out = dtype if dtype in OUT_DTYPES else torch.bfloat16
    fp8_forward(a, b, sa, sb, None, out)


tune.register_cli("fp8_matmul", run=_tune_cli, shapes_help="MxNxK",
                  default_shapes=[(8192, 8192, 8192), (4096, 4096, 4096)])  # fmt: skip
