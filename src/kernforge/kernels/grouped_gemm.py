"""Grouped GEMM for mixture-of-experts layers: ``y[rows of g] = x[rows of g] @ weight[g].T
(+ bias[g])`` for every group ``g`` in one Triton launch, with its backward, and the torch
reference (a loop over groups).

``x`` [T, K] holds the rows of all groups one after another (tokens sorted by expert),
``group_sizes`` [G] says how many rows each group has (groups may be empty), ``weight`` is
[G, N, K] (``nn.Linear`` layout per group; a [G, K, N] tensor passed as ``.transpose(1, 2)``
works without a copy), ``bias`` [G, N] or None.

How the kernel schedules work without asking the host: every program loads ``group_sizes``
(a vector of G values), turns it into row starts and per-group tile counts with a prefix sum
in registers, and walks the tiles ``pid, pid + programs, ...`` of that device-built
schedule, finding each tile's group with a vector compare. No host sync, so the op can be
captured in a CUDA graph; sizes are clamped in the kernel (rows never past T), so bad sizes
give wrong numbers rather than out-of-bounds memory accesses.

Memory: on Hopper (and under the CPU interpreter, so CI covers it) operands move by TMA.
Rows of one group are read and written through "ragged" tensor descriptors (the trick of
``triton.tools.ragged_tma``: two extra leading dimensions whose strides wrap around the
64-bit address space) so that the hardware bounds check cuts every tile at its group's
last row: loads past it read zeros and stores past it are dropped. The weight is a 3-D
descriptor [G, N, K] (or [G, K, N] for a transposed view). Shapes TMA cannot take (strides
that are not 16-byte multiples, other GPUs) use a pointer kernel with masks instead.

Backward: ``dx = grouped_gemm(dy, weight^T)`` (the same kernel, weight read transposed in
place); ``dW[g] = dy_g^T @ x_g`` by a second kernel with one program per (group, output
tile), each reducing over its group's rows (empty groups get zeros); ``dbias[g]`` = the
column sums of ``dy_g`` by a third, small kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .. import device, tune
from ..dispatch import register_impl
from .common import new_output, op_call, tile_order

#: dtypes of the Triton kernels (fp32 accumulation; output in the input dtype).
DTYPES = (torch.float16, torch.bfloat16)
#: Row dimension of the ragged descriptors (triton.tools.ragged_tma's constant), and the size
#: of their two leading wrap-around dimensions.
BILLION = 0x40000000
_BILLION = tl.constexpr(BILLION)
_MAX_INT = 0x7FFF0000


# ------------------------------------------------------------------------------ Triton


@triton.jit
def _group_bounds(SIZES, G, T, BLOCK_G: tl.constexpr):
    """(group index vector, row starts, row counts) of every group, clamped to [0, T]."""
    gi = tl.arange(0, BLOCK_G)
    sizes = tl.load(SIZES + gi, mask=gi < G, other=0).to(tl.int64)
    sizes = tl.minimum(tl.maximum(sizes, 0), T)
    ends = tl.cumsum(sizes, 0)
    starts = tl.minimum(ends - sizes, T).to(tl.int32)
    ends = tl.minimum(ends, T).to(tl.int32)
    return gi, starts, ends - starts


@triton.jit
def _pick(sel, values):
    """The element of ``values`` where ``sel`` (one-hot) is true."""
    return tl.sum(tl.where(sel, values, 0), 0)


@triton.jit
def _grouped_fwd_kernel(
    X, W, Y, BIAS, SIZES, x_desc, w_desc, y_desc,
    T, N, K, G,
    stride_xt, stride_xk, stride_wg, stride_wn, stride_wk, stride_yt, stride_bg,
    num_programs,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_G: tl.constexpr, GROUP_M: tl.constexpr,
    USE_TMA: tl.constexpr, RAGGED: tl.constexpr, W_KMAJOR: tl.constexpr,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
    FLATTEN: tl.constexpr, EPILOGUE_SUBTILE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    gi, starts, sizes = _group_bounds(SIZES, G, T, BLOCK_G)
    m_tiles = (sizes + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(m_tiles, 0) * tiles_n  # first tile past each group
    total = tl.sum(m_tiles, 0) * tiles_n
    for tile in tl.range(pid, total, num_programs, flatten=FLATTEN,
                         warp_specialize=WARP_SPECIALIZE):  # fmt: skip
        # The group of this tile: the number of groups that end at or before it.
        g = tl.sum((tile_end <= tile).to(tl.int32), 0)
        sel = gi == g
        g_mt = _pick(sel, m_tiles)
        row0 = _pick(sel, starts)
        rows = _pick(sel, sizes)
        local = tile - (_pick(sel, tile_end) - g_mt * tiles_n)
        pid_m, pid_n = tile_order(local, g_mt, tiles_n, GROUP_M)
        m0 = pid_m * BLOCK_M
        n0 = pid_n * BLOCK_N
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kk in range(k_tiles):
            k0 = kk * BLOCK_K
            if USE_TMA:
                if RAGGED:  # rows past the group's end read as zeros
                    a = x_desc.load([_BILLION, row0 + rows, _BILLION - rows + m0, k0])
                    a = tl.reshape(a, (BLOCK_M, BLOCK_K))
                else:  # rows past the group's end belong to the next group: never stored
                    a = x_desc.load([row0 + m0, k0])
                if W_KMAJOR:
                    b = tl.reshape(w_desc.load([g, n0, k0]), (BLOCK_N, BLOCK_K)).T
                else:
                    b = tl.reshape(w_desc.load([g, k0, n0]), (BLOCK_K, BLOCK_N))
            else:
                offs_k = k0 + tl.arange(0, BLOCK_K)
                kmask = offs_k < K
                xrow = (row0 + offs_m).to(tl.int64)
                a = tl.load(
                    X + xrow[:, None] * stride_xt + offs_k[None, :] * stride_xk,
                    mask=(offs_m < rows)[:, None] & kmask[None, :], other=0.0,
                )  # fmt: skip
                b = tl.load(
                    W + g.to(tl.int64) * stride_wg + offs_k[:, None] * stride_wk
                    + offs_n[None, :].to(tl.int64) * stride_wn,
                    mask=kmask[:, None] & (offs_n < N)[None, :], other=0.0,
                )  # fmt: skip
            if UPCAST:  # the interpreter multiplies bf16 as raw bits: upcast first
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc)
        if HAS_BIAS:
            bias = tl.load(BIAS + g * stride_bg + offs_n, mask=offs_n < N, other=0.0)
            acc += bias.to(tl.float32)[None, :]
        out_ty = Y.dtype.element_ty
        if USE_TMA and RAGGED:  # stores past the group's last row are dropped
            coords = [_BILLION, row0 + rows, _BILLION - rows + m0, n0]
            if EPILOGUE_SUBTILE:  # two half-width stores: half the epilogue's shared memory
                halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
                acc0, acc1 = tl.split(halves)
                # (the shape is spelled out: a tuple bound to a name is not constexpr there)
                y_desc.store(coords, tl.reshape(acc0.to(out_ty), (1, 1, BLOCK_M, BLOCK_N // 2)))
                coords1 = [_BILLION, row0 + rows, _BILLION - rows + m0, n0 + BLOCK_N // 2]
                y_desc.store(coords1, tl.reshape(acc1.to(out_ty), (1, 1, BLOCK_M, BLOCK_N // 2)))
            else:
                y_desc.store(coords, tl.reshape(acc.to(out_ty), (1, 1, BLOCK_M, BLOCK_N)))
        else:
            out = acc.to(out_ty)
            yrow = (row0 + offs_m).to(tl.int64)
            tl.store(
                Y + yrow[:, None] * stride_yt + offs_n[None, :],
                out, mask=(offs_m < rows)[:, None] & (offs_n < N)[None, :],
            )  # fmt: skip


@triton.jit
def _grouped_dw_kernel(
    A, B, C, SIZES, a_desc, b_desc, c_desc,
    T, P, Q, G,
    stride_at, stride_ap, stride_bt, stride_bq, stride_cg, stride_cp, stride_cq,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_G: tl.constexpr, USE_TMA: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """C[g] = A_g^T @ B_g over the rows of group g: A [T, P], B [T, Q], C [G, P, Q]."""
    pid = tl.program_id(0)
    tiles_p = tl.cdiv(P, BLOCK_P)
    tiles_q = tl.cdiv(Q, BLOCK_Q)
    per_group = tiles_p * tiles_q
    g = pid // per_group
    local = pid - g * per_group
    p0 = (local // tiles_q) * BLOCK_P
    q0 = (local % tiles_q) * BLOCK_Q
    gi, starts, sizes = _group_bounds(SIZES, G, T, BLOCK_G)
    sel = gi == g
    row0 = _pick(sel, starts)
    rows = _pick(sel, sizes)
    offs_p = p0 + tl.arange(0, BLOCK_P)
    offs_q = q0 + tl.arange(0, BLOCK_Q)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for r0 in range(0, rows, BLOCK_R):
        if USE_TMA:  # rows past the group's end read as zeros
            coords_r = _BILLION - rows + r0
            a = tl.reshape(a_desc.load([_BILLION, row0 + rows, coords_r, p0]), (BLOCK_R, BLOCK_P))
            b = tl.reshape(b_desc.load([_BILLION, row0 + rows, coords_r, q0]), (BLOCK_R, BLOCK_Q))
        else:
            offs_r = r0 + tl.arange(0, BLOCK_R)
            rmask = offs_r < rows
            trow = (row0 + offs_r).to(tl.int64)
            a = tl.load(
                A + trow[:, None] * stride_at + offs_p[None, :] * stride_ap,
                mask=rmask[:, None] & (offs_p < P)[None, :], other=0.0,
            )  # fmt: skip
            b = tl.load(
                B + trow[:, None] * stride_bt + offs_q[None, :] * stride_bq,
                mask=rmask[:, None] & (offs_q < Q)[None, :], other=0.0,
            )  # fmt: skip
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a.T, b, acc)
    out = acc.to(C.dtype.element_ty)
    if USE_TMA:
        c_desc.store([g, p0, q0], tl.reshape(out, (1, BLOCK_P, BLOCK_Q)))
    else:
        tl.store(
            C + g.to(tl.int64) * stride_cg + offs_p[:, None] * stride_cp
            + offs_q[None, :] * stride_cq,
            out, mask=(offs_p < P)[:, None] & (offs_q < Q)[None, :],
        )  # fmt: skip


@triton.jit
def _grouped_dbias_kernel(
    DY, DB, SIZES, T, N, G, stride_dyt, stride_dbg,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
):  # fmt: skip
    """DB[g] = the column sums of DY over the rows of group g (fp32 sums)."""
    g = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    gi, starts, sizes = _group_bounds(SIZES, G, T, BLOCK_G)
    sel = gi == g
    row0 = _pick(sel, starts)
    rows = _pick(sel, sizes)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(0, rows, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        trow = (row0 + offs_r).to(tl.int64)
        tile = tl.load(
            DY + trow[:, None] * stride_dyt + offs_n[None, :],
            mask=(offs_r < rows)[:, None] & nmask[None, :], other=0.0,
        )  # fmt: skip
        acc += tl.sum(tile.to(tl.float32), 0)
    tl.store(DB + g * stride_dbg + offs_n, acc.to(DB.dtype.element_ty), mask=nmask)


# ------------------------------------------------------------------------------ configs


@dataclass(frozen=True)
class GroupedConfig:
    """Launch config of the forward (and dx) kernel.

    ``programs_per_sm``: persistent programs per SM, each walking the tile schedule; 0 means
    one program per tile (an upper bound of the tile count: the schedule is only known on the
    device), which lets the hardware balance uneven groups. ``ragged``: on the TMA path, read
    x and write y through ragged descriptors (False: a plain 2-D descriptor for x and masked
    pointer stores for y).
    """

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3
    programs_per_sm: int = 1
    ragged: bool = True
    warp_specialize: bool = False
    flatten: bool = False  # software-pipeline across tiles (the next tile's loads early)
    epilogue_subtile: bool = False  # store y in two halves (frees shared memory for stages)


@dataclass(frozen=True)
class GroupedDwConfig:
    """Launch config of the weight-gradient kernel: a (block_p x block_q) tile of dW[g] per
    program, reducing over the group's rows block_r at a time."""

    block_p: int
    block_q: int
    block_r: int
    num_warps: int = 8
    num_stages: int = 3


