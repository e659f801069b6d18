"""Linear layers: ``y = x @ weight.T + bias`` (``torch.nn.functional.linear``), with a CUDA C++
GEMV for the LLM decode case (M <= 16 rows of x), autograd, and the torch reference.

The GEMV reads the weight once, at the memory roofline: each warp streams 16-byte pieces of 8
or more rows of W and feeds them straight to the tensor cores (``mma.sync m16n8k16``, fp32
accumulation) with x as the other operand, so the same kernel serves every M up to 16. When N
alone gives too few blocks to spread W evenly over the SMs, K is split over blocks (split-K):
the last block of each N tile adds the fp32 partial sums in a fixed order (deterministic),
adds the bias and writes y, so one launch does the whole op. Larger M goes to torch's matmul
(cuBLAS), by design and without a fallback warning.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import cuda as kcuda
from .. import device
from ..dispatch import register_impl
from .common import arrival_counters, new_output, op_call, pdl, triton_reason, wants_grad

#: Most rows of x (the product of its leading dimensions) the GEMV takes; more go to torch.
MAX_M = 16
#: dtypes of the CUDA GEMV (tensor-core operands; accumulation is fp32).
GEMV_DTYPES = (torch.bfloat16, torch.float16)

GEMV_SOURCE = r"""
// Decode GEMV y[M, N] = x[M, K] @ W[N, K]^T (+ bias) for M <= 16, on the tensor cores.
//
// One warp owns KF_R tiles of 8 rows of W and a range of K. Each lane streams 16-byte pieces of
// W (lanes 4r..4r+3 read row r of a tile: 64 contiguous bytes per row per load) and feeds them
// to mma.sync m16n8k16 as the B operand, with x as the A operand (rows of x >= M are zero).
// A dot product does not care in which order k is summed, so a lane's 8 consecutive k of W are
// used as its B fragment for two mmas as they come, and x's A fragment is loaded with the same
// permutation: no shuffles or shared memory in the loop, fp32 accumulation in the tensor cores.
//
// Split-K inside a block (KF_WK > 1): its warps take slices of the block's K range and add
// their sums through shared memory. Split-K over blocks (gridDim.y > 1): each block writes
// fp32 partial sums; the last block of an N tile (an atomic counter, reset after use) adds
// them in split order (deterministic), adds the bias and writes y.
//
// Compile-time: KF_T (element type), KF_BF16 (1: bf16, 0: fp16), KF_MT (8 or 16: the rows of
// x the mma tile covers), KF_R (8-row tiles per warp), KF_U (16-byte loads in flight per lane
// and tile), KF_WN x KF_WK (warps per block: along N, and along K with their partial sums
// added through shared memory), KF_HINT (cache hint of W loads), KF_PIPE (1: load the
// next U pieces before using the current ones), KF_PDL (1: a programmatic dependent launch:
// blocks wait for the previous kernel before reading x or writing anything; requesting W, or
// prefetching it to L2, before that wait measured slower in the decode step), and the fusions
// of an LLM decoder layer (ops.fused_linear; 0 is off; no split-K over blocks with the first
// two):
//   KF_RMS: RMSNorm of x (weight nw); the outputs are scaled by rsqrt(mean(x^2) + eps) at the
//     end, x by nw (one packed multiply, rounded to KF_T) as it is read, with its squares
//     summed in fp32. 1: in the main loop (each lane its own fragments; the block sums over
//     its K slices). 2: in a prologue that writes x * nw to shared memory (dynamic, M x K)
//     in one round trip, issued after the first step's W loads, which hide it.
//   KF_GLU: SwiGLU. W's rows hold gate and up interleaved (row 2j gate j, 2j + 1 up j), so the
//     lane that computes output 2j also computes 2j + 1: y[m, j] = silu(g) * u, y [M, N / 2].
//   KF_RES: a residual added to the (rounded) result: y = round(y) + res, as torch adds.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#ifndef KF_HINT
#define KF_HINT 1
#endif
#ifndef KF_PIPE
#define KF_PIPE 0
#endif
#ifndef KF_PDL
#define KF_PDL 0
#endif
#ifndef KF_RMS
#define KF_RMS 0
#endif
#ifndef KF_GLU
#define KF_GLU 0
#endif
#ifndef KF_RES
#define KF_RES 0
#endif

__device__ __forceinline__ uint4 kf_ld_stream(const void* p) {
    // W is read once: keep it out of L1 (x lives there), ask L2 for whole 256-byte lines.
    uint4 v;
#if KF_HINT == 1
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
#elif KF_HINT == 2
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
#else
    v = __ldg(reinterpret_cast<const uint4*>(p));
#endif
    return v;
}

__device__ __forceinline__ uint4 kf_ld_x(const void* p) {
#if KF_RMS == 2
    return *reinterpret_cast<const uint4*>(p);  // x times the norm weight, in shared memory
#else
    return __ldg(reinterpret_cast<const uint4*>(p));
#endif
}

__device__ __forceinline__ void kf_mma(float (&c)[4], unsigned a0, unsigned a1, unsigned a2,
                                       unsigned a3, unsigned b0, unsigned b1) {
#if KF_BF16
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

__device__ __forceinline__ float kf_to_float(KF_T v) {
#if KF_BF16
    return __bfloat162float(v);
#else
    return __half2float(v);
#endif
}

__device__ __forceinline__ KF_T kf_from_float(float v) {
#if KF_BF16
    return __float2bfloat16_rn(v);
#else
    return __float2half_rn(v);
#endif
}

// Two packed elements as floats, and two floats rounded into a packed pair.
__device__ __forceinline__ float2 kf_unpack(unsigned v) {
#if KF_BF16
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v));
#else
    return __half22float2(*reinterpret_cast<const __half2*>(&v));
