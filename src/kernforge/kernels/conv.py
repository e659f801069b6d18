"""2-D convolution and pooling on channels-last (NHWC) tensors: ``ops.conv2d`` with a fused
bias / residual / activation epilogue, ``ops.max_pool2d``, ``ops.adaptive_avg_pool2d``. Triton
kernels, launch wrappers, tuning, registrations and the torch references.

The convolution is an implicit GEMM: output pixels are GEMM rows (M = N*OH*OW), output channels
are columns (O), and the reduction runs over (kernel row, kernel column, input channel). With
the input in channels-last layout the A tile of one filter tap is BM pixel rows of BK contiguous
channels (a gather of 16-byte vectors; padding is a load mask), and the weight, packed once as
[O, KH, KW, C] (:func:`pack_conv_weight`), is a plain row-major [O, KH*KW*C] matrix read by TMA
on Hopper. The epilogue is fused:

    y = act(conv(x, w) + bias + residual)

residual first, then the activation (ResNet's ``relu(bn(conv(x)) + identity)``; BatchNorm is
folded into w and bias by the compiler). fp32 accumulation; the output is channels-last in the
input's dtype.

Two K-loop shapes: "channel" (C >= 16: the loop walks taps x channel blocks, one row mask per
tap) and "flat" (small C such as the RGB stem conv, C = 3: per kernel row r, the KW*C inputs
of a pixel's window row are walked as one K axis in BK-wide chunks, so no tap wastes a whole
16-wide channel block; with dilation 1 they are one contiguous run of the NHWC row).

1x1 stride-1 convolutions without padding are plain GEMMs [M, C] @ [C, O]: they run through
:mod:`kernforge.kernels.matmul` (persistent TMA GEMM) where that was measured faster and the
epilogue allows (its order is act-then-residual, so only when there is no residual or no
activation), and a few shapes where cuDNN was measured faster run on cuDNN; see
:data:`ROUTES`.

Forward only (inference: the model compiler's use). A call that needs a gradient runs on torch
(dispatch's one-time fallback warning). groups > 1 (depthwise) runs on torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .. import device, tune
from ..dispatch import register_impl
from . import matmul as mm
from .common import new_output, tile_order, triton_reason, wants_grad
from .matmul import _act

#: The ACT constexpr of the kernels, by activation name (shared with the GEMM).
ACTIVATIONS = mm.ACTIVATIONS
#: dtypes of the Triton convolution (tensor-core operands; accumulation is fp32).
CONV_DTYPES = (torch.float16, torch.bfloat16)
#: Below this many input channels the K loop runs over the flattened (r, s, c) axis.
FLAT_K_MAX_C = 16


# ---------------------------------------------------------------------------------- kernels


@triton.jit
def _pixel(p, OH, OW):
    """Output pixel index (image-major, then row, then column) -> (image, row, column)."""
    pix = OH * OW
    img = p // pix
    rem = p - img * pix
    oh = rem // OW
    return img, oh, rem - oh * OW


@triton.jit
def _conv_kernel(
    x_ptr, w_ptr, w_desc, out_ptr, bias_ptr, res_ptr,
    M, O, C, H, W, OH, OW, KW, K_TOTAL, W_STRIDE,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, taps,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
    FLAT: tl.constexpr, EVEN_C: tl.constexpr, B_TMA: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    """One [BM pixels, BN channels] output tile of ``act(conv(x, w) + bias + residual)``.
    ``taps``: KH*KW (channel mode) or KH (FLAT: the loop runs over kernel rows).

    x: [N, H, W, C] contiguous; w: [O, W_STRIDE] rows of K_TOTAL = KH*KW*C values in (r, s, c)
    order (read by TMA through w_desc when B_TMA); out and residual: [M, O] contiguous."""
    pid_m, pid_n = tile_order(tl.program_id(0), tl.cdiv(M, BM), tl.cdiv(O, BN), GROUP_M)
    off_m = pid_m * BM
    off_n = pid_n * BN
    offs_m = off_m + tl.arange(0, BM)
    valid_m = offs_m < M
    m = tl.where(valid_m, offs_m, 0)
    # Output pixel -> (image, top-left input row and column of its window).
    img, oh, ow = _pixel(m, OH, OW)
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    x_img = x_ptr + img.to(tl.int64) * H * W * C
    offs_n = off_n + tl.arange(0, BN)
    n_ok = offs_n < O
    w_rows = w_ptr + tl.where(n_ok, offs_n, 0).to(tl.int64) * W_STRIDE
    offs_k = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if FLAT:
        # Small C: K is walked per kernel row r in BK-wide chunks of its KW x C inputs (one
        # contiguous run of the NHWC row at dilation 1): a pixel's address is computed once
        # per row, the (s, c) offsets once per chunk, and the masks are cheap 2-D compares.
        kwc = KW * C
        chunks = tl.cdiv(kwc, BK)
        for it in range(0, taps * chunks):
            r = it // chunks
            kk = (it - r * chunks) * BK + offs_k
            k_ok = kk < kwc
            s = kk // C
            c = kk - s * C
            ih = ih0 + r * dil_h
            row_ok = valid_m & (ih >= 0) & (ih < H)
            row = x_img + (ih * W + iw0).to(tl.int64) * C
            iw = iw0[:, None] + (s * dil_w)[None, :]
            ok = row_ok[:, None] & k_ok[None, :] & (iw >= 0) & (iw < W)
            a = tl.load(row[:, None] + (s * dil_w * C + c)[None, :], mask=ok, other=0.0)
            b = tl.load(w_rows[None, :] + (r * kwc + kk)[:, None],
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)  # fmt: skip
            if UPCAST:
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
    else:
        # Taps x channel blocks as one loop (the shape Triton software-pipelines).
        cblocks = tl.cdiv(C, BK)
        for it in range(0, taps * cblocks):
            tap = it // cblocks
            c0 = (it - tap * cblocks) * BK
            r = tap // KW
            s = tap - r * KW
            ih = ih0 + r * dil_h
            iw = iw0 + s * dil_w
            ok = valid_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            row = x_img + (ih * W + iw).to(tl.int64) * C + c0
            if EVEN_C:
                a = tl.load(row[:, None] + offs_k[None, :], mask=ok[:, None], other=0.0)
            else:
                a = tl.load(row[:, None] + offs_k[None, :],
                            mask=ok[:, None] & (c0 + offs_k < C)[None, :], other=0.0)  # fmt: skip
            k0 = tap * C + c0
            if B_TMA:
                # Past C the block reads the next tap's weights (or TMA's zero fill at the
                # end): they meet the zeros that the A mask put there.
                b = w_desc.load([off_n, k0]).T
            elif EVEN_C:
                b = tl.load(w_rows[None, :] + (k0 + offs_k)[:, None], mask=n_ok[None, :],
                            other=0.0)  # fmt: skip
            else:
                b = tl.load(w_rows[None, :] + (k0 + offs_k)[:, None],
                            mask=(c0 + offs_k < C)[:, None] & n_ok[None, :],
                            other=0.0)  # fmt: skip
            if UPCAST:
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
    # Epilogue: + bias, + residual, then the activation; one masked store of the tile.
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_offs = offs_m.to(tl.int64)[:, None] * O + offs_n[None, :]
    mask = valid_m[:, None] & n_ok[None, :]
    if HAS_RES:
        acc += tl.load(res_ptr + out_offs, mask=mask, other=0.0).to(tl.float32)
    y = _act(acc, ACT)
    tl.store(out_ptr + out_offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pool_kernel(
    x_ptr, out_ptr, P, C, H, W, OH, OW, stride_h, stride_w, pad_h, pad_w, kh, kw,
    MAX: tl.constexpr, ADAPTIVE: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    """Max pool (MAX) or average pool over [BP output pixels, BC channels] of channels-last x.

    Fixed windows: kh x kw taps from (oh * stride_h - pad_h, ow * stride_w - pad_w); padding
    never wins the max. ADAPTIVE: the window of output (oh, ow) is rows
    [floor(oh H / OH), ceil((oh + 1) H / OH)) and likewise for columns (torch's rule), and kh,
    kw are the largest window's size; the mean divides by that window's own size."""
    offs_p = tl.program_id(0) * BP + tl.arange(0, BP)
    offs_c = tl.program_id(1) * BC + tl.arange(0, BC)
    p_ok = offs_p < P
    c_ok = offs_c < C
    p = tl.where(p_ok, offs_p, 0)
    img, oh, ow = _pixel(p, OH, OW)
    if ADAPTIVE:
        h0 = (oh * H) // OH
        h1 = ((oh + 1) * H + OH - 1) // OH
        w0 = (ow * W) // OW
        w1 = ((ow + 1) * W + OW - 1) // OW
    else:
        h0 = oh * stride_h - pad_h
        w0 = ow * stride_w - pad_w
        h1 = tl.minimum(h0 + kh, H)
        w1 = tl.minimum(w0 + kw, W)
    x_img = x_ptr + img.to(tl.int64) * H * W * C
    if MAX:
        acc = tl.full((BP, BC), float("-inf"), tl.float32)
    else:
        acc = tl.zeros((BP, BC), dtype=tl.float32)
    for i in range(0, kh):
        ih = h0 + i
        for j in range(0, kw):
            iw = w0 + j
            ok = p_ok & (ih >= 0) & (ih < h1) & (iw >= 0) & (iw < w1)
            ptrs = x_img[:, None] + (ih * W + iw).to(tl.int64)[:, None] * C + offs_c[None, :]
            m2 = ok[:, None] & c_ok[None, :]
            if MAX:
                v = tl.load(ptrs, mask=m2, other=float("-inf")).to(tl.float32)
                acc = tl.maximum(acc, v)
            else:
                acc += tl.load(ptrs, mask=m2, other=0.0).to(tl.float32)
    if not MAX:
        count = ((h1 - h0) * (w1 - w0)).to(tl.float32)
        acc = acc / count[:, None]
    out = out_ptr + offs_p.to(tl.int64)[:, None] * C + offs_c[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=p_ok[:, None] & c_ok[None, :])


# ---------------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class ConvConfig:
    """Launch config of the implicit-GEMM kernel."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 8
    num_stages: int = 3
    group_m: int = 8
    b_tma: bool = True  # weights through a TMA descriptor (Hopper; else pointer loads)


def _c(bm, bn, bk, w, s, tma=True, g=8) -> ConvConfig:
    return ConvConfig(bm, bn, bk, w, s, g, tma)


#: Candidates the tuner measures on Hopper (bf16/fp16): the configs that won at least one
#: ResNet-50/18 convolution in benchmarks/conv_sweep.py (H100, batch 64; docs/conv.md).
CONFIGS: list[ConvConfig] = [
    _c(128, 128, 64, 8, 3),
    _c(128, 128, 32, 4, 5),
    _c(128, 256, 64, 8, 3),
    _c(128, 256, 64, 8, 4),
    _c(64, 128, 64, 4, 4),
    _c(64, 256, 64, 4, 4),
    _c(128, 64, 64, 4, 3, tma=False),
    _c(128, 64, 64, 4, 4),
]
#: Small-C ("flat" K loop) candidates: K per kernel row is short (KW*C = 21 for the RGB stem).
FLAT_CONFIGS: list[ConvConfig] = [
    _c(128, 64, 32, 4, 3, tma=False),
    _c(256, 64, 32, 8, 3, tma=False),
    _c(64, 64, 32, 4, 3, tma=False),
    _c(128, 64, 32, 8, 3, tma=False),
    _c(128, 64, 16, 4, 3, tma=False),
    _c(128, 128, 32, 8, 3, tma=False),
]
DEFAULT = _c(128, 128, 64, 8, 3)
FLAT_DEFAULT = _c(128, 64, 32, 4, 3, tma=False)
#: Under the interpreter: tiles small enough that the tests' small shapes cross tile edges.
INTERPRET_CONFIG = _c(32, 16, 16, 4, 1, tma=False, g=2)

TUNER = tune.Tuner("conv2d", CONFIGS, version="2")
FLAT_TUNER = tune.Tuner("conv2d_flat", FLAT_CONFIGS, version="2")

#: The best config measured on the H100 (bf16, batch 64, benchmarks/conv_sweep.py; results in
#: benchmarks/results/conv.sweep.json) per (C, O, KH, KW, stride, H, has residual), for the
#: ResNet-18/50 convolutions (square input, padding k // 2, no dilation). Used without measuring
#: at any batch size, so a model compile does not tune these; other shapes go to the tuner.
TUNED: dict[tuple[int, ...], ConvConfig] = {
    # The stem: re-measured after the flat loop's rewrite (benchmarks/results/conv.sweep_stem.json).
    (3, 64, 7, 7, 2, 224, 0): _c(128, 64, 16, 4, 3, tma=False),
    (64, 64, 1, 1, 1, 56, 0): _c(128, 64, 64, 4, 3, tma=False),
    (64, 64, 3, 3, 1, 56, 0): _c(128, 64, 64, 4, 3, tma=False),
    (64, 256, 1, 1, 1, 56, 1): _c(128, 128, 32, 4, 5),
    (64, 256, 1, 1, 1, 56, 0): _c(128, 128, 64, 8, 3),
    (256, 64, 1, 1, 1, 56, 0): _c(128, 64, 64, 4, 3, tma=False),
    (256, 128, 1, 1, 1, 56, 0): _c(128, 128, 64, 8, 3),
    (128, 128, 3, 3, 2, 56, 0): _c(128, 128, 64, 8, 3),
    (128, 512, 1, 1, 1, 28, 1): _c(128, 128, 32, 4, 5),
    (256, 512, 1, 1, 2, 56, 0): _c(128, 128, 64, 8, 3),
    (512, 128, 1, 1, 1, 28, 0): _c(64, 128, 64, 4, 4),
    (128, 128, 3, 3, 1, 28, 0): _c(128, 128, 64, 8, 3),
    (512, 256, 1, 1, 1, 28, 0): _c(128, 128, 64, 8, 3),
    (256, 256, 3, 3, 2, 28, 0): _c(128, 256, 64, 8, 4),
    (256, 1024, 1, 1, 1, 14, 1): _c(128, 128, 32, 4, 5),
    (512, 1024, 1, 1, 2, 28, 0): _c(128, 128, 64, 8, 3),
    (1024, 256, 1, 1, 1, 14, 0): _c(128, 256, 64, 8, 4),
    (256, 256, 3, 3, 1, 14, 0): _c(128, 256, 64, 8, 3),
    (1024, 512, 1, 1, 1, 14, 0): _c(64, 256, 64, 4, 4),
    (512, 512, 3, 3, 2, 14, 0): _c(64, 256, 64, 4, 4),
    (512, 2048, 1, 1, 1, 7, 1): _c(64, 128, 64, 4, 4),
    (1024, 2048, 1, 1, 2, 14, 0): _c(64, 256, 64, 4, 4),
    (2048, 512, 1, 1, 1, 7, 0): _c(64, 256, 64, 4, 4),
    (512, 512, 3, 3, 1, 7, 0): _c(64, 256, 64, 4, 4),
    (64, 64, 3, 3, 1, 56, 1): _c(128, 64, 64, 4, 3, tma=False),
    (64, 128, 3, 3, 2, 56, 0): _c(128, 128, 64, 8, 3),
    (128, 128, 3, 3, 1, 28, 1): _c(64, 128, 64, 4, 4),
    (64, 128, 1, 1, 2, 56, 0): _c(128, 128, 64, 8, 3),
    (128, 256, 3, 3, 2, 28, 0): _c(128, 256, 64, 8, 4),
    (256, 256, 3, 3, 1, 14, 1): _c(128, 256, 64, 8, 3),
    (128, 256, 1, 1, 2, 28, 0): _c(128, 128, 64, 8, 3),
    (256, 512, 3, 3, 2, 14, 0): _c(64, 256, 64, 4, 4),
    (512, 512, 3, 3, 1, 7, 1): _c(64, 256, 64, 4, 4),
    (256, 512, 1, 1, 2, 14, 0): _c(64, 128, 64, 4, 4),
}

#: Shapes that another backend runs faster than the implicit-GEMM kernel, measured on the H100
#: at bf16 (benchmarks/conv_sweep.py, same run as :data:`TUNED`), keyed by (N, C, O, KH, KW,
#: stride, H, has residual) with square input, padding k // 2 and no dilation. "gemm": 1x1
#: stride-1 convs that the persistent TMA GEMM of kernels/matmul runs 12-20% faster (its
#: epilogue is act-then-residual: only taken without a residual). "cudnn": 3x3 convs at 7x7 and
#: 14x14 output with 256-512 channels: few output tiles (M = 3136-12544 rows) over a long K
#: (2304-4608); cuDNN (conv + bias, then eager add/relu) is 5-24% faster there than this
#: kernel, which has no split-K yet. Reported in benchmarks/results/conv.md.
ROUTES: dict[tuple[int, ...], str] = {
    (64, 64, 256, 1, 1, 1, 56, 0): "gemm",
    (64, 512, 256, 1, 1, 1, 28, 0): "gemm",
    (64, 1024, 512, 1, 1, 1, 14, 0): "gemm",
    (64, 2048, 512, 1, 1, 1, 7, 0): "gemm",
    (64, 256, 256, 3, 3, 2, 28, 0): "cudnn",
    (64, 256, 256, 3, 3, 1, 14, 0): "cudnn",
    (64, 512, 512, 3, 3, 2, 14, 0): "cudnn",
    (64, 512, 512, 3, 3, 1, 7, 0): "cudnn",
    (64, 512, 512, 3, 3, 1, 7, 1): "cudnn",
}


# ---------------------------------------------------------------------------------- launch


@dataclass(frozen=True)
class ConvGeometry:
    """Sizes of one convolution (NCHW names; the tensors are channels-last)."""

    n: int
    c: int
    h: int
    w: int
    o: int
    kh: int
    kw: int
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    @property
    def oh(self) -> int:
        return (self.h + 2 * self.padding[0] - self.dilation[0] * (self.kh - 1) - 1) // self.stride[
            0
        ] + 1

    @property
    def ow(self) -> int:
        return (self.w + 2 * self.padding[1] - self.dilation[1] * (self.kw - 1) - 1) // self.stride[
            1
        ] + 1

    @property
    def m(self) -> int:
        return self.n * self.oh * self.ow

    @property
    def is_gemm(self) -> bool:
        """A 1x1, stride-1, unpadded convolution: [M, C] @ [C, O] on the NHWC rows."""
        return (self.kh, self.kw, self.stride, self.padding) == (1, 1, (1, 1), (0, 0))

    @property
    def flops(self) -> int:
        return 2 * self.m * self.o * self.c * self.kh * self.kw


