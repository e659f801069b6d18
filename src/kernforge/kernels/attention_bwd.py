"""Flash attention backward: Triton kernels and their launches (FlashAttention 2's split).

Three launches, no atomics, deterministic:
1. ``delta = rowsum(dO * O)`` per query row (fp32).
2. dK, dV: a program owns BLOCK_N keys of one kv head and walks the query blocks that see them,
   for one q head; with GQA it writes an fp32 slice per q head, and :func:`group_sum` adds
   each group's slices in one pass and rounds once to dK/dV's dtype (walking the group inside
   the kernel instead measured 10-20% slower on an H100: 4x fewer programs).
   ``dV += P^T dO``, ``dK += dS^T Q`` with ``dS = P * (dP - delta)`` (times ``1 - tanh^2`` with
   a softcap), P recomputed from the saved log-sum-exp.
3. dQ: a program owns BLOCK_M queries of one q head and walks their keys: ``dQ += dS K``.

Masks, key/query ranges, layouts, varlen offsets and tensor descriptors work as in the forward
(:mod:`.attention_fwd`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .attention_fwd import LOG2E, key_range, scores, seq_span


@triton.jit
def query_range(n0, seqlen_q, seqlen_k, diag, LEFT, RIGHT,
                HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """Query blocks that see the key block starting at ``n0``: ``(lo, full_lo, full_hi, hi)``
    as in :func:`~.attention_fwd.key_range` (whole blocks: every pair attends)."""
    last = tl.minimum(n0 + BLOCK_N, seqlen_k) - 1  # the block's last real key
    lo = n0 * 0
    hi = seqlen_q + n0 * 0
    full_lo = lo
    full_hi = (seqlen_q // BLOCK_M) * BLOCK_M + n0 * 0
    if n0 + BLOCK_N > seqlen_k:  # the sequence's last, partial key block: mask every query
        full_hi = lo
    if HAS_RIGHT:  # query i sees key j only if i >= j - diag - RIGHT
        lo = (tl.maximum(n0 - diag - RIGHT, 0) // BLOCK_M) * BLOCK_M
        full_lo = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - diag - RIGHT, 0), BLOCK_M) * BLOCK_M
    if HAS_LEFT:  # ... and only if i <= j - diag + LEFT
        hi = tl.minimum(hi, tl.maximum(last - diag + LEFT + 1, 0))
        full_hi = tl.minimum(full_hi, (tl.maximum(n0 - diag + LEFT + 1, 0) // BLOCK_M) * BLOCK_M)
    lo = tl.minimum(lo, hi)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def fmha_bwd_delta_kernel(
    O, DO, DELTA, CU_Q,
    s_ob, s_os, s_oh, s_db, s_ds, s_dh, s_lb, s_lh, HQ, SEQ_Q,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HQ
    h = bh % HQ
    q_start, seqlen_q = seq_span(CU_Q, b, SEQ_Q, IS_VARLEN)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows = (q_start + offs_m).to(tl.int64)[:, None]
    mask = (offs_m < seqlen_q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    o = tl.load(O + b64 * s_ob + h64 * s_oh + rows * s_os + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b64 * s_db + h64 * s_dh + rows * s_ds + offs_d[None, :], mask=mask,
                 other=0.0)  # fmt: skip
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + b64 * s_lb + h64 * s_lh + q_start + offs_m, delta, mask=offs_m < seqlen_q)


@triton.jit
def _dkdv_loop(
    dk, dv, k, v, q_ptrs, do_ptrs, desc_q, desc_do, lse_ptr, delta_ptr, s_qs, s_dos,
    lo, hi, first_q, last_q, seqlen_q, qk_scale, cap_scale, cap_log2,
    MASKED: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
    FAST_TANH: tl.constexpr, USE_TMA: tl.constexpr, EVEN_D: tl.constexpr,
    UPCAST: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Query blocks [lo, hi) into dK, dV. With MASKED, key row j sees queries
    ``first_q[j] <= i <= last_q[j]`` (``first_q`` only with HAS_RIGHT)."""
    offs_m0 = tl.arange(0, BLOCK_M)
    dmask = (tl.arange(0, BLOCK_D) < HEAD_DIM)[None, :]
    for start_m in tl.range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0
        mrow = offs_m < seqlen_q
        if USE_TMA:
            q = desc_q.load([start_m, 0])
            do = desc_do.load([start_m, 0])
        else:
            rows = offs_m.to(tl.int64)[:, None]
            if MASKED:
                q = tl.load(q_ptrs + rows * s_qs, mask=mrow[:, None] & dmask, other=0.0)
                do = tl.load(do_ptrs + rows * s_dos, mask=mrow[:, None] & dmask, other=0.0)
            elif EVEN_D:
                q = tl.load(q_ptrs + rows * s_qs)
                do = tl.load(do_ptrs + rows * s_dos)
            else:
                q = tl.load(q_ptrs + rows * s_qs, mask=dmask, other=0.0)
                do = tl.load(do_ptrs + rows * s_dos, mask=dmask, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        # Rows past the sequence read lse 0 and delta 0: with q and dO zero they add nothing.
        lse2 = tl.load(lse_ptr + offs_m, mask=mrow, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_ptr + offs_m, mask=mrow, other=0.0)
        qkT = tl.dot(k, tl.trans(q))  # [BLOCK_N, BLOCK_M]: keys down, queries across
        sT, tT = scores(qkT, qk_scale, cap_scale, cap_log2, SOFTCAP, FAST_TANH)
        if MASKED:
            keep = offs_m[None, :] <= last_q[:, None]
            if HAS_RIGHT:
                keep = keep & (offs_m[None, :] >= first_q[:, None])
            sT = tl.where(keep, sT, float("-inf"))
        pT = tl.exp2(sT - lse2[None, :])
        dv = tl.dot(pT.to(do.dtype), do, dv)
        dpT = tl.dot(v, tl.trans(do))
        dsT = pT * (dpT - delta[None, :])
        if SOFTCAP:
            dsT = dsT * (1.0 - tT * tT)
        dk = tl.dot(dsT.to(q.dtype), q, dk)
    return dk, dv


@triton.jit(do_not_specialize=["HQ", "GROUP", "SEQ_Q", "SEQ_K", "LEFT", "RIGHT"])
def fmha_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K,
    s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_dob, s_dos, s_doh,
    s_dkb, s_dks, s_dkh, s_dvb, s_dvs, s_dvh, s_lb, s_lh,
    HQ, GROUP, SEQ_Q, SEQ_K, LEFT, RIGHT, sm_scale, qk_scale, cap_scale, cap_log2,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr, FAST_TANH: tl.constexpr, IS_VARLEN: tl.constexpr,
    USE_TMA: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """One program: dK, dV of BLOCK_N keys for one q head (GQA: DK/DV hold a slice per q
    head, summed over each group afterwards; a loop over the group here costs ~80 registers)."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HQ
    h = bh % HQ
    hk = h // GROUP
    q_start, seqlen_q = seq_span(CU_Q, b, SEQ_Q, IS_VARLEN)
    k_start, seqlen_k = seq_span(CU_K, b, SEQ_K, IS_VARLEN)
    n0 = pid_n * BLOCK_N
    if IS_VARLEN:  # noqa: SIM102  (constexpr, then a run-time test)
        if n0 >= seqlen_k:
            return
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = hk.to(tl.int64)
    diag = seqlen_k - seqlen_q
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    nmask = (offs_n < seqlen_k)[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows_n = offs_n.to(tl.int64)[:, None]
    k_base = K + b64 * s_kb + k_start * s_ks + hk64 * s_kh
    v_base = V + b64 * s_vb + k_start * s_vs + hk64 * s_vh
    q_base = Q + b64 * s_qb + q_start * s_qs + h64 * s_qh
    do_base = DO + b64 * s_dob + q_start * s_dos + h64 * s_doh
    lse_ptr = LSE + b64 * s_lb + h64 * s_lh + q_start
    delta_ptr = DELTA + b64 * s_lb + h64 * s_lh + q_start
    if USE_TMA:
        desc_k = tl.make_tensor_descriptor(k_base, shape=[seqlen_k, HEAD_DIM], strides=[s_ks, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])  # fmt: skip
        desc_v = tl.make_tensor_descriptor(v_base, shape=[seqlen_k, HEAD_DIM], strides=[s_vs, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])  # fmt: skip
        desc_q = tl.make_tensor_descriptor(q_base, shape=[tl.maximum(seqlen_q, 1), HEAD_DIM],
                                           strides=[s_qs, 1],
                                           block_shape=[BLOCK_M, BLOCK_D])  # fmt: skip
        desc_do = tl.make_tensor_descriptor(do_base, shape=[tl.maximum(seqlen_q, 1), HEAD_DIM],
                                            strides=[s_dos, 1],
                                            block_shape=[BLOCK_M, BLOCK_D])  # fmt: skip
        k = desc_k.load([n0, 0])
        v = desc_v.load([n0, 0])
        q_ptrs = q_base
        do_ptrs = do_base
    else:
        desc_q = None
        desc_do = None
        k = tl.load(k_base + rows_n * s_ks + offs_d[None, :], mask=nmask, other=0.0)
        v = tl.load(v_base + rows_n * s_vs + offs_d[None, :], mask=nmask, other=0.0)
        q_ptrs = q_base + offs_d[None, :]
        do_ptrs = do_base + offs_d[None, :]
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # Per key row: the queries that see it (query i sees key j iff
    # j - diag - RIGHT <= i <= j - diag + LEFT), and none past the sequence.
    last_q = tl.full([BLOCK_N], 0, tl.int32) + seqlen_q - 1
    if HAS_LEFT:
        last_q = tl.minimum(last_q, offs_n - diag + LEFT)
    first_q = offs_n - diag - RIGHT
    lo, full_lo, full_hi, hi = query_range(n0, seqlen_q, seqlen_k, diag, LEFT, RIGHT, HAS_LEFT,
                                           HAS_RIGHT, BLOCK_M, BLOCK_N)  # fmt: skip
    dk, dv = _dkdv_loop(
        dk, dv, k, v, q_ptrs, do_ptrs, desc_q, desc_do, lse_ptr, delta_ptr, s_qs, s_dos,
        lo, full_lo, first_q, last_q, seqlen_q, qk_scale, cap_scale, cap_log2, True, HAS_RIGHT,
        SOFTCAP, FAST_TANH, USE_TMA, EVEN_D, UPCAST, HEAD_DIM, BLOCK_M, BLOCK_D,
    )  # fmt: skip
    dk, dv = _dkdv_loop(
        dk, dv, k, v, q_ptrs, do_ptrs, desc_q, desc_do, lse_ptr, delta_ptr, s_qs, s_dos,
        full_lo, full_hi, first_q, last_q, seqlen_q, qk_scale, cap_scale, cap_log2, False,
        HAS_RIGHT, SOFTCAP, FAST_TANH, USE_TMA, EVEN_D, UPCAST, HEAD_DIM, BLOCK_M, BLOCK_D,
    )  # fmt: skip
    dk, dv = _dkdv_loop(
        dk, dv, k, v, q_ptrs, do_ptrs, desc_q, desc_do, lse_ptr, delta_ptr, s_qs, s_dos,
        full_hi, hi, first_q, last_q, seqlen_q, qk_scale, cap_scale, cap_log2, True, HAS_RIGHT,
        SOFTCAP, FAST_TANH, USE_TMA, EVEN_D, UPCAST, HEAD_DIM, BLOCK_M, BLOCK_D,
    )  # fmt: skip
    dk = dk * sm_scale
    dk_base = DK + b64 * s_dkb + k_start * s_dks + h64 * s_dkh
    dv_base = DV + b64 * s_dvb + k_start * s_dvs + h64 * s_dvh
    tl.store(dk_base + rows_n * s_dks + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=nmask)
    tl.store(dv_base + rows_n * s_dvs + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=nmask)


@triton.jit
def _dq_loop(
    dq, q, do, lse2, delta, k_ptrs, v_ptrs, desc_k, desc_v, s_ks, s_vs,
    lo, hi, first, last, seqlen_k, qk_scale, cap_scale, cap_log2,
    MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, SOFTCAP: tl.constexpr,
    FAST_TANH: tl.constexpr, USE_TMA: tl.constexpr, EVEN_D: tl.constexpr,
    UPCAST: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Key blocks [lo, hi) into dQ; masks as in the forward's loop."""
    offs_n0 = tl.arange(0, BLOCK_N)
    dmask = (tl.arange(0, BLOCK_D) < HEAD_DIM)[None, :]
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        if USE_TMA:
            k = desc_k.load([start_n, 0])
            v = desc_v.load([start_n, 0])
        else:
            rows = offs_n.to(tl.int64)[:, None]
            if MASKED:
                nm = (offs_n < seqlen_k)[:, None] & dmask
                k = tl.load(k_ptrs + rows * s_ks, mask=nm, other=0.0)
                v = tl.load(v_ptrs + rows * s_vs, mask=nm, other=0.0)
            elif EVEN_D:
                k = tl.load(k_ptrs + rows * s_ks)
                v = tl.load(v_ptrs + rows * s_vs)
            else:
                k = tl.load(k_ptrs + rows * s_ks, mask=dmask, other=0.0)
                v = tl.load(v_ptrs + rows * s_vs, mask=dmask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k))
        s, t = scores(qk, qk_scale, cap_scale, cap_log2, SOFTCAP, FAST_TANH)
        if MASKED:
            keep = offs_n[None, :] <= last[:, None]
            if HAS_LEFT:
                keep = keep & (offs_n[None, :] >= first[:, None])
            s = tl.where(keep, s, float("-inf"))
        p = tl.exp2(s - lse2[:, None])
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq


