"""Flash attention forward: the Triton kernel and its launch.

One kernel serves dense batches ([B, S, H, D] or [B, H, S, D], read through strides) and packed
variable-length batches ([T, H, D] with ``cu_seqlens``): a program takes BLOCK_M queries of one
(sequence, q head) and streams the keys and values of its kv head (GQA: kv head = q head //
group) through an online softmax in fp32, in base-2 units (``exp2``; the scale folds log2(e)).

The key range of a query block is cut in three (see :func:`key_range`): blocks that some row
sees only in part (sliding-window start), blocks every row sees whole (no mask arithmetic), and
the partial blocks at the end (causal diagonal, window end, sequence tail). Masks are causal
aligned bottom-right like FlashAttention 2 (query i sees key j <= i + Sk - Sq) and windows
(left, right) around that diagonal. A row that sees no key gets output 0 and log-sum-exp +inf
(FlashAttention 2's convention; the backward then gives it zero gradient).

On Hopper the kernel can read Q, K, V and write O through tensor descriptors (TMA) made on the
device per program, whose bounds are the program's own sequence: padding of the head dim
(96 -> 128), sequence tails and the ends of packed sequences cost no masks.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def tanh_f32(x, FAST: tl.constexpr):
    """tanh in fp32: the MUFU instruction on the GPU, an exact formula in the interpreter."""
    if FAST:
        return tl.inline_asm_elementwise(
            "tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        e = tl.exp2(x * 2.8853900817779268)  # exp(2x)
        return 1.0 - 2.0 / (e + 1.0)


@triton.jit
def scores(qk, qk_scale, cap_scale, cap_log2, SOFTCAP: tl.constexpr, FAST_TANH: tl.constexpr):
    """``(s, t)``: scores in base-2 units from raw ``q . k`` and, with a softcap, the tanh
    (``s = cap * tanh(qk * scale / cap) * log2(e)``) the backward differentiates."""
    if SOFTCAP:
        t = tanh_f32(qk * cap_scale, FAST_TANH)
        return t * cap_log2, t
    else:
        return qk * qk_scale, qk


@triton.jit
def keep_mask(offs_q, offs_k, seqlen_q, seqlen_k, diag, LEFT, RIGHT,
              HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, CHECK_Q: tl.constexpr):  # fmt: skip
    """Which (query, key) pairs attend: keys in the sequence, within the window around the
    bottom-right diagonal (``diag = seqlen_k - seqlen_q``). ``offs_q``/``offs_k`` come already
    broadcastable ([M, 1] and [1, N], or transposed)."""
    keep = offs_k < seqlen_k
    if CHECK_Q:
        keep = keep & (offs_q < seqlen_q)
    rel = offs_k - (offs_q + diag)  # key position relative to the query's diagonal
    if HAS_RIGHT:
        keep = keep & (rel <= RIGHT)
    if HAS_LEFT:
        keep = keep & (rel >= -LEFT)
    return keep


@triton.jit
def seq_span(CU, b, SEQ, IS_VARLEN: tl.constexpr):
    """``(start, length)`` of sequence ``b``: read from the cu_seqlens ``CU`` of a packed
    (varlen) batch, else row ``b`` of a dense batch of SEQ tokens (start 0)."""
    if IS_VARLEN:
        start = tl.load(CU + b).to(tl.int64)
        length = (tl.load(CU + b + 1) - tl.load(CU + b)).to(tl.int32)
    else:
        start = 0
        length = SEQ
    return start, length


@triton.jit
def key_range(m0, seqlen_q, seqlen_k, diag, LEFT, RIGHT,
              HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """Key blocks of the query block starting at ``m0``: ``(lo, full_lo, full_hi, hi)``.

    [lo, full_lo) and [full_hi, hi) need masks; [full_lo, full_hi) are seen whole by every
    row. Numerators are clamped at 0 before dividing (Triton's ``//`` truncates, the
    interpreter's floors)."""
    last = tl.minimum(m0 + BLOCK_M, seqlen_q) - 1  # the block's last real query row
    lo = m0 * 0
    hi = seqlen_k + m0 * 0
    full_lo = lo
    full_hi = (seqlen_k // BLOCK_N) * BLOCK_N + m0 * 0  # whole blocks inside the sequence
    if HAS_LEFT:  # key j >= i + diag - LEFT
        lo = (tl.maximum(m0 + diag - LEFT, 0) // BLOCK_N) * BLOCK_N
        full_lo = tl.cdiv(tl.maximum(m0 + BLOCK_M - 1 + diag - LEFT, 0), BLOCK_N) * BLOCK_N
    if HAS_RIGHT:  # key j <= i + diag + RIGHT
        hi = tl.minimum(hi, tl.maximum(last + diag + RIGHT + 1, 0))
        full_hi = tl.minimum(full_hi, (tl.maximum(m0 + diag + RIGHT + 1, 0) // BLOCK_N) * BLOCK_N)
    lo = tl.minimum(lo, hi)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _fwd_loop(
    acc, l_i, m_i, q, k_ptrs, v_ptrs, desc_k, desc_v, s_ks, s_vs, lo, hi, first, last,
    seqlen_k, qk_scale, cap_scale, cap_log2,
    MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, SOFTCAP: tl.constexpr,
    FAST_TANH: tl.constexpr, USE_TMA: tl.constexpr, WARP_SPEC: tl.constexpr,
    EVEN_D: tl.constexpr, UPCAST: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, POS_SCALE: tl.constexpr,
):  # fmt: skip
    """Key blocks [lo, hi) into the online softmax. With MASKED, row i keeps keys
    ``first[i] <= j <= last[i]`` (``first`` only with HAS_LEFT): one compare and select per
    score, with no branch (Triton 3.6 warp-specializes no loop that holds an ``if``)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    dmask = (tl.arange(0, BLOCK_D) < HEAD_DIM)[None, :]
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPEC):
        offs_n = start_n + offs_n0
        if USE_TMA:
            k = desc_k.load([start_n, 0])
        else:
            rows = offs_n.to(tl.int64)[:, None]
            if MASKED:
                k = tl.load(k_ptrs + rows * s_ks, mask=(offs_n < seqlen_k)[:, None] & dmask,
                            other=0.0)  # fmt: skip
            elif EVEN_D:
                k = tl.load(k_ptrs + rows * s_ks)
            else:
                k = tl.load(k_ptrs + rows * s_ks, mask=dmask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        qk = tl.dot(q, tl.trans(k))
        # RAW: the row max is taken on the raw q.k and scaled after (a positive scale keeps
        # the order), so each score costs one FMA into exp2 instead of a multiply and a subtract.
        RAW: tl.constexpr = POS_SCALE and not SOFTCAP
        if RAW:
            s = qk
        else:
            s, _t = scores(qk, qk_scale, cap_scale, cap_log2, SOFTCAP, FAST_TANH)
        if MASKED:
            keep = offs_n[None, :] <= last[:, None]
            if HAS_LEFT:
                keep = keep & (offs_n[None, :] >= first[:, None])
            s = tl.where(keep, s, float("-inf"))
        if RAW:
            m_ij = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        else:
            m_ij = tl.maximum(m_i, tl.max(s, 1))
        if MASKED:
            # A row that has seen no key yet keeps m = -inf; subtract 0 there, not -inf (NaN).
            m_use = tl.where(m_ij == float("-inf"), 0.0, m_ij)
        else:
            m_use = m_ij
        if RAW:
            p = tl.exp2(s * qk_scale - m_use[:, None])
        else:
            p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        acc = acc * alpha[:, None]
        if USE_TMA:
            v = desc_v.load([start_n, 0])
        else:
            rows = offs_n.to(tl.int64)[:, None]
            if MASKED:
                v = tl.load(v_ptrs + rows * s_vs, mask=(offs_n < seqlen_k)[:, None] & dmask,
                            other=0.0)  # fmt: skip
            elif EVEN_D:
                v = tl.load(v_ptrs + rows * s_vs)
            else:
                v = tl.load(v_ptrs + rows * s_vs, mask=dmask, other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        acc = tl.dot(p.to(v.dtype), v, acc)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["HQ", "GROUP", "SEQ_Q", "SEQ_K", "LEFT", "RIGHT"])
def fmha_fwd_kernel(
    Q, K, V, O, LSE, CU_Q, CU_K,
    s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_ob, s_os, s_oh, s_lb, s_lh,
    HQ, GROUP, SEQ_Q, SEQ_K, LEFT, RIGHT, qk_scale, cap_scale, cap_log2,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr, FAST_TANH: tl.constexpr, IS_VARLEN: tl.constexpr,
    USE_TMA: tl.constexpr, WARP_SPEC: tl.constexpr, UPCAST: tl.constexpr,
    REVERSE: tl.constexpr, EVEN_N: tl.constexpr, POS_SCALE: tl.constexpr,
    TILES=None, SCHED: tl.constexpr = False,
):  # fmt: skip
    """One program: BLOCK_M queries of one (sequence, q head). EVEN_N: no key block needs a
    mask (dense, no causal/window, seq_k a multiple of BLOCK_N). SCHED (packed batches): the
    grid is one dimension, (tile rank, q head) with the head fastest, and the tile of a rank
    comes from ``TILES`` (:func:`varlen_tiles_kernel`: the costliest first, -1 past the end)."""
    if SCHED:
        rank = tl.program_id(0) // HQ
        h = tl.program_id(0) % HQ
        tile = tl.load(TILES + rank)
        if tile < 0:
            return
        b = tile >> 16
        pid_m = tile & 0xFFFF
    else:
        pid_m = tl.program_id(0)
        if REVERSE:  # causal: the longest rows first, so the short ones fill the last wave
            pid_m = tl.num_programs(0) - 1 - pid_m
        bh = tl.program_id(1)
        b = bh // HQ
        h = bh % HQ
    hk = h // GROUP
    q_start, seqlen_q = seq_span(CU_Q, b, SEQ_Q, IS_VARLEN)
    k_start, seqlen_k = seq_span(CU_K, b, SEQ_K, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    # Dense grids hold only real blocks. Past a packed sequence's end a program exits, except
    # under warp specialization (Triton 3.6 rejects the exit there): it runs no key block.
    if IS_VARLEN and not WARP_SPEC:  # noqa: SIM102  (constexpr, then a run-time test)
        if m0 >= seqlen_q:
            return
    b64 = b.to(tl.int64)
    q_base = Q + b64 * s_qb + q_start * s_qs + h.to(tl.int64) * s_qh
    k_base = K + b64 * s_kb + k_start * s_ks + hk.to(tl.int64) * s_kh
    v_base = V + b64 * s_vb + k_start * s_vs + hk.to(tl.int64) * s_vh
    o_base = O + b64 * s_ob + q_start * s_os + h.to(tl.int64) * s_oh
    diag = seqlen_k - seqlen_q
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = (offs_d < HEAD_DIM)[None, :]
    qmask = (offs_m < seqlen_q)[:, None] & dmask
    if USE_TMA:
        # Bounds are this sequence's: rows past its end and the head-dim padding read as 0.
        desc_q = tl.make_tensor_descriptor(q_base, shape=[tl.maximum(seqlen_q, 1), HEAD_DIM],
                                           strides=[s_qs, 1],
                                           block_shape=[BLOCK_M, BLOCK_D])  # fmt: skip
        desc_k = tl.make_tensor_descriptor(k_base, shape=[tl.maximum(seqlen_k, 1), HEAD_DIM],
                                           strides=[s_ks, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])  # fmt: skip
        desc_v = tl.make_tensor_descriptor(v_base, shape=[tl.maximum(seqlen_k, 1), HEAD_DIM],
                                           strides=[s_vs, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])  # fmt: skip
        q = desc_q.load([m0, 0])
        k_ptrs = k_base
        v_ptrs = v_base
    else:
        desc_k = None
        desc_v = None
        q = tl.load(q_base + offs_m.to(tl.int64)[:, None] * s_qs + offs_d[None, :], mask=qmask,
                    other=0.0)  # fmt: skip
        k_ptrs = k_base + offs_d[None, :]
        v_ptrs = v_base + offs_d[None, :]
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, full_lo, full_hi, hi = key_range(m0, seqlen_q, seqlen_k, diag, LEFT, RIGHT, HAS_LEFT,
                                         HAS_RIGHT, BLOCK_M, BLOCK_N)  # fmt: skip
    if IS_VARLEN and WARP_SPEC:
        hi = tl.where(m0 < seqlen_q, hi, lo)
    # Per-row key limits: keys past the sequence, right of the window, left of it.
    last = tl.full([BLOCK_M], 0, tl.int32) + seqlen_k - 1
    if HAS_RIGHT:
        last = tl.minimum(last, offs_m + diag + RIGHT)
    first = offs_m + diag - LEFT
    if WARP_SPEC:  # one loop over every block (masked unless no block can need it)
        acc, l_i, m_i = _fwd_loop(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, desc_k, desc_v, s_ks, s_vs, lo, hi, first, last,
            seqlen_k, qk_scale, cap_scale, cap_log2, not EVEN_N, HAS_LEFT, SOFTCAP, FAST_TANH,
            USE_TMA, WARP_SPEC, EVEN_D, UPCAST, HEAD_DIM, BLOCK_N, BLOCK_D, POS_SCALE,
        )  # fmt: skip
    else:  # partial blocks masked, whole ones not
        acc, l_i, m_i = _fwd_loop(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, desc_k, desc_v, s_ks, s_vs, lo, full_lo, first,
            last, seqlen_k, qk_scale, cap_scale, cap_log2, True, HAS_LEFT, SOFTCAP, FAST_TANH,
            USE_TMA, WARP_SPEC, EVEN_D, UPCAST, HEAD_DIM, BLOCK_N, BLOCK_D, POS_SCALE,
        )  # fmt: skip
        acc, l_i, m_i = _fwd_loop(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, desc_k, desc_v, s_ks, s_vs, full_lo, full_hi,
            first, last, seqlen_k, qk_scale, cap_scale, cap_log2, False, HAS_LEFT, SOFTCAP,
            FAST_TANH, USE_TMA, WARP_SPEC, EVEN_D, UPCAST, HEAD_DIM, BLOCK_N, BLOCK_D, POS_SCALE,
        )  # fmt: skip
        acc, l_i, m_i = _fwd_loop(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, desc_k, desc_v, s_ks, s_vs, full_hi, hi, first,
            last, seqlen_k, qk_scale, cap_scale, cap_log2, True, HAS_LEFT, SOFTCAP, FAST_TANH,
            USE_TMA, WARP_SPEC, EVEN_D, UPCAST, HEAD_DIM, BLOCK_N, BLOCK_D, POS_SCALE,
        )  # fmt: skip

    empty = l_i == 0.0  # rows that saw no key: output 0, lse +inf
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(
        empty, float("inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453
    )
    lse_ptrs = LSE + b64 * s_lb + h.to(tl.int64) * s_lh + q_start + offs_m
    tl.store(lse_ptrs, lse, mask=offs_m < seqlen_q)
    out = out.to(O.dtype.element_ty)
    if USE_TMA and not IS_VARLEN:  # (a packed sequence may be empty: no descriptor of it)
        desc_o = tl.make_tensor_descriptor(o_base, shape=[seqlen_q, HEAD_DIM], strides=[s_os, 1],
                                           block_shape=[BLOCK_M, BLOCK_D])  # fmt: skip
        desc_o.store([m0, 0], out)
    else:
        tl.store(o_base + offs_m.to(tl.int64)[:, None] * s_os + offs_d[None, :], out, mask=qmask)


@triton.jit(do_not_specialize=["BATCH", "MAX_BLOCKS", "N_OUT", "LEFT"])
def varlen_tiles_kernel(CU_Q, CU_K, TILES, BATCH, MAX_BLOCKS, N_OUT, LEFT,
                        HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                        BLOCK_M: tl.constexpr, SIZE: tl.constexpr):  # fmt: skip
    """The query tiles of a packed batch, costliest first: ``TILES[r]`` = (sequence << 16) |
    query block, for ranks r < N_OUT; -1 where no tile is left. A tile's cost is the keys it
    streams (its sequence's, cut by the causal diagonal or the window), so the long tiles start
    in the first wave and the short ones fill the last (longest-processing-time-first), and no
    program is launched for the empty blocks past a short sequence's end."""
    idx = tl.arange(0, SIZE)
    b = idx // MAX_BLOCKS
    j = idx % MAX_BLOCKS
    inb = b < BATCH
    b_in = tl.minimum(b, BATCH - 1)  # pairs past the batch read its last sequence, unused
    _, seqlen_q = seq_span(CU_Q, b_in, 0, True)
    _, seqlen_k = seq_span(CU_K, b_in, 0, True)
    valid = inb & (j * BLOCK_M < seqlen_q)
    diag = seqlen_k - seqlen_q
    hi = seqlen_k
    if HAS_RIGHT:  # causal: the block's last row sees keys up to its diagonal
        hi = tl.minimum(hi, tl.maximum((j + 1) * BLOCK_M + diag, 0))
    lo = hi * 0
    if HAS_LEFT:
        lo = tl.minimum(tl.maximum(j * BLOCK_M + diag - LEFT, 0), hi)
    cost = (hi - lo).to(tl.int64) + 1  # + 1: a tile that sees no key still runs
    key = tl.where(valid, (cost << 24) | idx.to(tl.int64), -1)
    key = tl.sort(key, descending=True)
    pos = (key & 0xFFFFFF).to(tl.int32)
    tile = tl.where(key >= 0, ((pos // MAX_BLOCKS) << 16) | (pos % MAX_BLOCKS), -1)
    tl.store(TILES + idx, tile, mask=idx < N_OUT)


#: Most (sequence, query block) pairs :func:`varlen_tiles_kernel` sorts in its one program;
#: larger packed batches take the two-dimensional grid.
MAX_SCHEDULED_TILES = 4096


def varlen_tiles(cu_q, cu_k, batch: int, max_q: int, total_q: int, block_m: int, left: int,
                 right: int):  # fmt: skip
    """``(tiles, count)``: the device table of :func:`varlen_tiles_kernel` for a packed batch
    (no host sync: its length bounds the real tiles, sum(ceil(len / block_m)) <= total / block_m
    + batch), or None when the batch is empty or has too many tiles to sort in one program."""
    import torch

    max_blocks = triton.cdiv(max_q, block_m)
    pairs = batch * max_blocks
    if batch == 0 or pairs > MAX_SCHEDULED_TILES or pairs >= 1 << 24 or max_blocks >= 1 << 16:
        return None
    count = min(pairs, triton.cdiv(total_q, block_m) + batch)
    tiles = torch.empty(count, dtype=torch.int32, device=cu_q.device)
    varlen_tiles_kernel[(1,)](
        cu_q, cu_k, tiles, batch, max_blocks, count, max(left, 0),
        HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0, BLOCK_M=block_m,
        SIZE=max(16, triton.next_power_of_2(pairs)),
    )  # fmt: skip
    return tiles, count


def launch_fwd(
    q, k, v, o, lse, cu_q, cu_k, strides, hq: int, group: int, batch: int, max_q: int,
    seq_q: int, seq_k: int, left: int, right: int, scale: float, softcap: float,
    head_dim: int, cfg, interpret: bool, varlen: bool,
) -> None:  # fmt: skip
    """Launch :func:`fmha_fwd_kernel` (``strides``: the 20 strides it takes, in order). A
    packed batch runs its tiles costliest first (:func:`varlen_tiles`) unless the config is
    warp-specialized (whose programs cannot exit early) or the batch has too many tiles."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    cap = softcap if softcap > 0 else 1.0
    grid = (triton.cdiv(max_q, cfg.block_m), batch * hq)
    sched = None
    if varlen and not cfg.warp_spec:
        sched = varlen_tiles(cu_q, cu_k, batch, max_q, q.shape[0], cfg.block_m, left, right)
    tiles = None
    if sched is not None:
        tiles, count = sched
        grid = (count * hq,)
    fmha_fwd_kernel[grid](
        q, k, v, o, lse, cu_q, cu_k, *strides,
        hq, group, seq_q, seq_k, max(left, 0), max(right, 0),
        scale * LOG2E, scale / cap, cap * LOG2E,
        HEAD_DIM=head_dim, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d,
        HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0, SOFTCAP=softcap > 0,
        FAST_TANH=not interpret, IS_VARLEN=varlen, USE_TMA=cfg.tma, WARP_SPEC=cfg.warp_spec,
        UPCAST=interpret, REVERSE=right >= 0,
        EVEN_N=not varlen and left < 0 and right < 0 and seq_k % cfg.block_n == 0,
        POS_SCALE=scale > 0, TILES=tiles, SCHED=tiles is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
