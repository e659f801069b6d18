"""GEMM: ``ops.matmul`` with a fused epilogue, ``ops.bmm``, and ``ops.linear`` for M > 16 rows.
Triton kernels, launch wrappers, autograd, tuning and the torch references.

Two kernels compute ``act(a @ b + bias) + residual`` with fp32 accumulation:

- ``_mm_tma_kernel`` (Hopper, sm_90+): operands read by TMA (host ``TensorDescriptor``s),
  persistent programs (one per SM) walking the output tiles in grouped, L2-friendly order, the
  K loop software-pipelined into wgmma by Triton; optionally warp-specialized
  (``tl.range(..., warp_specialize=True)``: producer warps issue the TMA loads, consumer
  warpgroups run the MMAs), loop flattening, the epilogue in 2 or 4 column chunks (fewer live
  registers and less shared memory for the fused epilogue), and a stream-K mode for grids
  of few tiles. Transposed operands (``a.t()``, ``weight.t()``) are read in their stored
  layout and transposed in shared memory: no copies.
- ``_mm_ptr_kernel`` (portable): plain pointer loads with masks, any strides, for other
  archs, operands TMA cannot describe (a row stride that is not a multiple of 16 bytes, e.g.
  K = 17) and the CPU interpreter (where tiles are upcast to fp32 first: bf16 math is wrong
  there).

Both fuse the epilogue: bias [N], the activation (relu, gelu with the tanh approximation, silu),
the residual [M, N], and, when a gradient will be needed, the pre-activation ``z = a @ b + bias``
as a second output. The backward saves that z instead of recomputing it: storing it costs one
extra M x N write in the forward (at 8192 x 28672 x 4096: ~0.16 ms of a ~2.5 ms GEMM), while
recomputing costs a whole GEMM in the backward; it costs M x N of memory, as torch eager does
for the same layer. The backward then runs ``dz = dy * act'(z)`` (one elementwise pass), and the
same GEMM kernels on transposed views: ``da = dz @ b^T``, ``db = a^T @ dz``, ``dbias = dz.sum(0)``,
``dresidual = dy``; each gradient is written in its input's layout (a transposed weight gets a
gradient in the weight's own layout, so autograd copies nothing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from .. import device, tune
from ..dispatch import register_impl
from .common import arrival_counters, new_output, op_call, tile_order, triton_reason, wants_grad

#: The ACT constexpr of the kernels, by activation name (None: no activation).
ACTIVATIONS: dict[str | None, int] = {None: 0, "relu": 1, "gelu": 2, "silu": 3}
#: dtypes of the Triton GEMM (tensor-core operands; accumulation is fp32).
GEMM_DTYPES = (torch.float16, torch.bfloat16)
#: Rows of x that ``ops.linear`` leaves to the CUDA GEMV (decode); more run this GEMM.
LINEAR_MIN_M = 17
#: The special-function unit's tanh is there (compiled kernels; the interpreter has no PTX).
_SFU = tl.constexpr(not device.INTERPRET)
#: Kernel choice: "auto" (TMA on sm_90+ when the operands allow it, pointer kernel otherwise
#: and under the interpreter), "tma" or "pointer" (tests force each; "tma" still falls back to
#: the pointer kernel for operands TMA cannot describe).
KERNEL = "auto"


# ---------------------------------------------------------------------------------- kernels


@triton.jit
def _tanh_approx(x):
    """The SFU's tanh (one instruction; max relative error 2^-11, below bf16's rounding)."""
    return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                     is_pure=True, pack=1)  # fmt: skip


@triton.jit
def _act(z, ACT: tl.constexpr, FAST: tl.constexpr = False):
    """The activation in fp32: none, relu, gelu (tanh approximation) or silu.

    FAST (bf16 outputs on the GPU): gelu and silu through the SFU's tanh, one special-function
    instruction per element instead of two (exp and reciprocal): the epilogue of a 128x256
    tile is bound by those instructions. Its error (2^-11 relative on tanh) is under bf16's
    rounding (2^-9)."""
    if ACT == 1:
        z = tl.maximum(z, 0.0)
    elif ACT == 2:
        u = 0.7978845608028654 * z * (1.0 + 0.044715 * z * z)  # sqrt(2/pi) * (z + 0.044715 z^3)
        if FAST:
            hz = 0.5 * z
            z = hz + hz * _tanh_approx(u)
        else:
            # 0.5 * z * (1 + tanh(u)) == z * sigmoid(2u): no cancellation for z << 0.
            z = z * tl.sigmoid(2.0 * u)
    elif ACT == 3:
        if FAST:
            hz = 0.5 * z
            z = hz + hz * _tanh_approx(hz)  # sigmoid(z) = (1 + tanh(z / 2)) / 2
        else:
            z = z * tl.sigmoid(z)
    return z


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    """d act(z) / dz in fp32."""
    if ACT == 1:
        d = tl.where(z > 0.0, 1.0, 0.0)
    elif ACT == 2:
        s = tl.sigmoid(1.5957691216057308 * z * (1.0 + 0.044715 * z * z))
        # z clamped only to keep z^3 finite (0 * inf); past |z| = 10 the term is < 1e-34.
        zc = tl.minimum(tl.maximum(z, -10.0), 10.0)
        d = s + 1.5957691216057308 * zc * s * (1.0 - s) * (1.0 + 0.134145 * zc * zc)
    elif ACT == 3:
        s = tl.sigmoid(z)
        d = s + z * s * (1.0 - s)
    else:
        d = tl.full(z.shape, 1.0, tl.float32)
    return d


@triton.jit
def _store_tile(dst, v, bid, off_m, off_n, M, N, BM: tl.constexpr, BN: tl.constexpr,
                TMA: tl.constexpr, BATCHED: tl.constexpr):  # fmt: skip
    """Store a [BM, BN] fp32 tile at (off_m, off_n) of a contiguous [(batch,) M, N] output:
    through its TMA descriptor (clipped at the edges by the hardware), or masked pointers."""
    if TMA:
        if BATCHED:
            dst.store([bid, off_m, off_n], tl.reshape(v.to(dst.dtype), (1, BM, BN)))
        else:
            dst.store([off_m, off_n], v.to(dst.dtype))
    else:
        offs_m = off_m + tl.arange(0, BM)
        offs_n = off_n + tl.arange(0, BN)
        base = dst + bid.to(tl.int64) * M * N
        ptrs = base + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        tl.store(ptrs, v.to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _epilogue(acc, bid, off_m, off_n, M, N, c, z, bias_ptr, r_ptr, stride_rm, stride_rn,
              BM: tl.constexpr, BN: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
              HAS_RES: tl.constexpr, STORE_Z: tl.constexpr, C_TMA: tl.constexpr,
              BATCHED: tl.constexpr):  # fmt: skip
    """``c = act(acc + bias) + residual`` (and ``z = acc + bias``) for one output tile."""
    offs_n = off_n + tl.arange(0, BN)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    if STORE_Z:
        _store_tile(z, acc, bid, off_m, off_n, M, N, BM, BN, C_TMA, BATCHED)
    if C_TMA:
        y = _act(acc, ACT, _SFU and c.dtype == tl.bfloat16)
    else:
        y = _act(acc, ACT, _SFU and c.dtype.element_ty == tl.bfloat16)
    if HAS_RES:
        offs_m = off_m + tl.arange(0, BM)
        mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        r_ptrs = r_ptr + offs_m.to(tl.int64)[:, None] * stride_rm + offs_n[None, :] * stride_rn
        y = y + tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
    _store_tile(c, y, bid, off_m, off_n, M, N, BM, BN, C_TMA, BATCHED)


@triton.jit
def _tma_tile(desc, bid, off_0, off_1, B0: tl.constexpr, B1: tl.constexpr,
              BATCHED: tl.constexpr):  # fmt: skip
    """A [B0, B1] tile at (off_0, off_1) of a rank-2 descriptor, or of batch ``bid`` of a
    rank-3 one."""
    if BATCHED:
        return tl.reshape(desc.load([bid, off_0, off_1]), (B0, B1))
    else:
        return desc.load([off_0, off_1])


@triton.jit
def _tma_step(acc, a_desc, b_desc, a_batch, b_batch, off_m, off_n, off_k,
              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, A_T: tl.constexpr,
              B_T: tl.constexpr, BATCHED: tl.constexpr, UPCAST: tl.constexpr):  # fmt: skip
    """``acc + a[off_m:, off_k:] @ b[off_k:, off_n:]`` for one K step of the TMA kernel: the
    tiles are loaded through the descriptors (transposed operands are read in their stored
    layout and transposed in registers); UPCAST multiplies in fp32 (the interpreter)."""
    if A_T:
        a = _tma_tile(a_desc, a_batch, off_k, off_m, BK, BM, BATCHED).T
    else:
        a = _tma_tile(a_desc, a_batch, off_m, off_k, BM, BK, BATCHED)
    if B_T:
        b = _tma_tile(b_desc, b_batch, off_n, off_k, BN, BK, BATCHED).T
    else:
        b = _tma_tile(b_desc, b_batch, off_k, off_n, BK, BN, BATCHED)
    if UPCAST:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _halves(x, BM: tl.constexpr, W: tl.constexpr):
    """A [BM, W] tile as its left and right [BM, W/2] halves (a register shuffle)."""
    return tl.split(tl.permute(tl.reshape(x, (BM, 2, W // 2)), (0, 2, 1)))


@triton.jit
def _finish(acc, bid, off_m, off_n, M, N, c, z, bias_ptr, r_ptr, stride_rm, stride_rn,
            BM: tl.constexpr, BN: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
            HAS_RES: tl.constexpr, STORE_Z: tl.constexpr, C_TMA: tl.constexpr,
            BATCHED: tl.constexpr, CHUNKS: tl.constexpr):  # fmt: skip
    """The epilogue of one [BM, BN] tile, whole or in CHUNKS (2 or 4) column chunks: the
    activation's temporaries for a whole 128x256 fp32 tile beside the accumulator would exceed
    the registers; a chunk at a time they fit (and the output staging buffer shrinks)."""
    if CHUNKS == 1:
        _epilogue(acc, bid, off_m, off_n, M, N, c, z, bias_ptr, r_ptr, stride_rm, stride_rn,
                  BM, BN, ACT, HAS_BIAS, HAS_RES, STORE_Z, C_TMA, BATCHED)  # fmt: skip
    else:
        H: tl.constexpr = BN // 2
        acc0, acc1 = _halves(acc, BM, BN)
        if CHUNKS == 2:
            _epilogue(acc0, bid, off_m, off_n, M, N, c, z, bias_ptr, r_ptr, stride_rm,
                      stride_rn, BM, H, ACT, HAS_BIAS, HAS_RES, STORE_Z, C_TMA,
                      BATCHED)  # fmt: skip
            _epilogue(acc1, bid, off_m, off_n + H, M, N, c, z, bias_ptr, r_ptr, stride_rm,
                      stride_rn, BM, H, ACT, HAS_BIAS, HAS_RES, STORE_Z, C_TMA,
                      BATCHED)  # fmt: skip
        else:
            Q: tl.constexpr = BN // 4
            q0, q1 = _halves(acc0, BM, H)
            _epilogue(q0, bid, off_m, off_n, M, N, c, z, bias_ptr, r_ptr, stride_rm,
                      stride_rn, BM, Q, ACT, HAS_BIAS, HAS_RES, STORE_Z, C_TMA,
                      BATCHED)  # fmt: skip
            _epilogue(q1, bid, off_m, off_n + Q, M, N, c, z, bias_ptr, r_ptr, stride_rm,
                      stride_rn, BM, Q, ACT, HAS_BIAS, HAS_RES, STORE_Z, C_TMA,
                      BATCHED)  # fmt: skip
            q2, q3 = _halves(acc1, BM, H)
            _epilogue(q2, bid, off_m, off_n + 2 * Q, M, N, c, z, bias_ptr, r_ptr, stride_rm,
                      stride_rn, BM, Q, ACT, HAS_BIAS, HAS_RES, STORE_Z, C_TMA,
                      BATCHED)  # fmt: skip
            _epilogue(q3, bid, off_m, off_n + 3 * Q, M, N, c, z, bias_ptr, r_ptr, stride_rm,
                      stride_rn, BM, Q, ACT, HAS_BIAS, HAS_RES, STORE_Z, C_TMA,
                      BATCHED)  # fmt: skip


@triton.jit
def _mm_tma_kernel(
    a_desc, b_desc, c, z, bias_ptr, r_ptr, ws_ptr, cnt_ptr,
    M, N, K, BATCH, a_bmul, b_bmul, stride_rm, stride_rn, max_parts, max_segs,
    A_T: tl.constexpr, B_T: tl.constexpr, BATCHED: tl.constexpr, C_TMA: tl.constexpr,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, STORE_Z: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_SMS: tl.constexpr, STREAM_K: tl.constexpr, SUBTILE: tl.constexpr,
    WARP_SPEC: tl.constexpr, FLATTEN: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Persistent TMA GEMM. A_T: a is stored [K, M] (a.t() of a row-major tensor); B_T: b is
    stored [N, K] (weight.t()). a_bmul/b_bmul: 1, or 0 for an operand broadcast over the
    batch (batch stride 0).

    Data-parallel (STREAM_K False): each program walks whole output tiles, NUM_SMS apart.

    Stream-K (few output tiles: too few to fill the SMs): the tiles x K-tiles iterations are
    split evenly over the programs, so a tile's K range may be shared by consecutive programs.
    A program that computes only part of a tile stores its fp32 partial (in two column halves,
    which keeps the registers of the reduction low) in slot ``j`` (its rank among the tile's
    contributors) of ``ws_ptr`` and bumps the tile's counter; the last contributor to arrive
    adds the partials in slot order (the same sum every run), runs the epilogue and resets the
    counter for the next launch."""
    start = tl.program_id(0)
    tiles_m = tl.cdiv(M, BM)
    tiles_n = tl.cdiv(N, BN)
    per_batch = tiles_m * tiles_n
    num_tiles = per_batch * BATCH
    k_tiles = tl.cdiv(K, BK)
    if STREAM_K:
        HALF: tl.constexpr = BN // 2
        # Partials are kept in halves; each half's epilogue in SUBTILE // 2 chunks (at least 1).
        HALF_CHUNKS: tl.constexpr = 2 if SUBTILE == 4 else 1
        progs = tl.num_programs(0).to(tl.int64)
        total = num_tiles.to(tl.int64) * k_tiles
        it = start * total // progs
        it_end = (start + 1) * total // progs
        half_offs = tl.arange(0, BM)[:, None] * HALF + tl.arange(0, HALF)[None, :]
        # A for loop over at most max_segs segments (not a while loop), and K loops that start
        # at 0, as in the data-parallel path: the shape of loop Triton software-pipelines.
        # Segments past this program's range run no K iterations and skip the epilogue.
        for _seg in range(0, max_segs):
            live = it < it_end
            tile = (tl.minimum(it, total - 1) // k_tiles).to(tl.int32)
            t0 = tile.to(tl.int64) * k_tiles
            k_lo = (it - t0).to(tl.int32)
            k_hi = tl.minimum(it_end - t0, k_tiles).to(tl.int32)
            n_k = tl.where(live, k_hi - k_lo, 0)
            bid = tile // per_batch
            pid_m, pid_n = tile_order(tile - bid * per_batch, tiles_m, tiles_n, GROUP_M)
            off_m = pid_m * BM
            off_n = pid_n * BN
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for kk in range(0, n_k):
                off_k = (k_lo + kk) * BK
                acc = _tma_step(acc, a_desc, b_desc, bid * a_bmul, bid * b_bmul, off_m, off_n,
                                off_k, BM, BN, BK, A_T, B_T, BATCHED, UPCAST)  # fmt: skip
            if live:
                if (k_lo == 0) & (k_hi == k_tiles):
                    _finish(acc, bid, off_m, off_n, M, N, c, z, bias_ptr, r_ptr, stride_rm,
                            stride_rn, BM, BN, ACT, HAS_BIAS, HAS_RES, STORE_Z, C_TMA, BATCHED,
                            2 * HALF_CHUNKS)  # fmt: skip
                else:
                    # Contributors of this tile: the programs owning its first and last
                    # iteration (program p owns [p * total // progs, (p + 1) * total // progs)).
                    first = ((t0 + 1) * progs - 1) // total
                    last = ((t0 + k_tiles) * progs - 1) // total
                    slot = ws_ptr + (tile.to(tl.int64) * max_parts + (start - first)) * (BM * BN)
                    a0, a1 = _halves(acc, BM, BN)
                    tl.store(slot + half_offs, a0, cache_modifier=".cg")
                    tl.store(slot + BM * HALF + half_offs, a1, cache_modifier=".cg")
                    tl.debug_barrier()  # every thread's partial is written before the counter
                    arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
                    if arrived == last - first:
                        tl.debug_barrier()  # the partials are read after the counter
                        parts = (last - first + 1).to(tl.int32)
                        base = ws_ptr + tile.to(tl.int64) * max_parts * (BM * BN)
                        for h in tl.static_range(2):
                            part = tl.load(base + h * (BM * HALF) + half_offs,
                                           cache_modifier=".cg")  # fmt: skip
                            for j in range(1, parts):
                                part += tl.load(base + j * (BM * BN) + h * (BM * HALF)
                                                + half_offs, cache_modifier=".cg")  # fmt: skip
                            _finish(part, bid, off_m, off_n + h * HALF, M, N, c, z, bias_ptr,
                                    r_ptr, stride_rm, stride_rn, BM, HALF, ACT, HAS_BIAS,
                                    HAS_RES, STORE_Z, C_TMA, BATCHED, HALF_CHUNKS)  # fmt: skip
                        tl.store(cnt_ptr + tile, 0)  # ready for the next launch (stream order)
            it = tl.minimum(t0 + k_tiles, it_end)
    else:
        # The epilogue recomputes its tile from a counter of its own: sharing the loop's
        # values between the pipelined prologue and the epilogue defeats the pipelining.
        tile_c = start - NUM_SMS
        for tile in tl.range(start, num_tiles, NUM_SMS, flatten=FLATTEN,
                             warp_specialize=WARP_SPEC):  # fmt: skip
            bid = tile // per_batch
            pid_m, pid_n = tile_order(tile - bid * per_batch, tiles_m, tiles_n, GROUP_M)
            off_m = pid_m * BM
            off_n = pid_n * BN
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for ki in range(k_tiles):
                off_k = ki * BK
                acc = _tma_step(acc, a_desc, b_desc, bid * a_bmul, bid * b_bmul, off_m, off_n,
                                off_k, BM, BN, BK, A_T, B_T, BATCHED, UPCAST)  # fmt: skip
            tile_c += NUM_SMS
            bid_c = tile_c // per_batch
            pid_m, pid_n = tile_order(tile_c - bid_c * per_batch, tiles_m, tiles_n, GROUP_M)
            _finish(acc, bid_c, pid_m * BM, pid_n * BN, M, N, c, z, bias_ptr, r_ptr, stride_rm,
                    stride_rn, BM, BN, ACT, HAS_BIAS, HAS_RES, STORE_Z, C_TMA, BATCHED,
                    SUBTILE)  # fmt: skip


@triton.jit
def _mm_ptr_kernel(
    a_ptr, b_ptr, c_ptr, z_ptr, bias_ptr, r_ptr,
    M, N, K, stride_ab, stride_am, stride_ak, stride_bb, stride_bk, stride_bn,
    stride_rm, stride_rn,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, STORE_Z: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    """Portable GEMM: one program per output tile (grid axis 1: the batch), any strides."""
    bid = tl.program_id(1)
    pid_m, pid_n = tile_order(tl.program_id(0), tl.cdiv(M, BM), tl.cdiv(N, BN), GROUP_M)
    off_m = pid_m * BM
    off_n = pid_n * BN
    # Rows/columns past the edge read row/column 0 (in bounds, never stored): only K is masked.
    offs_m = off_m + tl.arange(0, BM)
    offs_n = off_n + tl.arange(0, BN)
    offs_m = tl.where(offs_m < M, offs_m, 0).to(tl.int64)
    offs_n = tl.where(offs_n < N, offs_n, 0).to(tl.int64)
    offs_k = tl.arange(0, BK)
    a_ptrs = a_ptr + bid.to(tl.int64) * stride_ab + offs_m[:, None] * stride_am
    a_ptrs += offs_k[None, :].to(tl.int64) * stride_ak
    b_ptrs = b_ptr + bid.to(tl.int64) * stride_bb + offs_n[None, :] * stride_bn
    b_ptrs += offs_k[:, None].to(tl.int64) * stride_bk
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for ki in range(tl.cdiv(K, BK)):
        k_left = K - ki * BK
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        if UPCAST:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BK * stride_ak
        b_ptrs += BK * stride_bk
    _epilogue(acc, bid, off_m, off_n, M, N, c_ptr, z_ptr, bias_ptr, r_ptr, stride_rm, stride_rn,
              BM, BN, ACT, HAS_BIAS, HAS_RES, STORE_Z, False, False)  # fmt: skip


@triton.jit
def _act_grad_kernel(dy_ptr, z_ptr, dz_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    """``dz = dy * act'(z)`` over n contiguous elements."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    zz = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dz_ptr + offs, (dy * _act_grad(zz, ACT)).to(dz_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class MatmulConfig:
    """Launch config of one GEMM kernel (the last three apply to the TMA kernel only)."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3
    warp_specialize: bool = False  # producer/consumer warp specialization of the tile loop
    flatten: bool = False  # flatten the tile and K loops into one pipelined loop
    subtile: int = 1  # epilogue in this many column chunks (1, 2, 4): fewer live registers
    #: > 1: stream-K over min(SMs, tiles * split_k) programs, so a tile's K range is shared by
    #: up to about split_k programs (few tiles: fill the SMs); 1: whole tiles per program.
    split_k: int = 1


def _c(bm, bn, bk, w, s, ws=False, fl=False, st=1, g=8, sk=1) -> MatmulConfig:
    """Shorthand: st=True means 2 epilogue chunks."""
    return MatmulConfig(bm, bn, bk, g, w, s, ws, fl, 2 if st is True else int(st), sk)


#: TMA kernel candidates measured by the tuner on Hopper (bf16/fp16), by shape class (see
#: :func:`shape_class`). "large": many output tiles, compute-bound: 128x256 tiles (two consumer
#: warpgroups, one tile per SM at a time), with and without warp specialization or loop
#: flattening (both overlap a tile's epilogue with the next tile's loads).
TMA_LARGE: list[MatmulConfig] = [
    _c(128, 256, 64, 8, 3, st=2),
    _c(128, 256, 64, 8, 4, st=2),
    _c(128, 256, 64, 8, 4, st=4),
    _c(128, 256, 64, 8, 3, ws=True, st=2),
    _c(128, 256, 64, 8, 3, ws=True, st=4),
    _c(128, 256, 64, 8, 4, fl=True, st=2),
    _c(256, 128, 64, 8, 4, st=2),
    _c(256, 128, 64, 8, 4, st=4),
    _c(128, 128, 64, 4, 5),
]
#: "small": too few 128x128 tiles to fill the SMs twice (M of a few hundred rows): smaller
#: tiles and deeper pipelines (these shapes stream the weight: memory-bound), and two stream-K
#: configs (each tile's K range shared by about split_k programs, the partials added by the
#: last to finish). Measured on the H100, the stream-K K loop runs at ~55-60% of the
#: data-parallel loop's rate (8192x4096x14336: 2.16 ms against 1.28), so it wins only where the
#: data-parallel grid leaves half the SMs idle (512x4096x14336, by ~1%); more were dropped.
TMA_SMALL: list[MatmulConfig] = [
    _c(128, 128, 64, 8, 4),
    _c(128, 128, 64, 4, 5, sk=2),
    _c(64, 128, 64, 4, 6),
    _c(64, 64, 128, 4, 6),
    _c(64, 256, 64, 4, 4),
    _c(128, 256, 64, 8, 3, st=2),
    _c(128, 256, 64, 8, 3, st=2, sk=2),
]
TMA_CONFIGS: list[MatmulConfig] = list(dict.fromkeys(TMA_LARGE + TMA_SMALL))
#: Pointer kernel candidates (operands TMA cannot describe, GPUs before Hopper).
PTR_CONFIGS: list[MatmulConfig] = [
    _c(128, 128, 64, 8, 3),
    _c(128, 128, 32, 4, 4),
    _c(128, 256, 64, 8, 3),
    _c(64, 128, 64, 4, 4),
    _c(64, 64, 64, 4, 4),
    _c(128, 64, 32, 4, 4),
]
#: Under the interpreter programs run one after another: small tiles so that the tests' small
#: shapes still cross tile edges, few stages (ignored there anyway).
INTERPRET_CONFIG = _c(32, 32, 32, 4, 1, g=2)

#: Untuned defaults (KERNFORGE_TUNE=off, graph capture, torch.compile tracing), by kernel and
#: shape class: the config with the best geometric mean over the issue's shapes of each class,
#: measured on the H100 (the tuner's timings of 20 "large" and 14 "small" keys: bf16, plain
#: and bias+gelu; docs/gemm.md). "large": 128x256, 3 stages, 2 epilogue chunks, within 1.6% of
#: the per-shape best on average; "small": 64x128, 6 stages, within 12% (the best small config
#: varies most with the shape: tune those).
DEFAULTS: dict[tuple[str, str], MatmulConfig] = {
    ("tma", "large"): _c(128, 256, 64, 8, 3, st=2),
    ("tma", "small"): _c(64, 128, 64, 4, 6),
    ("pointer", "large"): _c(128, 128, 64, 8, 3),
    ("pointer", "small"): _c(64, 64, 64, 4, 4),
}

#: A config that fits every epilogue variant's shared memory: used when the chosen one does not
#: (a config tuned without the pre-activation output, say, that the backward's forward needs).
SAFE_TMA = _c(128, 128, 64, 8, 3)

TUNERS = {
    ("tma", "large"): tune.Tuner("matmul_tma_large", TMA_LARGE, version="5"),
    ("tma", "small"): tune.Tuner("matmul_tma_small", TMA_SMALL, version="5"),
    ("pointer", "large"): tune.Tuner("matmul_pointer", PTR_CONFIGS, version="5"),
}
TUNERS[("pointer", "small")] = TUNERS[("pointer", "large")]


def shape_class(m: int, n: int, batch: int = 1) -> str:
    """The shape class: "large" when the output has at least two 128x128 tiles per SM of an
    H100, else "small" (smaller tiles, deeper pipelines, stream-K candidates)."""
    tiles = -(-m // 128) * -(-n // 128) * batch
    return "large" if tiles >= 264 else "small"


def default_config(kernel: str, m: int, n: int, batch: int = 1) -> MatmulConfig:
    """The untuned config of ``kernel`` ("tma" | "pointer") for an [m, n] output."""
    if device.INTERPRET:
        return INTERPRET_CONFIG
    return DEFAULTS[(kernel, shape_class(m, n, batch))]


# ---------------------------------------------------------------------------------- launch


@dataclass(frozen=True)
class Operand:
    """How a kernel reads one 2-D operand [rows, cols] (possibly batched): ``trans`` when it is
    stored column-major (stride 1 along rows), and its strides (batch, rows, cols)."""

    t: torch.Tensor
    rows: int
    cols: int
    trans: bool
    sb: int
    s0: int
    s1: int


def _operand(x: torch.Tensor) -> Operand:
    """Describe a [rows, cols] or [batch, rows, cols] operand: row-major when its last stride
    is 1 (or the last size is 1), else column-major when its row stride is 1, else neither
    (``trans`` False with both strides > 1: the pointer kernel handles it)."""
    rows, cols = x.shape[-2], x.shape[-1]
    sb = x.stride(0) if x.dim() == 3 else 0
    s0, s1 = x.stride(-2), x.stride(-1)
    row_major = s1 == 1 or cols == 1
    col_major = s0 == 1 or rows == 1
    # A single column stored contiguously (s0 == 1) is read as one row of the stored layout.
    trans = col_major and (not row_major or (cols == 1 and s0 == 1 and rows > 1))
    return Operand(x, rows, cols, trans, sb, s0, s1)


def _pad16(n: int, es: int) -> int:
    """A row stride (elements) for a size-1 dimension that TMA accepts: never stepped."""
    per = 16 // es
    return max(per, -(-n // per) * per)


def _descriptor(op: Operand, block: tuple[int, int], batch: int | None):
    """The TMA descriptor of an operand, or None when TMA cannot read it (base or stride not
    16-byte aligned, no unit stride). Column-major operands are described as stored, [cols,
    rows], with the block swapped; the kernel transposes the tile."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    t, es = op.t, op.t.element_size()
    if t.data_ptr() % 16:
        return None
    if op.trans:
        outer, inner, s_outer, s_inner = op.cols, op.rows, op.s1, op.s0
        blk = (block[1], block[0])
    else:
        outer, inner, s_outer, s_inner = op.rows, op.cols, op.s0, op.s1
        blk = block
    if inner > 1 and s_inner != 1:
        return None
    if outer == 1:
        s_outer = _pad16(inner, es)
    if (s_outer * es) % 16 or s_outer == 0:
        return None
    if batch is None:
        return TensorDescriptor(t, [outer, inner], [s_outer, 1], list(blk))
    sb = op.sb
    if sb == 0 or batch == 1:
        nb, sb = 1, _pad16(outer * s_outer, es)
    else:
        nb = batch
        if (sb * es) % 16:
            return None
    return TensorDescriptor(t, [nb, outer, inner], [sb, s_outer, 1], [1, *blk])


def _use_tma(dev: torch.device) -> bool:
    if KERNEL == "pointer":
        return False
    if KERNEL == "tma":
        return True
    if device.INTERPRET:
        return False
    cap = device.capability(dev.index or 0)
    return cap is not None and cap[0] >= 9


def _num_sms(dev: torch.device) -> int:
    return device.num_sms(dev.index or 0) if dev.type == "cuda" else device.num_sms()


def _key(kind: str, m: int, n: int, k: int, a: Operand, b: Operand, batch: int, epi: bool):
    return (tune.bucket(m), n, k, str(a.t.dtype).removeprefix("torch."), int(a.trans),
            int(b.trans), tune.bucket(batch), int(epi))  # fmt: skip


def launch(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None, act: str | None = None,
           pre: torch.Tensor | None = None, config: MatmulConfig | None = None,
           kernel: str | None = None) -> str:  # fmt: skip
    """``out = act(a @ b + bias) + residual`` (and ``pre = a @ b + bias``) in one kernel.

    a [M, K] and b [K, N] (or [B, M, K] and [B, K, N], batch strides may be 0; no epilogue
    then) of any strides; out (and pre) contiguous [(B,) M, N]; residual [M, N] of any strides.
    ``config``/``kernel`` override the tuned choice (sweeps and tests). Returns the kernel
    that ran ("tma" | "pointer").
    """
    batched = a.dim() == 3
    batch = a.shape[0] if batched else 1
    m, k = a.shape[-2], a.shape[-1]
    n = b.shape[-1]
    if out.numel() == 0:
        return "none"
    ao, bo = _operand(a), _operand(b)
    epi = bias is not None or residual is not None or act is not None
    kind = kernel or ("tma" if _use_tma(a.device) and k > 0 else "pointer")
    if kind == "tma" and (k == 0 or not _tma_possible(ao, bo, batch if batched else None)):
        kind = "pointer"
    common = dict(
        ACT=ACTIVATIONS[act], HAS_BIAS=bias is not None, HAS_RES=residual is not None,
        STORE_Z=pre is not None,
    )  # fmt: skip
    sr = residual.stride() if residual is not None else (0, 0)

    if kind == "pointer":

        def run_ptr(cfg: MatmulConfig) -> None:
            grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), batch)
            _mm_ptr_kernel[grid](
                a, b, out, pre, bias, residual, m, n, k,
                ao.sb, ao.s0, ao.s1, bo.sb, bo.s0, bo.s1, sr[0], sr[1], **common,
                BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k, GROUP_M=cfg.group_m,
                UPCAST=device.INTERPRET, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )  # fmt: skip

        cfg = config or _pick("pointer", m, n, k, ao, bo, batch, epi, run_ptr)
        run_ptr(cfg)
        return "pointer"

    sms = _num_sms(a.device)
    c_tma = _out_tma_ok(out, batched)

    def run_tma(cfg: MatmulConfig) -> None:
        a_desc = _descriptor(ao, (cfg.block_m, cfg.block_k), batch if batched else None)
        b_desc = _descriptor(bo, (cfg.block_k, cfg.block_n), batch if batched else None)
        tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n) * batch
        k_tiles = triton.cdiv(k, cfg.block_k)
        split = min(cfg.split_k, k_tiles)
        progs = min(sms, tiles)
        ws = cnt = None
        parts = segs = 1
        if split > 1:
            cnt = arrival_counters(a.device, tiles)
            if cnt is not None:  # None: inside a graph capture with no counters yet
                progs = min(sms, tiles * split)
                # Most programs sharing one tile: its K tiles over the shortest range, + 1;
                # most segments (tile pieces) in one program: its longest range, + 1.
                parts = -(-k_tiles // max(1, tiles * k_tiles // progs)) + 1
                span = triton.cdiv(tiles * k_tiles, progs)
                segs = triton.cdiv(span, k_tiles) + 1
                ws = torch.empty(tiles * parts * cfg.block_m * cfg.block_n,
                                 dtype=torch.float32, device=a.device)  # fmt: skip
        stream_k = ws is not None
        chunks = max(cfg.subtile, 2) if stream_k else cfg.subtile
        bn_store = cfg.block_n // chunks
        c_arg, z_arg = out, pre
        if c_tma:
            c_arg = _out_descriptor(out, cfg.block_m, bn_store, batched)
            z_arg = None if pre is None else _out_descriptor(pre, cfg.block_m, bn_store, batched)
        _mm_tma_kernel[(progs,)](
            a_desc, b_desc, c_arg, z_arg, bias, residual, ws, cnt, m, n, k, batch,
            int(ao.sb != 0 or batch == 1), int(bo.sb != 0 or batch == 1), sr[0], sr[1], parts,
            segs,
            A_T=ao.trans, B_T=bo.trans, BATCHED=batched, C_TMA=c_tma, **common,
            BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k, GROUP_M=cfg.group_m, NUM_SMS=sms,
            STREAM_K=stream_k, SUBTILE=cfg.subtile, WARP_SPEC=cfg.warp_specialize,
            FLATTEN=cfg.flatten, UPCAST=device.INTERPRET, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )  # fmt: skip

    if config is not None:
        run_tma(config)
        return "tma"
    cfg = _pick("tma", m, n, k, ao, bo, batch, epi, run_tma)
    variant = (cfg, c_tma, tuple(common.values()), ao.trans, bo.trans, batched)
    if variant in _too_big:
        cfg = SAFE_TMA
    try:
        run_tma(cfg)
    except OutOfResources:
        # Raised before anything runs: this epilogue variant needs more shared memory than
        # the config left (e.g. the pre-activation output). Remembered; the safe config runs.
        _too_big.add(variant)
        run_tma(SAFE_TMA)
    return "tma"


_too_big: set[tuple] = set()


def _pick(kind, m, n, k, ao, bo, batch, epi, run) -> MatmulConfig:
    cls = shape_class(m, n, batch)
    default = default_config(kind, m, n, batch)
    key = _key(kind, m, n, k, ao, bo, batch, epi)
    # The tuner times each config as CUDA-graph replays of ``run`` (kernforge.tune): an eager
    # launch costs ~100 us of host time here, as long as a whole GEMM of a few hundred rows.
    return TUNERS[(kind, cls)].pick(key, run, default)


def _tma_ok(op: Operand, batch: int | None) -> bool:
    """TMA can describe this operand (the rules of :func:`_descriptor`, without building one):
    16-byte aligned base and outer strides, unit inner stride."""
    es = op.t.element_size()
    if op.t.data_ptr() % 16:
        return False
    outer, inner, s_outer, s_inner = (
        (op.cols, op.rows, op.s1, op.s0) if op.trans else (op.rows, op.cols, op.s0, op.s1)
    )
    if inner > 1 and s_inner != 1:
        return False
    if outer > 1 and ((s_outer * es) % 16 or s_outer == 0):
        return False
    return not (batch is not None and batch > 1 and op.sb != 0 and (op.sb * es) % 16)


def _tma_possible(ao: Operand, bo: Operand, batch: int | None) -> bool:
    """TMA can describe both operands (any block shape: alignment does not depend on it)."""
    return _tma_ok(ao, batch) and _tma_ok(bo, batch)


def _out_tma_ok(out: torch.Tensor, batched: bool) -> bool:
    n, es = out.shape[-1], out.element_size()
    one_row = out.shape[-2] == 1 and not batched  # its row stride is never stepped
    return out.data_ptr() % 16 == 0 and ((n * es) % 16 == 0 or one_row)


def _out_descriptor(out: torch.Tensor, bm: int, bn: int, batched: bool):
    from triton.tools.tensor_descriptor import TensorDescriptor

    m, n = out.shape[-2], out.shape[-1]
    s0 = n if m > 1 else _pad16(n, out.element_size())
    if batched:
        sb = out.stride(0) if out.shape[0] > 1 else _pad16(m * s0, out.element_size())
        return TensorDescriptor(out, [out.shape[0], m, n], [sb, s0, 1], [1, bm, bn])
    return TensorDescriptor(out, [m, n], [s0, 1], [bm, bn])


def act_grad(dy: torch.Tensor, z: torch.Tensor, act: str) -> torch.Tensor:
    """``dy * act'(z)`` in one pass (z is the saved pre-activation, contiguous)."""
    dy = dy.contiguous()
    dz = new_output(z.shape, z.dtype, z.device)
    n = z.numel()
    if n:
        block = 16384 if device.INTERPRET else 4096
        _act_grad_kernel[(triton.cdiv(n, block),)](
            dy, z, dz, n, ACT=ACTIVATIONS[act], BLOCK=block, num_warps=8 if n > 4096 else 4
        )
    return dz


# ---------------------------------------------------------------------------------- custom ops


def _out2(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int]:
    return a.shape[0], b.shape[1]


def _act_name(activation: str) -> str | None:
    return None if activation == "none" else activation


@torch.library.custom_op("kernforge::matmul_fwd", mutates_args=())
def matmul_fwd(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None,
               residual: torch.Tensor | None, activation: str,
               save_pre: bool) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Triton ``act(a @ b + bias) + residual`` for 2-D a [M, K], b [K, N]; returns (y, z)
    with z = a @ b + bias when ``save_pre`` (else an empty tensor)."""
    shape = _out2(a, b)
    y = new_output(shape, a.dtype, a.device)
    z = new_output(shape if save_pre else (0,), a.dtype, a.device)
    launch(a, b, y, bias, residual, _act_name(activation), z if save_pre else None)
    return y, z


@matmul_fwd.register_fake
def _(a, b, bias, residual, activation, save_pre):
    shape = _out2(a, b)
    y = torch.empty(shape, dtype=a.dtype, device=a.device)
    return y, torch.empty(shape if save_pre else (0,), dtype=a.dtype, device=a.device)


@torch.library.custom_op("kernforge::matmul_mm", mutates_args=())
def matmul_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Triton ``a @ b`` (2-D or batched 3-D, any strides): the backward's GEMMs."""
    y = new_output((*a.shape[:-1], b.shape[-1]), a.dtype, a.device)
    launch(a, b, y)
    return y


@matmul_mm.register_fake
def _(a, b):
    return torch.empty((*a.shape[:-1], b.shape[-1]), dtype=a.dtype, device=a.device)


@torch.library.custom_op("kernforge::matmul_act_grad", mutates_args=())
def matmul_act_grad(dy: torch.Tensor, z: torch.Tensor, activation: str) -> torch.Tensor:
    """Triton ``dy * act'(z)``."""
    return act_grad(dy, z, activation)


@matmul_act_grad.register_fake
def _(dy, z, activation):
    return torch.empty(z.shape, dtype=z.dtype, device=z.device)


def _mm_like(a: torch.Tensor, b: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``a @ b`` written in ``like``'s layout: when ``like`` is column-major (a transposed
    view), compute ``(b^T @ a^T)`` row-major and return its transpose, so the gradient has the
    strides of the tensor it belongs to."""
    if like.dim() == 2 and _operand(like).trans:
        return op_call(matmul_mm, b.transpose(-1, -2), a.transpose(-1, -2)).transpose(-1, -2)
    if like.dim() == 3 and like.stride(-2) == 1 and like.stride(-1) != 1:
        return op_call(matmul_mm, b.transpose(-1, -2), a.transpose(-1, -2)).transpose(-1, -2)
    return op_call(matmul_mm, a, b)


class MatmulFunction(torch.autograd.Function):
    """Autograd of ``act(a @ b + bias) + residual`` for 2-D a and b."""

    @staticmethod
    def forward(ctx, a, b, bias, residual, activation):
        need = ctx.needs_input_grad
        save_pre = activation is not None and any(need[:3])
        y, z = op_call(matmul_fwd, a, b, bias, residual, activation or "none", save_pre)
        ctx.save_for_backward(a, b, z if save_pre else None)
        ctx.activation = activation
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        a, b, z = ctx.saved_tensors
        need = ctx.needs_input_grad
        dz = dy
        if ctx.activation is not None and any(need[:3]):
            dz = op_call(matmul_act_grad, dy, z, ctx.activation)
        da = _mm_like(dz, b.t(), a) if need[0] else None
        db = _mm_like(a.t(), dz, b) if need[1] else None
        dbias = dz.sum(0, dtype=torch.float32).to(dz.dtype) if ctx.has_bias and need[2] else None
        dres = dy if need[3] else None
        return da, db, dbias, dres, None


class BmmFunction(torch.autograd.Function):
    """Autograd of ``a @ b`` for [B, M, K] x [B, K, N]."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return op_call(matmul_mm, a, b)

    @staticmethod
    def backward(ctx, dy):
        a, b = ctx.saved_tensors
        need = ctx.needs_input_grad
        da = _mm_like(dy, b.transpose(1, 2), a) if need[0] else None
        db = _mm_like(a.transpose(1, 2), dy, b) if need[1] else None
        return da, db


# ---------------------------------------------------------------------------------- registration


def _fold(x: torch.Tensor) -> torch.Tensor:
    """[..., R, C] -> [rows, C] (a view when the leading dims fold; ``reshape`` copies else)."""
    return x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x


def _supports_matmul(a, b, bias=None, activation=None, residual=None, out=None):
    for t in (a, b, bias, residual):
        if t is not None and t.dtype not in GEMM_DTYPES:
            return f"dtype {t.dtype} (the Triton GEMM takes float16 and bfloat16)"
    return triton_reason(a, b, bias, residual)


@register_impl("matmul", "triton", supports=_supports_matmul)
def matmul_triton(a, b, bias=None, activation=None, residual=None, out=None):
    """Triton GEMM with the epilogue fused: ``act(a @ b + bias) + residual`` (written into
    ``out``, a contiguous tensor of the output's shape checked by ``ops.matmul``, when given:
    no autograd then)."""
    out_shape = (*a.shape[:-1], b.shape[1])
    a2 = _fold(a) if a.dim() != 1 else a.unsqueeze(0)
    r2 = None if residual is None else residual.reshape(-1, b.shape[1])
    if out is not None:
        launch(a2, b, out.view(a2.shape[0], b.shape[1]), bias, r2, activation)
        return out
    if wants_grad(a, b, bias, residual):
        y = MatmulFunction.apply(a2, b, bias, r2, activation)
    else:
        y, _ = op_call(matmul_fwd, a2, b, bias, r2, activation or "none", False)
    return y.view(out_shape)


@register_impl("matmul", "torch")
def matmul_torch(a, b, bias=None, activation=None, residual=None, out=None):
    """Reference: ``act(a @ b + bias) + residual`` in eager torch (gelu: tanh approximation;
    copied into ``out`` when given)."""
    if out is not None:
        return out.copy_(matmul_torch(a, b, bias, activation, residual))
    z = torch.matmul(a, b)
    if bias is not None:
        z = z + bias
    if activation == "relu":
        z = F.relu(z)
    elif activation == "gelu":
        z = F.gelu(z, approximate="tanh")
    elif activation == "silu":
        z = F.silu(z)
    return z if residual is None else z + residual


def _supports_bmm(a, b):
    return _supports_matmul(a, b)


@register_impl("bmm", "triton", supports=_supports_bmm)
def bmm_triton(a, b):
    """Triton batched GEMM (batch strides may be 0: broadcast operands)."""
    if wants_grad(a, b):
        return BmmFunction.apply(a, b)
    return op_call(matmul_mm, a, b)


@register_impl("bmm", "torch")
def bmm_torch(a, b):
    """Reference: ``torch.bmm``."""
    return torch.bmm(a, b)


def _rows(x: torch.Tensor) -> int:
    return math.prod(x.shape[:-1])


def _supports_linear(x, weight, bias=None):
    if _rows(x) < LINEAR_MIN_M:
        return (
            f"{_rows(x)} rows of x: up to {LINEAR_MIN_M - 1} run the CUDA GEMV (decode), "
            "the Triton GEMM takes more"
        )
    return _supports_matmul(x, weight, bias)


# Not taken by "auto" (named backend "triton" only): measured on the H100 at the Llama-3-8B
# projection shapes it is 0.95x cuBLAS (geometric mean; benchmarks/results/gemm.json), and an
# eager call costs 120-220 us of host time against cuBLAS's ~20. auto keeps torch (cuBLAS)
# for M > 16 rows until the GEMM wins there.
@register_impl("linear", "triton", supports=_supports_linear, auto=False)
def linear_triton(x, weight, bias=None):
    """Triton GEMM for ``x @ weight.T + bias`` with M > 16 rows (weight read in place)."""
    return matmul_triton(x, weight.t(), bias)


# ---------------------------------------------------------------------------------- tune CLI


def _tune_cli(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """``kernforge tune matmul --shapes MxNxK``: tune a @ b (b [K, N]) and x @ W^T (W [N, K])."""
    if len(shape) != 3:
        from ..errors import ArgumentError

        raise ArgumentError(f"matmul shapes are MxNxK, got {'x'.join(map(str, shape))}")
    m, n, k = shape
    a = torch.randn(m, k, device="cuda").to(dtype)
    row_major = torch.randn(k, n, device="cuda").to(dtype)
    weight = torch.randn(n, k, device="cuda").to(dtype)
    for b in (row_major, weight.t()):
        out = torch.empty(m, n, device="cuda", dtype=dtype)
        launch(a, b, out)


tune.register_cli(
    "matmul", run=_tune_cli, shapes_help="MxNxK",
    default_shapes=[(4096, 4096, 4096), (8192, 8192, 8192),
                    *[(m, n, k) for m in (128, 512, 2048, 8192)
                      for n, k in ((4096, 4096), (6144, 4096), (28672, 4096), (4096, 14336))]],
)  # fmt: skip