def pair(v, name: str = "") -> tuple[int, int]:
    """``v`` as an (h, w) pair (an int applies to both)."""
    if isinstance(v, int):
        return (v, v)
    t = tuple(v)
    if len(t) == 1:
        return (int(t[0]), int(t[0]))
    return (int(t[0]), int(t[1]))


def pack_conv_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight [O, C, KH, KW] in the layout the Triton convolution reads in place:
    channels-last memory format (storage [O, KH, KW, C]), so ``ops.conv2d`` does not repack it
    at every call. Pack once (the model compiler does, at load time); a weight in any other
    layout is packed on each call (one small copy)."""
    return weight.contiguous(memory_format=torch.channels_last)


def packed_from_storage(stored: torch.Tensor) -> torch.Tensor:
    """A packed weight from its contiguous [O, KH, KW, C] storage (e.g. a safetensors entry
    saved from ``pack_conv_weight(w).permute(0, 2, 3, 1)``): a view, no copy."""
    return stored.permute(0, 3, 1, 2)


def is_packed(weight: torch.Tensor) -> bool:
    """The weight's storage is [O, KH, KW, C] contiguous (read in place)."""
    return weight.permute(0, 2, 3, 1).is_contiguous()


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` [N, C, H, W] with NHWC storage (a no-op when it already is)."""
    return x.contiguous(memory_format=torch.channels_last)


def _w_matrix(weight: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(packed weight as rows [O, stride] of KH*KW*C (r, s, c) values, row stride)."""
    wp = weight if is_packed(weight) else pack_conv_weight(weight)
    o = wp.shape[0]
    k = wp[0].numel()
    return wp.permute(0, 2, 3, 1).reshape(o, k), k


def _tma_weight_ok(wmat: torch.Tensor, k: int) -> bool:
    es = wmat.element_size()
    return wmat.data_ptr() % 16 == 0 and (k * es) % 16 == 0


def _key(g: ConvGeometry, dtype: torch.dtype, epi: tuple) -> tuple:
    return (tune.bucket(g.m), g.c, g.o, g.kh, g.kw, g.h, g.w, *g.stride, *g.padding,
            *g.dilation, str(dtype).removeprefix("torch."), *epi)  # fmt: skip


def _use_tma() -> bool:
    if device.INTERPRET:
        return False
    cap = device.capability(torch.cuda.current_device())
    return cap is not None and cap[0] >= 9


def launch(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, g: ConvGeometry,
           bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
           act: str | None = None, config: ConvConfig | None = None) -> str:  # fmt: skip
    """``out = act(conv(x, weight) + bias + residual)`` by the implicit-GEMM kernel.

    x [N, H, W, C] and out / residual [M, O] contiguous (channels-last storage); weight
    [O, C, KH, KW] (read in place when packed). ``config`` overrides the tuned choice (sweeps,
    tests). Returns the kernel that ran ("flat" | "channel")."""
    if out.numel() == 0:
        return "none"
    wmat, kstride = _w_matrix(weight)
    flat = g.c < FLAT_K_MAX_C
    common = dict(
        ACT=ACTIVATIONS[act], HAS_BIAS=bias is not None, HAS_RES=residual is not None,
        FLAT=flat, UPCAST=device.INTERPRET,
    )  # fmt: skip
    tma_ok = _use_tma() and not flat and _tma_weight_ok(wmat, kstride)

    def run(cfg: ConvConfig) -> None:
        b_tma = cfg.b_tma and tma_ok
        desc = None
        if b_tma:
            from triton.tools.tensor_descriptor import TensorDescriptor

            desc = TensorDescriptor(wmat, [g.o, kstride], [kstride, 1],
                                    [cfg.block_n, cfg.block_k])  # fmt: skip
        grid = (triton.cdiv(g.m, cfg.block_m) * triton.cdiv(g.o, cfg.block_n),)
        _conv_kernel[grid](
            x, wmat, desc, out, bias, residual,
            g.m, g.o, g.c, g.h, g.w, g.oh, g.ow, g.kw, g.kh * g.kw * g.c, kstride,
            *g.stride, *g.padding, *g.dilation, g.kh if flat else g.kh * g.kw,
            **common, EVEN_C=g.c % cfg.block_k == 0, B_TMA=b_tma,
            BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k, GROUP_M=cfg.group_m,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip

    if config is None:
        config = pick_config(g, x.dtype, (act, bias is not None, residual is not None), run)
    run(config)
    return "flat" if flat else "channel"


def _table_key(g: ConvGeometry, has_res: bool) -> tuple[int, ...] | None:
    """(N, C, O, KH, KW, stride, H, has residual) for the measured tables, or None when the
    geometry is not of their kind (square input and stride, padding k // 2, no dilation)."""
    square = g.h == g.w and g.stride[0] == g.stride[1] and g.dilation == (1, 1)
    if not square or g.padding != (g.kh // 2, g.kw // 2):
        return None
    return (g.n, g.c, g.o, g.kh, g.kw, g.stride[0], g.h, int(has_res))


def route(g: ConvGeometry, activation: str | None, has_res: bool) -> str:
    """Which kernel runs ``g``: "conv" (the implicit GEMM), "gemm" (kernels/matmul) or "cudnn"
    (torch), by the measured :data:`ROUTES` (the GPU only; the interpreter runs "conv")."""
    if device.INTERPRET:
        return "conv"
    key = _table_key(g, has_res)
    chosen = ROUTES.get(key, "conv") if key is not None else "conv"
    if chosen == "gemm" and not (g.is_gemm and (not has_res or activation is None)):
        return "conv"
    return chosen


def pick_config(g: ConvGeometry, dtype: torch.dtype, epi: tuple, run) -> ConvConfig:
    """The config for ``g``: the interpreter's, the measured table's, else the tuner's."""
    flat = g.c < FLAT_K_MAX_C
    if device.INTERPRET:
        return INTERPRET_CONFIG
    key = _table_key(g, epi[2])
    tuned = TUNED.get(key[1:]) if key is not None else None
    if tuned is not None and (tuned in FLAT_CONFIGS) == flat:
        return tuned
    tuner, default = (FLAT_TUNER, FLAT_DEFAULT) if flat else (TUNER, DEFAULT)
    return tuner.pick(_key(g, dtype, epi), run, default)


def geometry(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation) -> ConvGeometry:
    """The :class:`ConvGeometry` of ``conv2d(x, weight, ...)``."""
    n, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    return ConvGeometry(n, c, h, w, o, kh, kw, pair(stride), pair(padding), pair(dilation))


def conv2d_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   stride, padding, dilation, activation: str | None,
                   residual: torch.Tensor | None, config: ConvConfig | None = None,
                   force_route: str | None = None,
                   out: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The Triton forward: the output [N, O, OH, OW] in channels-last memory format.

    ``config`` forces the implicit-GEMM kernel with that config, ``force_route`` a route of
    :func:`route` ("conv", "gemm" or "cudnn"; sweeps and benchmarks). ``out``: an
    [N, O, OH, OW] channels-last tensor (checked by ``ops.conv2d``) the kernels write in place
    (the cuDNN route adds the residual into it and applies the activation there); returned."""
    g = geometry(x, weight, stride, padding, dilation)
    xc = channels_last(x)
    chosen = "conv" if config is not None else route(g, activation, residual is not None)
    if force_route is not None:
        chosen = force_route
    if chosen == "cudnn":
        z = F.conv2d(xc, weight, bias, g.stride, g.padding, g.dilation)
        if out is None:
            if residual is not None:
                z = z + residual
            return channels_last(apply_activation(z, activation))
        if residual is not None:
            z = torch.add(z, residual, out=out)
        return activation_into(z, activation, out)
    given = out
    if out is None:
        out = new_output((g.n, g.oh, g.ow, g.o), x.dtype, x.device)
    else:
        out = out.permute(0, 2, 3, 1)  # the NHWC storage, contiguous
    res = None if residual is None else channels_last(residual).permute(0, 2, 3, 1)
    bias = None if bias is None else bias.contiguous()
    if out.numel():
        if chosen == "gemm":
            # act(a @ b + bias) + residual == act(a @ b + bias + residual) here.
            a = xc.permute(0, 2, 3, 1).reshape(g.m, g.c)
            b = weight.reshape(g.o, g.c).t()
            r2 = None if res is None else res.reshape(g.m, g.o)
            mm.launch(a, b, out.view(g.m, g.o), bias, r2, activation)
        else:
            launch(xc, weight, out, g, bias, res, activation, config)
    return out.permute(0, 3, 1, 2) if given is None else given


def pool2d_forward(x: torch.Tensor, out_hw: tuple[int, int], window: tuple[int, int],
                   stride: tuple[int, int], padding: tuple[int, int], is_max: bool,
                   adaptive: bool, out: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The Triton pool: the output [N, C, OH, OW] in channels-last memory format (written
    into ``out``, an [N, C, OH, OW] channels-last tensor, when given)."""
    n, c, h, w = x.shape
    oh, ow = out_hw
    xc = channels_last(x)
    given = out
    if out is None:
        out = new_output((n, oh, ow, c), x.dtype, x.device)
    else:
        out = out.permute(0, 2, 3, 1)  # the NHWC storage, contiguous
    p = n * oh * ow
    if out.numel():
        bc = min(triton.next_power_of_2(c), 64 if device.INTERPRET else 128)
        bp = max(1, (4096 if device.INTERPRET else 2048) // bc)
        bp = min(bp, triton.next_power_of_2(p))
        grid = (triton.cdiv(p, bp), triton.cdiv(c, bc))
        _pool_kernel[grid](
            xc, out, p, c, h, w, oh, ow, *stride, *padding, *window,
            MAX=is_max, ADAPTIVE=adaptive, BP=bp, BC=bc, num_warps=4,
        )  # fmt: skip
    return out.permute(0, 3, 1, 2) if given is None else given


def adaptive_window(size: int, out: int) -> int:
    """The largest adaptive-pool window along one axis (the kernel's loop bound)."""
    return max(-(-((o + 1) * size) // out) - (o * size) // out for o in range(out))


def pool_out(size: int, k: int, s: int, p: int) -> int:
    """Output size of a pooling window along one axis (floor mode)."""
    return (size + 2 * p - k) // s + 1


# ---------------------------------------------------------------------------------- registration


def _supports_conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1,
                     activation=None, residual=None, out=None):  # fmt: skip
    if groups != 1:
        return f"groups={groups} (the Triton convolution takes groups=1; grouped runs on torch)"
    for t in (x, weight, bias, residual):
        if t is not None and t.dtype not in CONV_DTYPES:
            return f"dtype {t.dtype} (the Triton convolution takes float16 and bfloat16)"
    if wants_grad(x, weight, bias, residual):
        return "a gradient is needed (the Triton convolution is forward-only: inference)"
    return triton_reason(x, weight, bias, residual)


@register_impl("conv2d", "triton", supports=_supports_conv2d)
def conv2d_triton(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1,
                  activation=None, residual=None, out=None):  # fmt: skip
    """Triton implicit-GEMM convolution with the fused epilogue (channels-last output, or
    written into ``out``)."""
    return conv2d_forward(x, weight, bias, stride, padding, dilation, activation, residual,
                          out=out)  # fmt: skip


def apply_activation(z: torch.Tensor, activation: str | None) -> torch.Tensor:
    """``activation`` (None, "relu", "gelu" (tanh approximation), "silu") in eager torch."""
    if activation == "relu":
        return F.relu(z)
    if activation == "gelu":
        return F.gelu(z, approximate="tanh")
    if activation == "silu":
        return F.silu(z)
    return z


def activation_into(z: torch.Tensor, activation: str | None, out: torch.Tensor) -> torch.Tensor:
    """``activation(z)`` written into ``out`` by one eager kernel (``z`` may be ``out``
    itself: elementwise, so in place); returns ``out``."""
    if activation == "relu":
        return torch.clamp_min(z, 0, out=out)
    if activation == "silu":
        return torch.ops.aten.silu.out(z, out=out)
    if activation == "gelu":
        return torch.ops.aten.gelu.out(z, approximate="tanh", out=out)
    return out if z is out else out.copy_(z)


def _into(out: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    """``y``, or ``out`` after copying ``y`` into it (the torch references' ``out=``)."""
    return y if out is None else out.copy_(y)


@register_impl("conv2d", "torch")
def conv2d_torch(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1,
                 activation=None, residual=None, out=None):  # fmt: skip
    """Reference: ``act(F.conv2d(x, weight, bias, ...) + residual)`` in eager torch (copied
    into ``out`` when given)."""
    z = F.conv2d(x, weight, bias, pair(stride), pair(padding), pair(dilation), groups)
    if residual is not None:
        z = z + residual
    return _into(out, apply_activation(z, activation))


def _supports_pool(x, *args):
    if x.dtype not in (*CONV_DTYPES, torch.float32):
        return f"dtype {x.dtype} (the Triton pools take float16, bfloat16 and float32)"
    if wants_grad(x):
        return "a gradient is needed (the Triton pools are forward-only: inference)"
    return triton_reason(x)


def _supports_max_pool(x, kernel_size, stride=None, padding=0, out=None):
    return _supports_pool(x)


def _supports_avg_pool(x, output_size, out=None):
    return _supports_pool(x)


@register_impl("max_pool2d", "triton", supports=_supports_max_pool)
def max_pool2d_triton(x, kernel_size, stride=None, padding=0, out=None):
    """Triton max pool on channels-last x (floor mode, dilation 1)."""
    k = pair(kernel_size)
    s = pair(stride if stride is not None else kernel_size)
    p = pair(padding)
    out_hw = (pool_out(x.shape[2], k[0], s[0], p[0]), pool_out(x.shape[3], k[1], s[1], p[1]))
    return pool2d_forward(x, out_hw, k, s, p, True, False, out)


@register_impl("max_pool2d", "torch")
def max_pool2d_torch(x, kernel_size, stride=None, padding=0, out=None):
    """Reference: ``F.max_pool2d`` (copied into ``out`` when given)."""
    s = stride if stride is not None else kernel_size
    return _into(out, F.max_pool2d(x, kernel_size, s, padding))


@register_impl("adaptive_avg_pool2d", "triton", supports=_supports_avg_pool)
def adaptive_avg_pool2d_triton(x, output_size, out=None):
    """Triton adaptive average pool on channels-last x (global pool: output_size 1)."""
    oh, ow = pair(output_size)
    h, w = x.shape[2], x.shape[3]
    window = (adaptive_window(h, oh), adaptive_window(w, ow))
    return pool2d_forward(x, (oh, ow), window, (1, 1), (0, 0), False, True, out)


@register_impl("adaptive_avg_pool2d", "torch")
def adaptive_avg_pool2d_torch(x, output_size, out=None):
    """Reference: ``F.adaptive_avg_pool2d`` (copied into ``out`` when given)."""
    return _into(out, F.adaptive_avg_pool2d(x, pair(output_size)))