#endif
}

__device__ __forceinline__ unsigned kf_mul2(unsigned a, unsigned b) {
#if KF_BF16
    __nv_bfloat162 h = __hmul2(*reinterpret_cast<const __nv_bfloat162*>(&a),
                               *reinterpret_cast<const __nv_bfloat162*>(&b));
#else
    __half2 h = __hmul2(*reinterpret_cast<const __half2*>(&a),
                        *reinterpret_cast<const __half2*>(&b));
#endif
    return *reinterpret_cast<unsigned*>(&h);
}

// KF_RMS: add the squares of x's 8 elements to ss, then scale them by the norm weight's.
__device__ __forceinline__ void kf_norm_piece(uint4& x, const uint4& nw, float& ss) {
    unsigned* a = reinterpret_cast<unsigned*>(&x);
    const unsigned* b = reinterpret_cast<const unsigned*>(&nw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 f = kf_unpack(a[i]);
        ss = fmaf(f.x, f.x, fmaf(f.y, f.y, ss));
        a[i] = kf_mul2(a[i], b[i]);
    }
}

// Store one output, with the residual added (KF_RES) as torch adds two KF_T tensors.
__device__ __forceinline__ void kf_put(KF_T* __restrict__ y, const KF_T* __restrict__ res,
                                       size_t i, float v) {
#if KF_RES
    v = kf_to_float(kf_from_float(v)) + kf_to_float(res[i]);
#endif
    y[i] = kf_from_float(v);
}