#: Hopper candidates, measured by the tuner on first use of a shape bucket. Sweeps on an H100
#: (benchmarks/sweep_fp8_grouped.py, bf16, the Mixtral and Qwen-MoE shapes; results in
#: benchmarks/results/fp8_grouped.*.json): every 128x256x64 / 8-warp variant below lands within
#: the run-to-run spread (~5-10%) of the best, 630-690 TFLOP/s at Mixtral, 560-640 at Qwen-MoE
#: (flattened loops won two of four tuner runs); 128x128 tiles lose 5-20%, 64x128 ~35% (kept
#: for groups of few rows); warp specialization (Triton 3.6 on Hopper) gained nothing
#: (651 vs 657) and is not offered.
FWD_CONFIGS = [
    GroupedConfig(128, 256, 64, num_warps=8, num_stages=3),
    GroupedConfig(128, 256, 64, num_warps=8, num_stages=3, programs_per_sm=0),
    GroupedConfig(128, 256, 64, num_warps=8, num_stages=3, ragged=False),
    GroupedConfig(128, 256, 64, num_warps=8, num_stages=4, epilogue_subtile=True),
    GroupedConfig(128, 256, 64, num_warps=8, num_stages=3, flatten=True),
    GroupedConfig(128, 256, 64, group_m=16, num_warps=8, num_stages=3),
    GroupedConfig(128, 128, 64, num_warps=4, num_stages=4),
    GroupedConfig(64, 128, 64, num_warps=4, num_stages=4),  # few rows per group (decode)
]
#: Used without tuning (KERNFORGE_TUNE=off, or a key not yet measured while tuning is off).
FWD_DEFAULT = FWD_CONFIGS[0]
FWD_DEFAULT_SMALL_N = GroupedConfig(128, 128, 64, num_warps=4, num_stages=4)
#: Under the interpreter programs run one after another: small tiles, few programs.
FWD_INTERPRET = GroupedConfig(16, 32, 32, group_m=2, num_warps=4, num_stages=1)