@triton.jit(do_not_specialize=["HQ", "GROUP", "SEQ_Q", "SEQ_K", "LEFT", "RIGHT"])
def fmha_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K,
    s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_dob, s_dos, s_doh,
    s_dqb, s_dqs, s_dqh, s_lb, s_lh,
    HQ, GROUP, SEQ_Q, SEQ_K, LEFT, RIGHT, sm_scale, qk_scale, cap_scale, cap_log2,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr, FAST_TANH: tl.constexpr, IS_VARLEN: tl.constexpr,
    USE_TMA: tl.constexpr, UPCAST: tl.constexpr, REVERSE: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    if REVERSE:
        pid_m = tl.num_programs(0) - 1 - pid_m
    bh = tl.program_id(1)
    b = bh // HQ
    h = bh % HQ
    hk = h // GROUP
    q_start, seqlen_q = seq_span(CU_Q, b, SEQ_Q, IS_VARLEN)
    k_start, seqlen_k = seq_span(CU_K, b, SEQ_K, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    if IS_VARLEN:  # noqa: SIM102  (constexpr, then a run-time test)
        if m0 >= seqlen_q:
            return
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = hk.to(tl.int64)
    diag = seqlen_k - seqlen_q
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mrow = offs_m < seqlen_q
    mmask = mrow[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows_m = offs_m.to(tl.int64)[:, None]
    q_base = Q + b64 * s_qb + q_start * s_qs + h64 * s_qh
    do_base = DO + b64 * s_dob + q_start * s_dos + h64 * s_doh
    k_base = K + b64 * s_kb + k_start * s_ks + hk64 * s_kh
    v_base = V + b64 * s_vb + k_start * s_vs + hk64 * s_vh
    q = tl.load(q_base + rows_m * s_qs + offs_d[None, :], mask=mmask, other=0.0)
    do = tl.load(do_base + rows_m * s_dos + offs_d[None, :], mask=mmask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse2 = tl.load(LSE + b64 * s_lb + h64 * s_lh + q_start + offs_m, mask=mrow, other=0.0)
    lse2 = lse2 * 1.4426950408889634
    delta = tl.load(DELTA + b64 * s_lb + h64 * s_lh + q_start + offs_m, mask=mrow, other=0.0)
    if USE_TMA:
        desc_k = tl.make_tensor_descriptor(k_base, shape=[tl.maximum(seqlen_k, 1), HEAD_DIM],
                                           strides=[s_ks, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])  # fmt: skip
        desc_v = tl.make_tensor_descriptor(v_base, shape=[tl.maximum(seqlen_k, 1), HEAD_DIM],
                                           strides=[s_vs, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])  # fmt: skip
        k_ptrs = k_base
        v_ptrs = v_base
    else:
        desc_k = None
        desc_v = None
        k_ptrs = k_base + offs_d[None, :]
        v_ptrs = v_base + offs_d[None, :]
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    last = tl.full([BLOCK_M], 0, tl.int32) + seqlen_k - 1
    if HAS_RIGHT:
        last = tl.minimum(last, offs_m + diag + RIGHT)
    first = offs_m + diag - LEFT
    lo, full_lo, full_hi, hi = key_range(m0, seqlen_q, seqlen_k, diag, LEFT, RIGHT, HAS_LEFT,
                                         HAS_RIGHT, BLOCK_M, BLOCK_N)  # fmt: skip
    dq = _dq_loop(
        dq, q, do, lse2, delta, k_ptrs, v_ptrs, desc_k, desc_v, s_ks, s_vs, lo, full_lo, first,
        last, seqlen_k, qk_scale, cap_scale, cap_log2, True, HAS_LEFT, SOFTCAP, FAST_TANH,
        USE_TMA, EVEN_D, UPCAST, HEAD_DIM, BLOCK_N, BLOCK_D,
    )  # fmt: skip
    dq = _dq_loop(
        dq, q, do, lse2, delta, k_ptrs, v_ptrs, desc_k, desc_v, s_ks, s_vs, full_lo, full_hi,
        first, last, seqlen_k, qk_scale, cap_scale, cap_log2, False, HAS_LEFT, SOFTCAP,
        FAST_TANH, USE_TMA, EVEN_D, UPCAST, HEAD_DIM, BLOCK_N, BLOCK_D,
    )  # fmt: skip
    dq = _dq_loop(
        dq, q, do, lse2, delta, k_ptrs, v_ptrs, desc_k, desc_v, s_ks, s_vs, full_hi, hi, first,
        last, seqlen_k, qk_scale, cap_scale, cap_log2, True, HAS_LEFT, SOFTCAP, FAST_TANH,
        USE_TMA, EVEN_D, UPCAST, HEAD_DIM, BLOCK_N, BLOCK_D,
    )  # fmt: skip
    dq = dq * sm_scale
    dq_base = DQ + b64 * s_dqb + q_start * s_dqs + h64 * s_dqh
    tl.store(dq_base + rows_m * s_dqs + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=mmask)


def launch_bwd(
    q, k, v, o, do, lse, dq, dk, dv, delta, cu_q, cu_k, st: dict, hq: int, hk: int, group: int,
    batch: int, max_q: int, max_k: int, seq_q: int, seq_k: int, left: int, right: int,
    scale: float, softcap: float, head_dim: int, cfg, interpret: bool, varlen: bool,
    parts: tuple[str, ...] = ("delta", "dkdv", "dq"),
) -> None:  # fmt: skip
    """The three backward launches (``parts`` picks some: the sweep times them one by one).
    ``st`` maps each tensor name to its (batch, seq, head) strides; ``cfg`` holds the dkdv and
    dq tile configs."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    cap = softcap if softcap > 0 else 1.0
    lw, rw = max(left, 0), max(right, 0)
    scal = (scale, scale * LOG2E, scale / cap, cap * LOG2E)
    flags = dict(
        HEAD_DIM=head_dim, BLOCK_D=block_d, HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0,
        SOFTCAP=softcap > 0, FAST_TANH=not interpret, IS_VARLEN=varlen, UPCAST=interpret,
    )  # fmt: skip
    pre_m = 64 if not interpret else 128
    if "delta" in parts:
        fmha_bwd_delta_kernel[(triton.cdiv(max_q, pre_m), batch * hq)](
            o, do, delta, cu_q, *st["o"], *st["do"], *st["lse"], hq, seq_q,
            HEAD_DIM=head_dim, BLOCK_M=pre_m, BLOCK_D=block_d, IS_VARLEN=varlen,
            num_warps=4,
        )  # fmt: skip
    kv = cfg.dkdv
    if "dkdv" in parts:
        fmha_bwd_dkdv_kernel[(triton.cdiv(max_k, kv.block_n), batch * hq)](
            q, k, v, do, lse, delta, dk, dv, cu_q, cu_k,
            *st["q"], *st["k"], *st["v"], *st["do"], *st["dk"], *st["dv"], *st["lse"],
            hq, group, seq_q, seq_k, lw, rw, *scal,
            BLOCK_M=kv.block_m, BLOCK_N=kv.block_n, USE_TMA=kv.tma,
            num_warps=kv.num_warps, num_stages=kv.num_stages, **flags,
        )  # fmt: skip
    qc = cfg.dq
    if "dq" in parts:
        fmha_bwd_dq_kernel[(triton.cdiv(max_q, qc.block_m), batch * hq)](
            q, k, v, do, lse, delta, dq, cu_q, cu_k,
            *st["q"], *st["k"], *st["v"], *st["do"], *st["dq"], *st["lse"],
            hq, group, seq_q, seq_k, lw, rw, *scal,
            BLOCK_M=qc.block_m, BLOCK_N=qc.block_n, USE_TMA=qc.tma, REVERSE=right >= 0,
            num_warps=qc.num_warps, num_stages=qc.num_stages, **flags,
        )  # fmt: skip


@triton.jit
def fmha_bwd_group_sum_kernel(
    PART, OUT, R, C, GROUP, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """``OUT[r, c] = sum_g PART[r, g, c]`` in fp32, rounded once to OUT's dtype."""
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)[:, None]
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    mask = (rows < R) & (cols < C)
    src = PART + rows * GROUP * C + cols
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for g in range(0, GROUP):
        acc += tl.load(src + g * C, mask=mask, other=0.0)
    tl.store(OUT + rows * C + cols, acc.to(OUT.dtype.element_ty), mask=mask)


def group_sum(part, out, hk: int, group: int, ax: int) -> None:
    """``out`` (contiguous, kv heads ``hk`` at axis ``ax``) = the sum over each group of
    ``group`` consecutive q heads of ``part`` (contiguous fp32, ``hk * group`` heads at
    ``ax``): one read of part, one write of out (torch's sum then a cast took two passes more).
    """
    r = out.shape[:ax].numel() * hk
    c = out.shape[ax + 1 :].numel()
    if r == 0 or c == 0:
        return
    block_c = min(triton.next_power_of_2(c), 1024)
    block_r = max(1, 4096 // block_c)
    grid = (triton.cdiv(r, block_r), triton.cdiv(c, block_c))
    fmha_bwd_group_sum_kernel[grid](part, out, r, c, group, BLOCK_R=block_r, BLOCK_C=block_c,
                                    num_warps=4)  # fmt: skip