// KF_RMS 2: the block's rows of x times the norm weight into shared memory (xs [M][K]), and
// each warp's sums of squares of its pieces of every row into ssw; one round trip to memory.
template <int MT, int WARPS>
__device__ __forceinline__ void kf_rms_prologue(const KF_T* __restrict__ x,
                                                const KF_T* __restrict__ nw, KF_T* xs,
                                                float (*ssw)[MT], int M, int K) {
    const int pieces = K / 8;
#pragma unroll
    for (int m = 0; m < MT; ++m) {
        if (m < M) {
            float ss = 0.f;
            for (int p = threadIdx.x; p < pieces; p += WARPS * 32) {
                uint4 v = __ldg(reinterpret_cast<const uint4*>(x + (size_t)m * K + p * 8));
                const uint4 g = __ldg(reinterpret_cast<const uint4*>(nw + p * 8));
                kf_norm_piece(v, g, ss);
                *reinterpret_cast<uint4*>(xs + (size_t)m * K + p * 8) = v;
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
            if ((threadIdx.x & 31) == 0) ssw[threadIdx.x >> 5][m] = ss;
        }
    }
    __syncthreads();
}

// One step: two mmas per 16-byte piece of W (k order permuted identically in x and W).
template <int R>
__device__ __forceinline__ void kf_step(float (&acc)[R][4], const uint4& xa, const uint4& xb,
                                        const uint4 (&w)[R]) {
#pragma unroll
    for (int t = 0; t < R; ++t) {
        kf_mma(acc[t], xa.x, xb.x, xa.y, xb.y, w[t].x, w[t].y);
        kf_mma(acc[t], xa.z, xb.z, xa.w, xb.w, w[t].z, w[t].w);
    }
}

extern "C" __global__ void __launch_bounds__(KF_WN * KF_WK * 32)
kf_gemv(const KF_T* __restrict__ x, const KF_T* __restrict__ w, const KF_T* __restrict__ bias,
        KF_T* __restrict__ y, float* __restrict__ partial, unsigned int* __restrict__ counters,
        int M, int N, int K, int kchunk, int has_bias, const KF_T* __restrict__ nw,
        const KF_T* __restrict__ res, float eps) {
    constexpr int R = KF_R, U = KF_U, MT = KF_MT, WN = KF_WN, WK = KF_WK;
    constexpr int NB = 8 * R * WN;  // rows of W per block
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int wn = warp % WN, wk = warp / WN;
    const int r = lane >> 2, q = lane & 3;
    const int n_warp = blockIdx.x * NB + wn * 8 * R;
    // This block's K range (split-K over blockIdx.y), then this warp's slice of it (over wk).
    const int kb_block = blockIdx.y * kchunk;
    const int ke_block = min(K, kb_block + kchunk);
    const int kslice = ((ke_block - kb_block + WK - 1) / WK + 31) / 32 * 32;
    const int k_begin = min(ke_block, kb_block + wk * kslice);
    const int k_end = min(ke_block, k_begin + kslice);

    // Rows past N read row N-1 (in bounds, never stored): no predicate in the hot loop.
    const KF_T* wrow[R];
#pragma unroll
    for (int t = 0; t < R; ++t)
        wrow[t] = w + (size_t)min(n_warp + 8 * t + r, N - 1) * K + q * 8;
    const bool has_a = r < M, has_b = MT > 8 && r + 8 < M;
#if KF_RMS == 2
    extern __shared__ uint4 kf_xs_raw[];
    KF_T* xs = reinterpret_cast<KF_T*>(kf_xs_raw);
    __shared__ float ssw[WN * WK][MT];
    const KF_T* xa_row = xs + (size_t)(has_a ? r : 0) * K + q * 8;
    const KF_T* xb_row = xs + (size_t)(has_b ? r + 8 : 0) * K + q * 8;
#else
    const KF_T* xa_row = x + (size_t)(has_a ? r : 0) * K + q * 8;
    const KF_T* xb_row = x + (size_t)(has_b ? r + 8 : 0) * K + q * 8;
#endif
    const uint4 zero = make_uint4(0, 0, 0, 0);
#if KF_RMS == 1
    const KF_T* nw_lane = nw + q * 8;  // the norm weight of this lane's k
    float ss_a = 0.f, ss_b = 0.f;      // sums of squares of x rows r and r + 8
#endif
#if KF_PDL
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;");
#endif

    float acc[R][4];
#pragma unroll
    for (int t = 0; t < R; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.f;

    int k = k_begin;
#if KF_RMS == 2
    {
        // The first step's W loads go out before the prologue: their round trip hides its own.
        uint4 w0[U][R];
        const bool first = k + 32 * U <= k_end;
        if (first) {
#pragma unroll
            for (int j = 0; j < U; ++j)
#pragma unroll
                for (int t = 0; t < R; ++t) w0[j][t] = kf_ld_stream(wrow[t] + k + 32 * j);
        }
        kf_rms_prologue<MT, WN * WK>(x, nw, xs, ssw, M, K);
        if (first) {
#pragma unroll
            for (int j = 0; j < U; ++j) {
                const uint4 xa = has_a ? kf_ld_x(xa_row + k + 32 * j) : zero;
                const uint4 xb = has_b ? kf_ld_x(xb_row + k + 32 * j) : zero;
                kf_step<R>(acc, xa, xb, w0[j]);
            }
            k += 32 * U;
        }
    }
#endif
#if KF_PIPE
    // Main loop, software-pipelined: the next U pieces per tile are loaded before the
    // current ones are used, so a warp always has loads in flight.
    uint4 wv[U][R];
    if (k + 32 * U <= k_end) {
#pragma unroll
        for (int j = 0; j < U; ++j)
#pragma unroll
            for (int t = 0; t < R; ++t) wv[j][t] = kf_ld_stream(wrow[t] + k + 32 * j);
    }
    for (; k + 32 * U <= k_end; k += 32 * U) {
        const bool more = k + 64 * U <= k_end;
        uint4 nx[U][R];
        if (more) {
#pragma unroll
            for (int j = 0; j < U; ++j)
#pragma unroll
                for (int t = 0; t < R; ++t) nx[j][t] = kf_ld_stream(wrow[t] + k + 32 * (U + j));
        }
        uint4 xa[U], xb[U];
#pragma unroll
        for (int j = 0; j < U; ++j) {
            xa[j] = has_a ? kf_ld_x(xa_row + k + 32 * j) : zero;
            xb[j] = has_b ? kf_ld_x(xb_row + k + 32 * j) : zero;
#if KF_RMS == 1
            const uint4 nv = kf_ld_x(nw_lane + k + 32 * j);
            kf_norm_piece(xa[j], nv, ss_a);
            if (MT > 8) kf_norm_piece(xb[j], nv, ss_b);
#endif
        }
#pragma unroll
        for (int j = 0; j < U; ++j) kf_step<R>(acc, xa[j], xb[j], wv[j]);
        if (more) {
#pragma unroll
            for (int j = 0; j < U; ++j)
#pragma unroll
                for (int t = 0; t < R; ++t) wv[j][t] = nx[j][t];
        }
    }
#else
    // Main loop: U pieces of 32 k per tile in flight per lane, all loads issued before use.
    for (; k + 32 * U <= k_end; k += 32 * U) {
        uint4 wv[U][R];
#pragma unroll
        for (int j = 0; j < U; ++j)
#pragma unroll
            for (int t = 0; t < R; ++t) wv[j][t] = kf_ld_stream(wrow[t] + k + 32 * j);
        uint4 xa[U], xb[U];
#pragma unroll
        for (int j = 0; j < U; ++j) {
            xa[j] = has_a ? kf_ld_x(xa_row + k + 32 * j) : zero;
            xb[j] = has_b ? kf_ld_x(xb_row + k + 32 * j) : zero;
#if KF_RMS == 1
            const uint4 nv = kf_ld_x(nw_lane + k + 32 * j);
            kf_norm_piece(xa[j], nv, ss_a);
            if (MT > 8) kf_norm_piece(xb[j], nv, ss_b);
#endif
        }
#pragma unroll
        for (int j = 0; j < U; ++j) kf_step<R>(acc, xa[j], xb[j], wv[j]);
    }
#endif
    // Tail: 32 k at a time; a lane whose 8 k lie past the end contributes zeros.
    for (; k < k_end; k += 32) {
        const bool in = k + q * 8 < k_end;
        uint4 wv[R];
#pragma unroll
        for (int t = 0; t < R; ++t) wv[t] = in ? kf_ld_stream(wrow[t] + k) : zero;
        uint4 xa = (in && has_a) ? kf_ld_x(xa_row + k) : zero;
        uint4 xb = (in && has_b) ? kf_ld_x(xb_row + k) : zero;
#if KF_RMS == 1
        const uint4 nv = in ? kf_ld_x(nw_lane + k) : zero;
        kf_norm_piece(xa, nv, ss_a);
        if (MT > 8) kf_norm_piece(xb, nv, ss_b);
#endif
        kf_step<R>(acc, xa, xb, wv);
    }

#if KF_RMS == 2
    float tot_a = 0.f, tot_b = 0.f;
#pragma unroll
    for (int s = 0; s < WN * WK; ++s) {  // warp order: the same sum every run
        tot_a += ssw[s][r];
        if (MT > 8) tot_b += ssw[s][r + 8];
    }
    const float rstd_a = rsqrtf(tot_a / (float)K + eps), rstd_b = rsqrtf(tot_b / (float)K + eps);
#elif KF_RMS == 1
    // The sums of squares: over the 4 lanes of a row, then over the block's K slices (in slice
    // order: the same sum every run), before any warp leaves.
    ss_a += __shfl_xor_sync(0xffffffffu, ss_a, 1);
    ss_a += __shfl_xor_sync(0xffffffffu, ss_a, 2);
    ss_b += __shfl_xor_sync(0xffffffffu, ss_b, 1);
    ss_b += __shfl_xor_sync(0xffffffffu, ss_b, 2);
    __shared__ float ssq[WK][2][8];
    if (wn == 0 && q == 0) {
        ssq[wk][0][r] = ss_a;
        ssq[wk][1][r] = ss_b;
    }
    __syncthreads();
    float tot_a = 0.f, tot_b = 0.f;
#pragma unroll
    for (int s = 0; s < WK; ++s) {
        tot_a += ssq[s][0][r];
        tot_b += ssq[s][1][r];
    }
    const float rstd_a = rsqrtf(tot_a / (float)K + eps), rstd_b = rsqrtf(tot_b / (float)K + eps);
#endif
    if (WK > 1) {
        // Sum the K slices of the block's warps through shared memory, in slice order.
        __shared__ float red[WK > 1 ? WK - 1 : 1][WN][R * 4][32];
        if (wk > 0) {
#pragma unroll
            for (int t = 0; t < R; ++t)
#pragma unroll
                for (int i = 0; i < 4; ++i) red[wk - 1][wn][t * 4 + i][lane] = acc[t][i];
        }
        __syncthreads();
        if (wk > 0) return;
#pragma unroll
        for (int s = 0; s < WK - 1; ++s)
#pragma unroll
            for (int t = 0; t < R; ++t)
#pragma unroll
                for (int i = 0; i < 4; ++i) acc[t][i] += red[s][wn][t * 4 + i][lane];
    }
    // acc[t][0..1]: y[r][n + 2q + {0,1}], acc[t][2..3]: y[r + 8][...], n = n_warp + 8t.
#if KF_RMS
#pragma unroll
    for (int t = 0; t < R; ++t) {
        acc[t][0] *= rstd_a;
        acc[t][1] *= rstd_a;
        acc[t][2] *= rstd_b;
        acc[t][3] *= rstd_b;
    }
#endif
    if (gridDim.y == 1) {
#if KF_GLU
#pragma unroll
        for (int t = 0; t < R; ++t)
#pragma unroll
            for (int h = 0; h < 2; ++h) {  // (acc[t][2h], acc[t][2h + 1]): gate j, up j of row m
                const int m = r + 8 * h, n = n_warp + 8 * t + 2 * q;  // N is even
                if (m < M && n < N) {
                    float g = acc[t][2 * h], u = acc[t][2 * h + 1];
                    if (has_bias) {
                        g += kf_to_float(bias[n]);
                        u += kf_to_float(bias[n + 1]);
                    }
                    g = kf_to_float(kf_from_float(g));  // rounded, as the unfused ops see them
                    u = kf_to_float(kf_from_float(u));
                    kf_put(y, res, (size_t)m * (N / 2) + n / 2, g / (1.f + __expf(-g)) * u);
                }
            }
#else
#pragma unroll
        for (int t = 0; t < R; ++t)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int m = r + (i >> 1) * 8, n = n_warp + 8 * t + 2 * q + (i & 1);
                if (m < M && n < N) {
                    float v = acc[t][i];
                    if (has_bias) v += kf_to_float(bias[n]);
                    kf_put(y, res, (size_t)m * N + n, v);
                }
            }
#endif
        return;
    }
#pragma unroll
    for (int t = 0; t < R; ++t)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int m = r + (i >> 1) * 8, n = n_warp + 8 * t + 2 * q + (i & 1);
            if (m < M && n < N) partial[((size_t)blockIdx.y * M + m) * N + n] = acc[t][i];
        }
    // Only the WN warps with wk == 0 are left: they synchronise on named barrier 1.
    __shared__ bool last;
    __threadfence();  // partials visible device-wide before the counter says so
    asm volatile("bar.sync 1, %0;" ::"r"(WN * 32));
    if (threadIdx.x == 0) last = atomicAdd(&counters[blockIdx.x], 1u) == gridDim.y - 1;
    asm volatile("bar.sync 1, %0;" ::"r"(WN * 32));
    if (!last) return;
    __threadfence();
    const int n0 = blockIdx.x * NB;
    for (int idx = threadIdx.x; idx < M * NB; idx += WN * 32) {
        const int m = idx / NB, n = n0 + idx % NB;
        if (n >= N) continue;
        float v = 0.f;
        for (int s = 0; s < (int)gridDim.y; ++s)  // split order: the same sum every run
            v += __ldcg(partial + ((size_t)s * M + m) * N + n);
        if (has_bias) v += kf_to_float(bias[n]);
        kf_put(y, res, (size_t)m * N + n, v);
    }
    if (threadIdx.x == 0) counters[blockIdx.x] = 0;  // ready for the next launch on this stream
}
"""


@dataclass(frozen=True)
class GemvConfig:
    """Launch shape of the GEMV kernel (compile-time constants of one cubin)."""

    r: int = 1  # 8-row tiles of W per warp: x fragments are reused across them
    u: int = 4  # 16-byte loads of W in flight per lane and tile
    wn: int = 1  # warps per block along N: a block owns 8 * r * wn rows of W
    wk: int = 8  # warps per block along K: slices of the block's K, summed in shared memory
    hint: int = 1  # W load: 1 = L1::no_allocate + L2::256B, 2 = L1::no_allocate, 0 = __ldg
    pipe: int = 0  # 1: software-pipelined main loop (next loads issued before the mmas)

    @property
    def rows(self) -> int:
        """Rows of W (outputs) per block."""
        return 8 * self.r * self.wn

    @property
    def warps(self) -> int:
        """Warps per block."""
        return self.wn * self.wk


@dataclass(frozen=True)
class GemvPlan:
    """One call's launch: the config, how K is split over blocks, the grid."""

    config: GemvConfig
    mt: int  # rows of x the mma tile covers: 8 (M <= 8) or 16
    splits: int
    kchunk: int
    grid: tuple[int, int]