#: Measured (same sweep): 128x256 output tiles win at both shapes (575 TFLOP/s; 128x128:
#: 470-535, 64x128: 345).
DW_CONFIGS = [
    GroupedDwConfig(128, 256, 64, num_warps=8, num_stages=3),
    GroupedDwConfig(128, 128, 64, num_warps=8, num_stages=3),
    GroupedDwConfig(128, 256, 64, num_warps=8, num_stages=4),
    GroupedDwConfig(128, 128, 32, num_warps=4, num_stages=4),
    GroupedDwConfig(128, 128, 64, num_warps=4, num_stages=4),
]
DW_DEFAULT = DW_CONFIGS[0]
DW_INTERPRET = GroupedDwConfig(32, 16, 16, num_warps=4, num_stages=1)

FWD_TUNER = tune.Tuner("grouped_gemm", configs=FWD_CONFIGS, version="2")
DW_TUNER = tune.Tuner("grouped_gemm_dw", configs=DW_CONFIGS, version="2")

#: Tests set this to False to run the pointer kernels where TMA would be used.
ALLOW_TMA = True


# ------------------------------------------------------------------------------ launch


def _block_g(g: int) -> int:
    return triton.next_power_of_2(max(g, 2))


def _tma_ok(*tensors: torch.Tensor) -> bool:
    """TMA can address these tensors: last stride 1, other strides and base 16-byte aligned."""
    if not ALLOW_TMA:
        return False
    if not device.INTERPRET:
        cap = device.capability()
        if cap is None or cap[0] < 9:
            return False
    for t in tensors:
        es = t.element_size()
        if t.numel() == 0 or t.stride(-1) != 1 or t.data_ptr() % 16:
            return False
        if any((s * es) % 16 for s in t.stride()[:-1]):
            return False
    return True


def _ragged(t: torch.Tensor, block: list[int]) -> TensorDescriptor:
    """A ragged descriptor over the rows of 2-D ``t`` (see the module docs)."""
    rs = t.stride(0)
    shape = [_MAX_INT, _MAX_INT, BILLION, t.shape[1]]
    strides = [2**34 - rs, rs, rs, 1]
    return TensorDescriptor(t, shape, strides, [1, 1, *block])


def _weight_kmajor(weight: torch.Tensor) -> bool | None:
    """True when weight [G, N, K] is K-contiguous, False when N-contiguous (a transposed
    [G, K, N] tensor), None for other layouts (those are copied)."""
    if weight.stride(2) == 1:
        return True
    if weight.stride(1) == 1:
        return False
    return None


def _programs(cfg: GroupedConfig, upper_tiles: int) -> int:
    if cfg.programs_per_sm <= 0:
        return max(1, upper_tiles)
    return max(1, min(upper_tiles, cfg.programs_per_sm * device.num_sms()))


def _launch_fwd(x, weight, group_sizes, bias, y, cfg: GroupedConfig, use_tma: bool, kmajor: bool):
    t, k = x.shape
    g, n, _ = weight.shape
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    upper = (triton.cdiv(t, bm) + g) * triton.cdiv(n, bn)  # m-tiles <= T / bm + one per group
    ragged = use_tma and cfg.ragged
    x_desc = w_desc = y_desc = None
    if use_tma:
        x_desc = _ragged(x, [bm, bk]) if ragged else TensorDescriptor.from_tensor(x, [bm, bk])
        if kmajor:
            w_desc = TensorDescriptor(weight, [g, n, k], list(weight.stride()), [1, bn, bk])
        else:
            sg, sn, sk = weight.stride()
            w_desc = TensorDescriptor(weight, [g, k, n], [sg, sk, sn], [1, bk, bn])
        if ragged:
            y_desc = _ragged(y, [bm, bn // 2 if cfg.epilogue_subtile else bn])
    _grouped_fwd_kernel[(_programs(cfg, upper),)](
        x, weight, y, bias, group_sizes, x_desc, w_desc, y_desc,
        t, n, k, g,
        x.stride(0), x.stride(1), *weight.stride(), y.stride(0),
        bias.stride(0) if bias is not None else 0,
        _programs(cfg, upper),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_G=_block_g(g), GROUP_M=cfg.group_m,
        USE_TMA=use_tma, RAGGED=ragged, W_KMAJOR=kmajor, HAS_BIAS=bias is not None,
        UPCAST=device.INTERPRET, WARP_SPECIALIZE=cfg.warp_specialize, FLATTEN=cfg.flatten,
        EPILOGUE_SUBTILE=cfg.epilogue_subtile,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def grouped_forward(x, weight, group_sizes, bias):
    """``y`` [T, N] of the grouped GEMM (no autograd): picks the layout path and config."""
    t, k = x.shape
    g, n, _ = weight.shape
    y = new_output((t, n), x.dtype, x.device)
    if t == 0 or n == 0:
        return y
    if x.stride(-1) != 1:
        x = x.contiguous()
    kmajor = _weight_kmajor(weight)
    if kmajor is None:  # neither K nor N contiguous: one copy into the nn.Linear layout
        weight, kmajor = weight.contiguous(), True
    if bias is not None and bias.stride(-1) != 1:
        bias = bias.contiguous()
    sizes = group_sizes if group_sizes.is_contiguous() else group_sizes.contiguous()
    use_tma = k > 0 and _tma_ok(x, weight if kmajor else weight.transpose(1, 2), y)
    if device.INTERPRET:
        cfg = FWD_INTERPRET
    else:
        default = FWD_DEFAULT if n > 128 else FWD_DEFAULT_SMALL_N
        key = ("fwd", tune.bucket(t), n, k, g, _dtype_name(x.dtype), kmajor, use_tma)

        def run(c: GroupedConfig) -> None:
            _launch_fwd(x, weight, sizes, bias, y, c, use_tma, kmajor)

        cfg = FWD_TUNER.pick(key, run, default)
    _launch_fwd(x, weight, sizes, bias, y, cfg, use_tma, kmajor)
    return y


def _launch_dw(a, b, sizes, c, cfg: GroupedDwConfig, use_tma: bool):
    t, p = a.shape
    q = b.shape[1]
    g = c.shape[0]
    bp, bq, br = cfg.block_p, cfg.block_q, cfg.block_r
    a_desc = b_desc = c_desc = None
    if use_tma:
        a_desc = _ragged(a, [br, bp])
        b_desc = _ragged(b, [br, bq])
        c_desc = TensorDescriptor(c, list(c.shape), list(c.stride()), [1, bp, bq])
    grid = (g * triton.cdiv(p, bp) * triton.cdiv(q, bq),)
    _grouped_dw_kernel[grid](
        a, b, c, sizes, a_desc, b_desc, c_desc,
        t, p, q, g,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), *c.stride(),
        BLOCK_P=bp, BLOCK_Q=bq, BLOCK_R=br, BLOCK_G=_block_g(g),
        USE_TMA=use_tma, UPCAST=device.INTERPRET,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip


def grouped_weight_grad(dy, x, group_sizes, num_groups: int, n_major: bool):
    """``dW`` [G, N, K] with ``dW[g] = dy_g^T @ x_g``; stored N-contiguous (a transposed
    [G, K, N] tensor) when ``n_major``, matching a weight passed that way."""
    t, k = x.shape
    n = dy.shape[1]
    if n_major:
        store = new_output((num_groups, k, n), x.dtype, x.device)
        a, b = x, dy  # store[g] = x_g^T @ dy_g
    else:
        store = new_output((num_groups, n, k), x.dtype, x.device)
        a, b = dy, x
    out = store.transpose(1, 2) if n_major else store
    if store.numel() == 0:
        return out
    if t == 0:
        store.zero_()
        return out
    if a.stride(-1) != 1:
        a = a.contiguous()
    if b.stride(-1) != 1:
        b = b.contiguous()
    sizes = group_sizes if group_sizes.is_contiguous() else group_sizes.contiguous()
    use_tma = _tma_ok(a, b, store)
    if device.INTERPRET:
        cfg = DW_INTERPRET
    else:
        p, q = a.shape[1], b.shape[1]
        key = ("dw", tune.bucket(t), p, q, num_groups, _dtype_name(x.dtype), use_tma)

        def run(c: GroupedDwConfig) -> None:
            _launch_dw(a, b, sizes, store, c, use_tma)

        cfg = DW_TUNER.pick(key, run, DW_DEFAULT)
    _launch_dw(a, b, sizes, store, cfg, use_tma)
    return out


def grouped_bias_grad(dy, group_sizes, num_groups: int):
    """``dbias`` [G, N]: per-group column sums of dy (fp32 sums, dy's dtype)."""
    t, n = dy.shape
    db = new_output((num_groups, n), dy.dtype, dy.device)
    if db.numel() == 0:
        return db
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    sizes = group_sizes if group_sizes.is_contiguous() else group_sizes.contiguous()
    block_n = min(256, triton.next_power_of_2(n))
    block_r = 16 if device.INTERPRET else 64
    grid = (num_groups, triton.cdiv(n, block_n))
    _grouped_dbias_kernel[grid](
        dy, db, sizes, t, n, num_groups, dy.stride(0), db.stride(0),
        BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_G=_block_g(num_groups), num_warps=4,
    )  # fmt: skip
    return db


# ------------------------------------------------------------------------------ custom ops


@torch.library.custom_op("kernforge::grouped_gemm_fwd", mutates_args=())
def grouped_gemm_fwd(
    x: torch.Tensor, weight: torch.Tensor, group_sizes: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Triton grouped GEMM forward: y [T, N]."""
    return grouped_forward(x, weight, group_sizes, bias)


@grouped_gemm_fwd.register_fake
def _(x, weight, group_sizes, bias):
    return x.new_empty((x.shape[0], weight.shape[1]))


@torch.library.custom_op("kernforge::grouped_gemm_dw", mutates_args=())
def grouped_gemm_dw(
    dy: torch.Tensor, x: torch.Tensor, group_sizes: torch.Tensor, n_major: bool
) -> torch.Tensor:
    """Triton grouped weight gradient: dW [G, N, K] (N-contiguous when ``n_major``)."""
    return grouped_weight_grad(dy, x, group_sizes, group_sizes.shape[0], n_major)


@grouped_gemm_dw.register_fake
def _(dy, x, group_sizes, n_major):
    g, n, k = group_sizes.shape[0], dy.shape[1], x.shape[1]
    if n_major:
        return x.new_empty((g, k, n)).transpose(1, 2)
    return x.new_empty((g, n, k))


@torch.library.custom_op("kernforge::grouped_gemm_dbias", mutates_args=())
def grouped_gemm_dbias(dy: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
    """Triton per-group column sums of dy: dbias [G, N]."""
    return grouped_bias_grad(dy, group_sizes, group_sizes.shape[0])


@grouped_gemm_dbias.register_fake
def _(dy, group_sizes):
    return dy.new_empty((group_sizes.shape[0], dy.shape[1]))


class GroupedGemmFunction(torch.autograd.Function):
    """Autograd of the Triton grouped GEMM (gradients of x, weight and bias)."""

    @staticmethod
    def forward(ctx, x, weight, group_sizes, bias):
        ctx.save_for_backward(x, weight, group_sizes)
        return op_call(grouped_gemm_fwd, x, weight, group_sizes, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight, group_sizes = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx = dw = db = None
        if need[0]:  # dx = dy @ W[g] for the rows of g: the forward kernel on W^T
            dx = op_call(grouped_gemm_fwd, dy, weight.transpose(1, 2), group_sizes, None)
        if need[1]:  # dW in the weight's own layout (N-contiguous for a transposed view)
            n_major = weight.stride(2) != 1 and weight.stride(1) == 1
            dw = op_call(grouped_gemm_dw, dy, x, group_sizes, n_major)
        if need[3]:
            db = op_call(grouped_gemm_dbias, dy, group_sizes)
        return dx, dw, None, db


# ------------------------------------------------------------------------------ registrations


def _supports(x, weight, group_sizes, bias=None):
    if x.dtype not in DTYPES:
        return f"dtype {x.dtype} (the Triton grouped GEMM takes float16 and bfloat16)"
    return device.triton_runs_on(x.device)


@register_impl("grouped_gemm", "triton", supports=_supports)
def grouped_gemm_triton(x, weight, group_sizes, bias=None):
    """Triton grouped GEMM: one launch for all groups, differentiable."""
    return GroupedGemmFunction.apply(x, weight, group_sizes, bias)


@register_impl("grouped_gemm", "torch")
def grouped_gemm_torch(x, weight, group_sizes, bias=None):
    """Reference: a Python loop of torch matmuls over the groups (reads group_sizes on the
    host: one device sync)."""
    sizes = [int(s) for s in group_sizes.tolist()]
    outs = []
    for g, xg in enumerate(torch.split(x, sizes)):
        yg = xg @ weight[g].transpose(0, 1)
        outs.append(yg if bias is None else yg + bias[g])
    if not outs:
        return x.new_zeros((x.shape[0], weight.shape[1]))
    return torch.cat(outs)


def _tune_cli(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """``kernforge tune grouped_gemm --shapes TxNxKxG``: even random routing of T rows."""
    if len(shape) != 4:
        raise SystemExit("grouped_gemm shapes are TxNxKxG, e.g. 16384x28672x4096x8")
    t, n, k, g = shape
    x = torch.randn(t, k, device="cuda", dtype=dtype)
    w = torch.randn(g, n, k, device="cuda", dtype=dtype)
    ids = torch.randint(0, g, (t,), device="cuda")
    sizes = torch.bincount(ids, minlength=g).to(torch.int32)
    grouped_forward(x, w, sizes, None)
    grouped_weight_grad(torch.randn(t, n, device="cuda", dtype=dtype), x, sizes, g, False)


tune.register_cli(
    "grouped_gemm",
    run=_tune_cli,
    shapes_help="TxNxKxG (rows, out features, in features, groups)",
    default_shapes=[(16384, 28672, 4096, 8), (16384, 4096, 14336, 8),
                    (65536, 2816, 2048, 64), (65536, 2048, 1408, 64)],
)  # fmt: skip