#: The config for every shape. Measured on an H100 (benchmarks/gemv_sweep.py over 60 configs x
#: K splits at the 12 bar shapes; benchmarks/results/gemv.md): 8 warps on 8 rows of W, each
#: warp streaming its own eighth of K, came within 5% of the best config at every shape (the
#: spread between configs within 2-3% is run-to-run noise). Blocks that split K over warps
#: start their warps at different columns, spreading the reads over HBM channels; warps of
#: one block on different rows at the same column (wk=1) ran 5-25% slower.
DEFAULT = GemvConfig()
#: In an LLM decode step (a CUDA graph of GEMVs over weights read once each, no L2 flush
#: between them; benchmarks/results/gemv_decode.json, 20 Qwen2.5-1.5B / Llama-3-8B shapes at
#: M = 1 and 8) two loads in flight per tile came within 4% of the best of 40 configs at every
#: shape (geometric mean 0.99) and the config above within 0.94 (as low as 0.81 on the small
#: q/k/v and o projections): the decode config is the default for M <= 8.
DECODE = GemvConfig(u=2)
#: The config by mma tile height (8: M <= 8, 16: M <= 16), then per (N, K) overrides. For
#: M > 8 each lane reads two 16-byte pieces of x per piece of W: two loads of W in flight per
#: tile instead of four measured best there (benchmarks/gemv_final.py, harness timing).
DEFAULTS: dict[int, GemvConfig] = {8: DECODE, 16: GemvConfig(r=1, u=2, wn=1, wk=8)}
#: Per (N, K) overrides, measured in decode conditions (a CUDA graph of 28 distinct weights,
#: dependent launches, no split-K; benchmarks/results/gemv_decode_wk.md). Qwen2.5-1.5B's down
#: projection has only 192 blocks of 8 rows for 132 SMs: 16 warps per block (each streaming a
#: sixteenth of K) keep twice the loads in flight per SM, 12.0 us instead of 14.0 (M = 1, 8).
#: Its q/k/v (2048 x 1536) and o (1536 x 1536) projections, a K slice of six 16-byte pieces per
#: lane: all six loads in flight at once (one round trip to memory, not three) gave 650 tok/s
#: at batch 1 instead of 644 (benchmarks/results/fused_linear.md); three, 645.
TUNED: dict[tuple[int, int], GemvConfig] = {
    (1536, 8960): GemvConfig(u=2, wk=16),
    (2048, 1536): GemvConfig(u=6),
    (1536, 1536): GemvConfig(u=6),
}
#: Bytes one extra split costs beyond its partial sums (the last block's fix-up latency:
#: fence, counter, re-read of the partials; ~1.3 us at 3 TB/s).
SPLIT_OVERHEAD_BYTES = 4e6
#: Fewest K elements per split: shorter chunks spend more on set-up than on streaming.
MIN_KCHUNK = 256
#: Warps per SM that keep enough loads in flight to saturate HBM; fewer scale the rate down.
TARGET_WARPS = 16


@dataclass(frozen=True)
class Fusion:
    """The decoder-layer fusions a GEMV variant compiles in (KF_RMS, KF_GLU, KF_RES in the
    source): the RMSNorm of x, SwiGLU of interleaved gate/up rows, a residual add."""

    rms: int = 0  # 0: none, 1: in the main loop, 2: in a prologue (see norm_mode)
    glu: bool = False
    res: bool = False


NO_FUSION = Fusion()


def gemv_options(
    dtype: torch.dtype, mt: int, cfg: GemvConfig, pdl: bool = False, fusion: Fusion = NO_FUSION
) -> tuple[str, ...]:
    """NVRTC options (-D defines) of one GEMV variant."""
    bf16 = dtype == torch.bfloat16
    return (
        f"-DKF_T={'__nv_bfloat16' if bf16 else '__half'}",
        f"-DKF_BF16={int(bf16)}",
        f"-DKF_MT={mt}",
        f"-DKF_R={cfg.r}",
        f"-DKF_U={cfg.u}",
        f"-DKF_WN={cfg.wn}",
        f"-DKF_WK={cfg.wk}",
        f"-DKF_HINT={cfg.hint}",
        f"-DKF_PIPE={cfg.pipe}",
        f"-DKF_PDL={int(pdl)}",
        f"-DKF_RMS={int(fusion.rms)}",
        f"-DKF_GLU={int(fusion.glu)}",
        f"-DKF_RES={int(fusion.res)}",
    )


def gemv_kernel(
    dtype: torch.dtype,
    mt: int,
    cfg: GemvConfig,
    arch: str | None = None,
    pdl: bool = False,
    fusion: Fusion = NO_FUSION,
):
    """The compiled GEMV variant (cached in memory and on disk by kernforge.cuda)."""
    options = gemv_options(dtype, mt, cfg, pdl, fusion)
    return kcuda.compile(GEMV_SOURCE, "kf_gemv", arch=arch, options=options)


def _round_up(a: int, b: int) -> int:
    return -(-a // b) * b


def plan(m: int, n: int, k: int, sms: int, cfg: GemvConfig | None = None,
         splits: int | None = None, target_warps: int | None = None) -> GemvPlan:  # fmt: skip
    """Choose the config and the K split for an [m, k] x [n, k]^T product on ``sms`` SMs.

    Every block streams the same number of bytes, so when all blocks fit on the GPU at once
    the SM that gets the most sets the time: the split is the one that minimises
    ``W / (balance * fill) + split costs``, where balance is blocks / (sms * ceil(blocks / sms))
    (1 when there are more blocks than fit at once: the rest are handed out as SMs free up),
    fill is the fraction of TARGET_WARPS warps per SM that the grid provides, and a split
    costs its fp32 partial sums (written and read) plus a fixed fix-up latency.
    """
    mt = 8 if m <= 8 else 16
    cfg = cfg or TUNED.get((n, k), DEFAULTS[mt])
    n_blocks = -(-n // cfg.rows)
    step = 32 * cfg.u * cfg.wk

    def chunk(s: int) -> int:
        return min(_round_up(-(-k // s), step), _round_up(k, 8))

    if splits is None:
        best = (math.inf, 1)
        for s in range(1, 65):
            kc = chunk(s)
            if s > 1 and kc < MIN_KCHUNK:
                break
            real = -(-k // kc)
            if real != s:
                continue
            blocks = n_blocks * s
            # More blocks than fit at once are handed out as others finish: balanced enough.
            resident = sms * max(1, min(32, 64 // cfg.warps))
            balance = 1.0 if blocks >= resident else blocks / (sms * -(-blocks // sms))
            fill = min(1.0, blocks * cfg.warps / (sms * (target_warps or TARGET_WARPS)))
            cost = n * k * 2 / (balance * fill)
            if s > 1:
                cost += s * m * n * 8 + SPLIT_OVERHEAD_BYTES
            if cost < best[0]:
                best = (cost, s)
        splits = best[1]
    kc = chunk(max(1, splits))
    splits = -(-k // kc)
    return GemvPlan(cfg, mt, splits, kc, (n_blocks, splits))


def gemv(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
         out: torch.Tensor, p: GemvPlan | None = None, *, norm_weight: torch.Tensor | None = None,
         eps: float = 0.0, swiglu: bool = False, residual: torch.Tensor | None = None,
         norm_mode: int = 1) -> None:  # fmt: skip
    """Launch the GEMV: ``out[M, N] = x2[M, K] @ weight[N, K].T (+ bias)``, all contiguous;
    with the fusions of ``ops.fused_linear`` (``norm_weight``, ``swiglu``: out [M, N / 2],
    ``residual`` [M, N or N / 2]), which run without split-K."""
    m, k = x2.shape
    n = weight.shape[0]
    fusion = Fusion(norm_mode if norm_weight is not None else 0, swiglu, residual is not None)
    if fusion.rms or fusion.glu:  # they finish in the block that computed the outputs
        p = plan(m, n, k, 1, p.config if p else None, splits=1)
    p = p or plan(m, n, k, device.num_sms(x2.device.index or 0))
    counters = partial = None
    if p.splits > 1:
        counters = arrival_counters(x2.device, p.grid[0])
        if counters is None:
            p = plan(m, n, k, 1, p.config, splits=1)
        else:
            partial = torch.empty(p.splits * m * n, dtype=torch.float32, device=x2.device)
    dependent = pdl()
    kernel = gemv_kernel(x2.dtype, p.mt, p.config, pdl=dependent, fusion=fusion)
    smem = m * k * x2.element_size() if fusion.rms == 2 else 0
    kernel.launch(
        x2, weight, bias, out, partial, counters, m, n, k, p.kchunk, int(bias is not None),
        norm_weight, residual, float(eps), grid=p.grid, block=32 * p.config.warps,
        shared_mem=smem, pdl=dependent,
    )  # fmt: skip


def _out_shape(x: torch.Tensor, weight: torch.Tensor) -> tuple[int, ...]:
    return (*x.shape[:-1], weight.shape[0])


def _rows16(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous and 16-byte aligned (the GEMV reads it in 16-byte pieces)."""
    if not t.is_contiguous():
        return t.contiguous()
    return t.clone() if t.data_ptr() % 16 else t


@torch.library.custom_op("kernforge::linear_gemv", mutates_args=())
def linear_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """CUDA GEMV ``x @ weight.T + bias`` for x [..., K] of at most MAX_M rows."""
    k = x.shape[-1]
    if weight.data_ptr() % 16:
        # A view that starts mid-row of its storage: W cannot be read in 16-byte pieces.
        return F.linear(x, weight, bias)
    x2 = _rows16(x.reshape(-1, k))
    out = new_output(_out_shape(x, weight), x.dtype, x.device)
    if out.numel():
        b = None if bias is None else bias.contiguous()
        gemv(x2, weight, b, out.view(-1, weight.shape[0]))
    return out


@linear_gemv.register_fake
def _(x, weight, bias):
    return torch.empty(_out_shape(x, weight), dtype=x.dtype, device=x.device)


class LinearFunction(torch.autograd.Function):
    """Autograd for the GEMV forward; the backward is two torch matmuls (and a bias sum)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return op_call(linear_gemv, x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        dy2 = dy.reshape(-1, weight.shape[0])
        dx = (dy2 @ weight).view(x.shape) if need[0] else None
        dw = dy2.t() @ x.reshape(-1, x.shape[-1]) if need[1] else None
        db = dy2.sum(0) if ctx.has_bias and need[2] else None
        return dx, dw, db


def rows_of(x: torch.Tensor) -> int:
    """M: the rows of x, the product of its leading dimensions."""
    return math.prod(x.shape[:-1])


def _supports_cuda(x, weight, bias=None):
    if x.device.type != "cuda":
        return f"inputs are on {x.device}; the CUDA GEMV runs on CUDA tensors"
    # Under torch.compile the tensors are fake, and CUDA tensors mean a GPU: only NVRTC and
    # cuda-bindings remain to check, done eagerly on the first real call.
    reason = None if torch.compiler.is_compiling() else kcuda.available()
    if reason is not None:
        return reason
    if rows_of(x) > MAX_M:
        return None  # accepted: routed to torch's matmul (cuBLAS GEMM), the designed path
    if x.dtype not in GEMV_DTYPES:
        return f"dtype {x.dtype} (the CUDA GEMV takes bfloat16 and float16)"
    k = x.shape[-1]
    if k % 8:
        return f"K={k} is not a multiple of 8 (the GEMV reads W in 16-byte pieces)"
    if not weight.is_contiguous():
        return "weight is not contiguous (the GEMV streams its rows; pass weight.contiguous())"
    return None


@register_impl("linear", "cuda", supports=_supports_cuda)
def linear_cuda(x, weight, bias=None):
    """CUDA GEMV for M <= 16 rows; torch's matmul (cuBLAS) above, or when empty."""
    if rows_of(x) > MAX_M or x.numel() == 0 or weight.shape[0] == 0:
        return F.linear(x, weight, bias)
    if not wants_grad(x, weight, bias):
        return op_call(linear_gemv, x, weight, bias)
    return LinearFunction.apply(x, weight, bias)


@register_impl("linear", "torch")
def linear_torch(x, weight, bias=None):
    """Reference: ``torch.nn.functional.linear``."""
    return F.linear(x, weight, bias)


# --- fused_linear: the norm, SwiGLU and residual add of a decoder layer around the GEMV ---------


def _fused_out_shape(x: torch.Tensor, weight: torch.Tensor, swiglu: bool) -> tuple[int, ...]:
    return (*x.shape[:-1], weight.shape[0] // 2 if swiglu else weight.shape[0])


@torch.library.custom_op("kernforge::fused_linear_gemv", mutates_args=())
def fused_linear_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      norm_weight: torch.Tensor | None, eps: float, swiglu: bool,
                      residual: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    """One CUDA GEMV launch of ``ops.fused_linear`` for x [..., K] of at most MAX_M rows."""
    if weight.data_ptr() % 16:
        # A view that starts mid-row of its storage: W cannot be read in 16-byte pieces.
        return _fused_linear_ops(x, weight, bias, norm_weight, eps, swiglu, residual)
    x2 = _rows16(x.reshape(-1, x.shape[-1]))
    m = x2.shape[0]
    mode = 0 if norm_weight is None else norm_mode(m, weight.shape[0], x2)
    if norm_weight is not None and mode == 0:
        from .. import ops

        x2, norm_weight = ops.rms_norm(x2, norm_weight, eps), None
    out = new_output(_fused_out_shape(x, weight, swiglu), x.dtype, x.device)
    gemv(x2, weight, None if bias is None else bias.contiguous(), out.view(m, -1),
         norm_weight=None if norm_weight is None else _rows16(norm_weight), eps=eps, norm_mode=mode,
         swiglu=swiglu,
         residual=None if residual is None else residual.reshape(m, -1).contiguous())  # fmt: skip
    return out


@fused_linear_gemv.register_fake
def _(x, weight, bias, norm_weight, eps, swiglu, residual):
    return x.new_empty(_fused_out_shape(x, weight, swiglu))


def norm_mode(m: int, n: int, x2: torch.Tensor) -> int:
    """Where ``fused_linear``'s GEMV of x2 [m, K] and n outputs runs the RMSNorm (its KF_RMS):
    1 in the loop, when the blocks keep the plain kernel's occupancy or all fit at once; else 2
    in a prologue, for one row and at most PROLOGUE_MAX_WAVES waves of blocks; else 0, meaning
    ``ops.rms_norm`` runs first.

    Both fused forms save the norm's launch but hold more registers (8 warps of the M <= 8
    kernel: 48 instead of 40, five blocks per SM instead of six: fewer loads of W in flight).
    The in-loop form also adds work to every step; the prologue adds one round trip per block,
    hidden behind the block's first loads of W. Measured on an H100 in a decode-like CUDA
    graph (benchmarks/results/fused_linear.md), M = 1, against the norm kernel then the GEMV:
    - Qwen2.5-1.5B's q/k/v (256 blocks): in the loop 4.8 us instead of 5.9.
    - Its gate/up (2240 blocks, 4 waves): the prologue 21.8 instead of 22.4. In the loop: 24.5.
    - Its head (18992 blocks): the prologue 155.5 instead of 153.0. In the loop: 171.
    - At M = 8 the prologue's rows take turns: gate/up 33 us.
    """
    index = x2.device.index if x2.device.index is not None else torch.cuda.current_device()
    return _norm_mode(m, n, x2.shape[1], x2.dtype, index, pdl())


@functools.cache
def _norm_mode(m: int, n: int, k: int, dtype: torch.dtype, index: int, dependent: bool) -> int:
    p = plan(m, n, k, 1, splits=1)
    threads = 32 * p.config.warps
    plain = resident_blocks(gemv_kernel(dtype, p.mt, p.config, pdl=dependent), threads, index)
    for mode in (1, 2):
        fused = gemv_kernel(dtype, p.mt, p.config, pdl=dependent, fusion=Fusion(rms=mode))
        fits = resident_blocks(fused, threads, index)
        if mode == 1 and fits >= min(p.grid[0], plain):
            return 1
        if mode == 2 and m == 1 and p.grid[0] <= PROLOGUE_MAX_WAVES * fits:
            return 2
    return 0


#: Most waves of blocks (grid / resident blocks) for the prologue form (see norm_mode).
PROLOGUE_MAX_WAVES = 4


#: Registers and shared memory of an SM on Hopper (and Ampere's A100: the same register file).
REGS_PER_SM = 65536
SMEM_PER_SM = 228 * 1024


@functools.cache
def resident_blocks(kernel, threads: int, index: int) -> int:
    """Blocks of ``kernel`` (``threads`` each) that fit on GPU ``index`` at once: the registers,
    threads and shared memory of an SM, times its SMs."""
    a = kernel.attributes(index)
    regs_warp = -(-a["num_regs"] * 32 // 256) * 256  # allocated per warp, 256 at a time
    by_regs = REGS_PER_SM // (threads // 32 * regs_warp)
    by_smem = SMEM_PER_SM // (a["shared_size_bytes"] + 1024)  # 1 KiB reserved per block
    return device.num_sms(index) * max(1, min(by_regs, 2048 // threads, by_smem, 32))


def _fused_linear_ops(x, weight, bias, norm_weight, eps, swiglu, residual):
    """The unfused sequence: ``ops.rms_norm``, torch's linear (cuBLAS on the GPU: these are the
    calls of more than 16 rows, or with autograd), ``ops.swiglu`` of the strided gate/up
    columns, the residual add. A residual alone is added by the GEMM itself (``addmm``: one
    launch, the sum rounded once) instead of by a separate add kernel."""
    from .. import ops

    if norm_weight is not None:
        x = ops.rms_norm(x, norm_weight, eps)
    if residual is not None and bias is None and not swiglu:
        n = weight.shape[0]
        y = torch.addmm(residual.reshape(-1, n), x.reshape(-1, x.shape[-1]), weight.t())
        return y.view(*x.shape[:-1], n)
    y = F.linear(x, weight, bias)
    if swiglu:
        y = ops.swiglu(y[..., 0::2], y[..., 1::2])
    return y if residual is None else y + residual


def _gemv_runs(x, weight, bias, norm_weight, residual) -> bool:
    """Whether ``fused_linear`` on the CUDA backend runs as one GEMV launch."""
    return (
        _supports_cuda(x, weight, bias) is None
        and 0 < rows_of(x) <= MAX_M
        and weight.shape[0] > 0
        and not wants_grad(x, weight, bias, norm_weight, residual)
    )


def _supports_fused_cuda(x, weight, bias=None, norm_weight=None, eps=1e-6, swiglu=False,
                         residual=None):  # fmt: skip
    return _supports_cuda(x, weight, bias)


def _supports_fused_triton(x, weight, bias=None, norm_weight=None, eps=1e-6, swiglu=False,
                           residual=None):  # fmt: skip
    if _gemv_runs(x, weight, bias, norm_weight, residual):
        return "the CUDA GEMV runs it in one launch (backend 'cuda')"
    return triton_reason(x, weight, norm_weight)


@register_impl("fused_linear", "cuda", supports=_supports_fused_cuda)
def fused_linear_cuda(x, weight, bias=None, norm_weight=None, eps=1e-6, swiglu=False,
                      residual=None):  # fmt: skip
    """One CUDA GEMV launch for at most 16 rows without autograd; the unfused ops otherwise."""
    if not _gemv_runs(x, weight, bias, norm_weight, residual):
        return _fused_linear_ops(x, weight, bias, norm_weight, eps, swiglu, residual)
    return op_call(fused_linear_gemv, x, weight, bias, norm_weight, eps, swiglu, residual)


@register_impl("fused_linear", "triton", supports=_supports_fused_triton)
def fused_linear_triton(x, weight, bias=None, norm_weight=None, eps=1e-6, swiglu=False,
                        residual=None):  # fmt: skip
    """The unfused ops (the Triton norm and SwiGLU, torch's linear between them): what runs
    where the one-launch GEMV does not (more than 16 rows, autograd, the CPU interpreter)."""
    return _fused_linear_ops(x, weight, bias, norm_weight, eps, swiglu, residual)


@register_impl("fused_linear", "torch")
def fused_linear_torch(x, weight, bias=None, norm_weight=None, eps=1e-6, swiglu=False,
                       residual=None):  # fmt: skip
    """Reference: rms_norm (fp32 statistics), ``F.linear``, ``silu(gate) * up``, the add."""
    if norm_weight is not None:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        x = xf.to(x.dtype) * norm_weight
    y = F.linear(x, weight, bias)
    if swiglu:
        y = F.silu(y[..., 0::2]) * y[..., 1::2]
    return y if residual is None else y + residual


@functools.cache
def shipped_variants() -> tuple[tuple[torch.dtype, int, GemvConfig], ...]:
    """Every (dtype, mt, config) the dispatcher can launch: what CI compiles for each arch."""
    cfgs = sorted({*DEFAULTS.values(), *TUNED.values()}, key=repr)
    return tuple((d, mt, c) for d in GEMV_DTYPES for mt in (8, 16) for c in cfgs)
