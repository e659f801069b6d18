"""Decode attention over a KV cache: flash-decoding (split-KV) for GQA/MQA heads and for MLA
(DeepSeek-V2 latent attention), contiguous or paged caches, and ``append_kv``. Triton kernels,
input validation, torch references.

One kernel serves both ops. A program takes one sequence ``b``, one KV head and all the query
rows that read it (the ``G = Hq / Hk`` query heads of the group times the ``Sq`` new tokens, up
to ``max_rows`` rows; more are split into row chunks), and one of ``splits`` equal slices of
that sequence's keys. K and V are therefore read from HBM once per group, not once per query
head. Each slice runs the online softmax over ``block_n`` keys at a time (scores and softmax
state in fp32) and writes its normalised partial output and log-sum-exp (base 2); a second
kernel combines the slices. With one slice the first kernel writes the output directly.

The number of slices comes from the work and the SM count (:func:`plan_splits`): enough
programs to fill the GPU when ``B * Hk`` alone does not, each slice at least
``min_blocks`` key blocks long. It is planned on the host from the cache's *capacity*, so no
device value is read (no sync, CUDA-graph safe); inside the kernel each sequence divides its
own length over the slices, so short sequences in a long cache still spread evenly.

Positions: ``cache_seqlens[b]`` counts the keys of sequence ``b`` including the ``Sq`` new
tokens, which sit at positions ``L - Sq .. L - 1``; query ``i`` sees keys ``j <= L - Sq + i``
(causal among the new tokens), and with ``window=left`` (as ``ops.fmha``) only
``j >= L - Sq + i - left``. Inside, the window is carried as a key count ``W = left + 1``.

Paged caches are ``[num_pages, page_size, Hk, D]`` with ``block_table[b, p]`` the page that
holds positions ``p * page_size ..`` of sequence ``b``; the kernel gathers each key's page.
Entries it would read outside the table or the cache are skipped, never dereferenced (the
host check under ``KERNFORGE_CHECK_INDICES=1`` reports them as errors first).

``rope_append_fmha_decode`` runs the same kernel from a decode step's fused q/k/v projection
(``ROPE``): each program normalizes (Qwen3's q/k norm) and rotates its q rows and the new key,
attends to the cached keys and then to the new key from registers, and the program whose
slice holds the new token writes its key and value to the cache. The lengths, the rope rows
and the slice's first block of cached keys and values are read before the dependent launch
waits for the projection: their memory latency hides under it (Qwen2.5-1.5B batch-1 decode:
docs/llm.md).

MLA (``mla_decode``): one latent "KV head" shared by all query heads; scores are
``q_abs . ckv + q_rope . kpe`` and the output is ``softmax @ ckv`` (the latent; the caller
applies ``W_UV``). The same kernel runs it with ``HAS_PE`` (the rope part) and ``SHARED_KV``
(the latent tile loaded for the scores is reused as V: read once). Open work, measured on an
H100 (docs/decode.md): with 128 heads MLA is compute-bound at ~85-97 TFLOP/s, since Triton runs
these tiles as warp-level MMAs (FlashMLA reaches ~580 with warpgroup MMAs); with 16 heads it
reads 1.2-1.7 TB/s, each 32-key latent tile feeding only 16 query rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .. import checks, device, tune
from ..dispatch import register_impl
from ..errors import ArgumentError, DTypeError, ShapeError
from .common import (
    dependent_start,
    new_output,
    op_call,
    pdl_args,
    triton_reason,
    upcast,
    wants_grad,
)
from .rope_append import norm_rope

LOG2E = 1.4426950408889634
#: dtypes of the caches and queries the Triton kernels take.
DECODE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Most KV slices per sequence (the combine kernel loops over them).
MAX_SPLITS = 128
LOG2E_C: tl.constexpr = tl.constexpr(LOG2E)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _tanh(x):
    # tanh through the sigmoid: exact in fp32, and the interpreter has no tanh of its own.
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _key_slots(b64, offs_n, n_ok, BT, s_bt, max_pages, num_pages, page_size, PAGED: tl.constexpr):
    """``(page, slot, ok)`` of keys ``offs_n`` of sequence ``b``: a cache row sits at
    ``page * stride_page + slot * stride_token`` (contiguous caches: page = b). A key whose page
    entry lies outside the table or the cache is masked, never read."""
    if PAGED:
        page_idx = offs_n // page_size
        ok = n_ok & (page_idx < max_pages)
        page = tl.load(BT + b64 * s_bt + page_idx, mask=ok, other=0)
        ok = ok & (page >= 0) & (page < num_pages)
        return page.to(tl.int64), (offs_n % page_size).to(tl.int64), ok
    slot = offs_n.to(tl.int64)
    return slot * 0 + b64, slot, n_ok  # both branches return vectors (Triton needs one type)


@triton.jit
def _kv_tile(
    K, K2, V, b64, kvh, offs_n, n_ok, skip, BT, s_bt, max_pages, num_pages, page_size,
    s_kp, s_kt, s_kh, s_k2p, s_k2t, s_k2h, s_vp, s_vt, s_vh, offs_d, d_ok, offs_d2, d2_ok,
    offs_dv, dv_ok, PAGED: tl.constexpr, HAS_PE: tl.constexpr, SHARED_KV: tl.constexpr,
):  # fmt: skip
    """Keys ``offs_n`` of the cache: K, K2 (MLA's rope part; else K again) and V tiles and
    which keys exist there. Key ``skip`` (the token being appended, held in registers) is
    neither read nor counted."""
    page, slot, n_ok = _key_slots(b64, offs_n, n_ok, BT, s_bt, max_pages, num_pages, page_size,
                                  PAGED)  # fmt: skip
    ld = n_ok & (offs_n != skip)
    k = tl.load(K + (page * s_kp + slot * s_kt + kvh * s_kh)[:, None] + offs_d[None, :],
                mask=ld[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
    k2 = k
    if HAS_PE:
        k2 = tl.load(K2 + (page * s_k2p + slot * s_k2t + kvh * s_k2h)[:, None] + offs_d2[None, :],
                     mask=ld[:, None] & d2_ok[None, :], other=0.0)  # fmt: skip
    v = k  # MLA: the latent is both K (with the rope part) and V
    if not SHARED_KV:
        v = tl.load(V + (page * s_vp + slot * s_vt + kvh * s_vh)[:, None] + offs_dv[None, :],
                    mask=ld[:, None] & dv_ok[None, :], other=0.0)  # fmt: skip
    return k, k2, v, ld


@triton.jit
def _log2_scores(s, scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """Raw scores q.k as the base-2 logits of the softmax (scaled, soft-capped)."""
    if HAS_SOFTCAP:
        return softcap * _tanh(s * (scale / softcap)) * LOG2E_C
    return s * (scale * LOG2E_C)


@triton.jit
def _attend(
    q, q2, k, k2, v, offs_n, n_ok, qpos, m_i, l_i, acc, scale, softcap, window,
    HAS_PE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """One block of keys ``offs_n`` (``n_ok``: they exist) in the online softmax of query rows
    at positions ``qpos``: the running max ``m_i``, sum ``l_i`` and output ``acc`` after it."""
    keep = n_ok[None, :] & (offs_n[None, :] <= qpos[:, None])
    if HAS_WINDOW:
        keep = keep & (offs_n[None, :] > qpos[:, None] - window)
    if UPCAST:
        k, k2, v = k.to(tl.float32), k2.to(tl.float32), v.to(tl.float32)
    s = _dot(q, tl.trans(k), IEEE)
    if HAS_PE:
        s += _dot(q2, tl.trans(k2), IEEE)
    s = tl.where(keep, _log2_scores(s, scale, softcap, HAS_SOFTCAP), float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key yet: no NaN from -inf
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
    return m_new, l_i, acc


@triton.jit
def _decode_kernel(
    Q, Q2, K, K2, V, Seqlens, BT, Opart, Lpart, Out, Cos, Sin, QN, KN,
    Sq, G, R, HK, RC, n_keys_cap, max_pages, num_pages, page_size,
    s_qb, s_qs, s_qh, s_q2b, s_q2s, s_q2h,
    s_kp, s_kt, s_kh, s_k2p, s_k2t, s_k2h, s_vp, s_vt, s_vh,
    s_bt, s_ob, s_os, s_oh, s_cos,
    scale, softcap, window, eps,
    D: tl.constexpr, D2: tl.constexpr, DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_DV: tl.constexpr,
    PAGED: tl.constexpr, HAS_PE: tl.constexpr, SHARED_KV: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr, DIRECT: tl.constexpr,
    ROPE: tl.constexpr, NORM: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr = False,
):  # fmt: skip
    # With ROPE the lengths, the rope tables and the slice's first block of cached keys and
    # values are read *before* waiting for the previous kernel (the q/k/v projection, under
    # PDL), so that their latency hides under it: the decoder writes none of them there.
    if not ROPE:
        dependent_start(PDL)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rc = pid % RC  # row chunks of one group run next to each other: they share K/V in L2
    bh = pid // RC
    kvh = bh % HK
    b = bh // HK
    b64 = b.to(tl.int64)

    L = tl.load(Seqlens + b)
    if ROPE:
        L += 1  # Seqlens counts the keys before the new token, which this kernel appends
    pos_new = L - 1  # with ROPE, the new token's position (held in registers, not read)
    if not ROPE:
        pos_new = -1
    if not PAGED:
        L = tl.minimum(L, n_keys_cap)  # never read past a contiguous cache's end
    rows = rc * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    s_idx = rows // G
    head = kvh * G + rows % G
    qpos = L - Sq + s_idx  # each query row's own position

    # Keys any row can see: [kstart, L). A window drops the keys before the earliest row's.
    kstart = 0
    if HAS_WINDOW:
        kstart = tl.maximum(L - Sq - window + 1, 0)
        kstart = (kstart // BLOCK_N) * BLOCK_N  # block-aligned: the mask takes the rest
    n_keys = tl.maximum(L - kstart, 0)
    chunk = tl.cdiv(tl.cdiv(n_keys, n_splits), BLOCK_N) * BLOCK_N
    lo = kstart + split * chunk
    hi = tl.minimum(lo + chunk, L)

    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    offs_d2 = tl.arange(0, BLOCK_D2)
    d2_ok = offs_d2 < D2
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < DV
    if ROPE:
        cs = tl.load(Cos + pos_new.to(tl.int64) * s_cos + offs_d, mask=d_ok, other=0.0)
        sn = tl.load(Sin + pos_new.to(tl.int64) * s_cos + offs_d, mask=d_ok, other=0.0)
        page_n, slot_n, ok_n = _key_slots(b64, pos_new + offs_d * 0, d_ok, BT, s_bt, max_pages,
                                          num_pages, page_size, PAGED)  # fmt: skip
        new_ok = (pos_new >= lo) & (pos_new < hi) & (tl.max(ok_n.to(tl.int32), 0) > 0)
        offs_0 = lo + tl.arange(0, BLOCK_N)
        k_0, k2_0, v_0, ok_0 = _kv_tile(
            K, K2, V, b64, kvh, offs_0, offs_0 < hi, pos_new, BT, s_bt, max_pages, num_pages,
            page_size, s_kp, s_kt, s_kh, s_k2p, s_k2t, s_k2h, s_vp, s_vt, s_vh, offs_d, d_ok,
            offs_d2, d2_ok, offs_dv, dv_ok, PAGED, HAS_PE, SHARED_KV,
        )  # fmt: skip
        dependent_start(PDL)

    q_off = b64 * s_qb + s_idx.to(tl.int64)[:, None] * s_qs + head.to(tl.int64)[:, None] * s_qh
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + q_off + offs_d[None, :], mask=q_mask, other=0.0)
    if ROPE:
        # Q rows are the q heads of a fused q/k/v projection row (k heads, then v heads
        # follow). q and the new key are normalized and rotated here; the program whose
        # slice holds the new token attends to it from registers and writes its key and
        # value to the cache for later steps.
        cs, sn = cs.to(tl.float32), sn.to(tl.float32)
        q = norm_rope(Q + q_off, q, q_mask, offs_d, cs, sn, QN, eps, D, NORM)
        q = q.to(Q.dtype.element_ty)
        k_src = Q + b64 * s_qb + (HK * G + kvh).to(tl.int64) * s_qh
        k_new = tl.load(k_src + offs_d[None, :], mask=d_ok[None, :], other=0.0)
        k_new = norm_rope(k_src, k_new, d_ok[None, :], offs_d, cs, sn, KN, eps, D, NORM)
        k_new = k_new.to(K.dtype.element_ty)  # [1, BLOCK_D]
        v_new = tl.load(k_src + HK * s_qh + offs_d, mask=d_ok, other=0.0)
        v_new = v_new.to(V.dtype.element_ty)
        if new_ok:
            k_dst = K + page_n * s_kp + slot_n * s_kt + kvh * s_kh + offs_d
            tl.store(k_dst[None, :], k_new, mask=ok_n[None, :])
            tl.store(V + page_n * s_vp + slot_n * s_vt + kvh * s_vh + offs_d, v_new, mask=ok_n)
    if UPCAST:
        q = q.to(tl.float32)
    q2 = q
    if HAS_PE:
        q2_off = (b64 * s_q2b + s_idx.to(tl.int64)[:, None] * s_q2s
                  + head.to(tl.int64)[:, None] * s_q2h)  # fmt: skip
        q2 = tl.load(Q2 + q2_off + offs_d2[None, :], mask=row_ok[:, None] & d2_ok[None, :],
                     other=0.0)  # fmt: skip
        if UPCAST:
            q2 = q2.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    first = lo
    if ROPE:
        m_i, l_i, acc = _attend(q, q2, k_0, k2_0, v_0, offs_0, ok_0, qpos, m_i, l_i, acc, scale,
                                softcap, window, HAS_PE, HAS_SOFTCAP, HAS_WINDOW, UPCAST,
                                IEEE)  # fmt: skip
        first = lo + BLOCK_N
    for start in range(first, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k, k2, v, n_ok = _kv_tile(
            K, K2, V, b64, kvh, offs_n, offs_n < hi, pos_new, BT, s_bt, max_pages, num_pages,
            page_size, s_kp, s_kt, s_kh, s_k2p, s_k2t, s_k2h, s_vp, s_vt, s_vh, offs_d, d_ok,
            offs_d2, d2_ok, offs_dv, dv_ok, PAGED, HAS_PE, SHARED_KV,
        )  # fmt: skip
        m_i, l_i, acc = _attend(q, q2, k, k2, v, offs_n, n_ok, qpos, m_i, l_i, acc, scale,
                                softcap, window, HAS_PE, HAS_SOFTCAP, HAS_WINDOW, UPCAST,
                                IEEE)  # fmt: skip
    if ROPE:  # the new token, the newest key: a rank-1 update from registers
        s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32), 1)
        s_new = _log2_scores(s_new, scale, softcap, HAS_SOFTCAP)
        s_new = tl.where(row_ok & new_ok, s_new, float("-inf"))
        m_new = tl.maximum(m_i, s_new)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s_new - m_safe)
        l_i = l_i * alpha + p
        acc = acc * alpha[:, None] + p[:, None] * v_new.to(tl.float32)[None, :]
        m_i = m_new

    has = l_i > 0.0
    out = acc / tl.where(has, l_i, 1.0)[:, None]  # a row with no key gives zeros
    o_mask = row_ok[:, None] & dv_ok[None, :]
    if DIRECT:
        o_off = b64 * s_ob + s_idx.to(tl.int64)[:, None] * s_os + head.to(tl.int64)[:, None] * s_oh
        tl.store(Out + o_off + offs_dv[None, :], out.to(Out.dtype.element_ty), mask=o_mask)
    else:
        hq = HK * G
        prow = ((b64 * Sq + s_idx) * hq + head) * n_splits + split
        tl.store(Opart + prow[:, None] * DV + offs_dv[None, :], out, mask=o_mask)
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(Lpart + prow, lse, mask=row_ok)


@triton.jit
def _combine_kernel(
    Opart, Lpart, Out, Sq, HQ, n_splits, s_ob, s_os, s_oh,
    DV: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr, PDL: tl.constexpr = False,
):  # fmt: skip
    """Out[row] = sum_s w_s * O_s with w_s = 2^(lse_s - lse), over one row's KV slices."""
    dependent_start(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    lse = tl.load(Lpart + row * n_splits + offs_s, mask=offs_s < n_splits, other=float("-inf"))
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    denom = tl.sum(tl.exp2(lse - m_safe), 0)
    inv = 1.0 / tl.where(denom > 0.0, denom, 1.0)  # no key at all: zeros
    offs_d = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < DV
    acc = tl.zeros([BLOCK_DV], tl.float32)
    for s in range(0, n_splits):
        w = tl.exp2(tl.load(Lpart + row * n_splits + s) - m_safe) * inv
        o = tl.load(Opart + (row * n_splits + s) * DV + offs_d, mask=d_ok, other=0.0)
        acc += w * o
    b = row // (Sq * HQ)
    si = (row // HQ) % Sq
    h = row % HQ
    tl.store(Out + b * s_ob + si * s_os + h * s_oh + offs_d, acc.to(Out.dtype.element_ty),
             mask=d_ok)  # fmt: skip


@triton.jit
def _append_one(
    New, Cache, b64, i, page, slot_ok, slot, HN, s_nb, s_ns, s_nh, s_cp, s_ct, s_ch,
    D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    offs_d = tl.arange(0, BLOCK_D)
    for h0 in range(0, HN, BLOCK_H):
        heads = h0 + tl.arange(0, BLOCK_H)
        m = slot_ok & (heads < HN)[:, None] & (offs_d < D)[None, :]
        src = b64 * s_nb + i * s_ns + heads.to(tl.int64)[:, None] * s_nh + offs_d[None, :]
        dst = page * s_cp + slot * s_ct + heads.to(tl.int64)[:, None] * s_ch + offs_d[None, :]
        tl.store(Cache + dst, tl.load(New + src, mask=m), mask=m)


@triton.jit
def _append_kernel(
    KN, VN, KC, VC, Seqlens, BT, Sn, HKN, HVN, cap, max_pages, num_pages, page_size, s_bt,
    s_knb, s_kns, s_knh, s_kcp, s_kct, s_kch,
    s_vnb, s_vns, s_vnh, s_vcp, s_vct, s_vch,
    DK: tl.constexpr, DV: tl.constexpr, PAGED: tl.constexpr,
    BLOCK_HK: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_HV: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """Write token ``i`` of sequence ``b``'s new K and V at position ``cache_seqlens[b] + i``."""
    pid = tl.program_id(0)
    b = pid // Sn
    i = pid % Sn
    b64 = b.to(tl.int64)
    pos = tl.load(Seqlens + b) + i
    ok = (pos >= 0) & (pos < cap)  # out of the cache: not written (the host check reports it)
    if PAGED:
        page = tl.load(BT + b64 * s_bt + pos // page_size, mask=ok, other=0)
        ok = ok & (page >= 0) & (page < num_pages)
        page = page.to(tl.int64)
        slot = (pos % page_size).to(tl.int64)
    else:
        page = b64
        slot = pos.to(tl.int64)
    _append_one(KN, KC, b64, i, page, ok, slot, HKN, s_knb, s_kns, s_knh, s_kcp, s_kct, s_kch,
                DK, BLOCK_HK, BLOCK_DK)  # fmt: skip
    _append_one(VN, VC, b64, i, page, ok, slot, HVN, s_vnb, s_vns, s_vnh, s_vcp, s_vct, s_vch,
                DV, BLOCK_HV, BLOCK_DV)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Launch planning
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeConfig:
    """Launch shape of the split-KV decode kernel."""

    block_n: int = 64  # keys per loop step
    num_warps: int = 4
    num_stages: int = 3  # software-pipelining depth of the K/V loads
    max_rows: int = 64  # query rows (group heads x new tokens) per program; more: row chunks
    programs_per_sm: int = 1  # split until this many programs per SM (when B * Hk is less)
    min_blocks: int = 2  # fewest key blocks per slice: shorter slices cost more than they fill


#: Defaults, used with KERNFORGE_TUNE=off (the tuner measures the candidates below). Chosen
#: from the tuner's CUDA-graph timings on an H100 (bf16, 32/8 heads of 128, batch 1-64,
#: 1k-32k keys, contiguous and paged; docs/decode.md): 128-key blocks, 4 warps, 3 stages and
#: about one program per SM came within 9% of the best candidate at every shape (within 3%
#: at all but two), while 64-key blocks, the best at some contiguous shapes, ran paged caches
#: up to 1.8x slower. MLA: 16 rows x 4 warps for few heads (124 us at B=16 x 8k x 16 heads,
#: the best); 64 rows x 8 warps when 64+ query rows share the latent (428 us vs 675 us with
#: 32 rows at 128 heads: the latent tile feeds twice the rows). Head dim 256 takes smaller
#: tiles (shared memory; not measured), and so does float32 (128 x 128 fp32 tiles in 3 stages
#: need 272 KiB of shared memory, over sm_90's 227; 64-key blocks need 140). Under the
#: interpreter programs run one after another: small key blocks keep the tests crossing block
#: edges.
DEFAULT_MHA = DecodeConfig(block_n=128, num_warps=4, num_stages=3)
DEFAULT_MHA_FP32 = DecodeConfig(block_n=64, num_warps=4, num_stages=3)
DEFAULT_MHA_256 = DecodeConfig(block_n=32, num_warps=4, num_stages=2)
DEFAULT_MLA = DecodeConfig(block_n=32, num_warps=4, num_stages=2, max_rows=16)
DEFAULT_MLA_WIDE = DecodeConfig(block_n=32, num_warps=8, num_stages=2, max_rows=64)
INTERPRET_CONFIG = DecodeConfig(block_n=16, num_warps=1, num_stages=1, max_rows=16,
                                programs_per_sm=1, min_blocks=1)  # fmt: skip
#: A program is "filling" the GPU at this fraction of programs_per_sm * SMs: no split then.
FULL_FRACTION = 0.75

#: Candidates the tuner measures once per shape bucket on a GPU (in CUDA-graph replays, so
#: that host launch time does not swamp the few-microsecond kernels).
MHA_CONFIGS = [
    DecodeConfig(block_n=bn, num_warps=w, num_stages=st, programs_per_sm=pps)
    for bn, w, st, pps in (
        (64, 4, 3, 1), (64, 4, 3, 2), (64, 4, 4, 1), (64, 8, 3, 1), (64, 4, 3, 4),
        (128, 4, 3, 1), (128, 8, 3, 1), (128, 4, 2, 1), (32, 4, 4, 1), (32, 4, 4, 2),
    )
]  # fmt: skip
MLA_CONFIGS = [
    DecodeConfig(block_n=bn, num_warps=w, num_stages=st, max_rows=rows, programs_per_sm=pps)
    for bn, w, st, rows, pps in (
        (32, 8, 2, 32, 1), (32, 8, 3, 32, 1), (64, 8, 2, 32, 1), (32, 8, 2, 16, 1),
        (16, 4, 2, 16, 1), (32, 4, 2, 16, 1), (32, 8, 2, 32, 2), (32, 8, 2, 64, 1),
    )
]  # fmt: skip
MHA_TUNER = tune.Tuner(
    "fmha_decode", configs=MHA_CONFIGS + [DEFAULT_MHA, DEFAULT_MHA_256], version="2"
)
MLA_TUNER = tune.Tuner(
    "mla_decode", configs=MLA_CONFIGS + [DEFAULT_MLA, DEFAULT_MLA_WIDE], version="2"
)


def plan_splits(programs: int, key_blocks: int, sms: int, cfg: DecodeConfig) -> int:
    """KV slices per sequence: enough that ``programs * splits`` fills ``programs_per_sm``
    programs on every SM, with each slice at least ``min_blocks`` key blocks long; none when
    the programs already fill FULL_FRACTION of that.

    ``key_blocks`` is the cache capacity in blocks (the most keys a sequence can have).
    """
    target = sms * cfg.programs_per_sm
    if programs >= FULL_FRACTION * target or key_blocks < 2 * cfg.min_blocks:
        return 1
    by_fill = -(-target // programs)
    by_len = max(1, key_blocks // cfg.min_blocks)
    return max(1, min(by_fill, by_len, MAX_SPLITS))


@dataclass(frozen=True)
class _Rope:
    """``rope_append_fmha_decode``'s extra inputs: the rope tables and Qwen3's q/k norms."""

    cos: torch.Tensor  # [positions, D]
    sin: torch.Tensor
    q_norm: torch.Tensor | None  # [D]
    k_norm: torch.Tensor | None
    eps: float


@dataclass(frozen=True)
class _Attn:
    """One decode-attention call, normalised: MHA/GQA and MLA share the kernel."""

    q: torch.Tensor  # [B, Sq, Hq, D]
    q2: torch.Tensor | None  # [B, Sq, Hq, D2] (MLA rope part)
    k: torch.Tensor  # [B or pages, S or page, Hk, D]
    k2: torch.Tensor | None
    v: torch.Tensor  # [.., Hk, DV]; k itself for MLA
    seqlens: torch.Tensor
    block_table: torch.Tensor | None
    scale: float
    softcap: float | None
    window: int | None
    shared_kv: bool
    #: Set: q holds the q heads of a fused q/k/v row (one new token per sequence, its k and v
    #: after them) and ``seqlens`` the lengths before it; the kernel normalizes and rotates q
    #: and k, attends to the new key from registers and appends it and v to the cache
    #: (``rope_append_fmha_decode``).
    rope: _Rope | None = None


def _capacity(k: torch.Tensor, block_table: torch.Tensor | None) -> int:
    """Most keys a sequence can hold in this cache."""
    return k.shape[1] if block_table is None else block_table.shape[1] * k.shape[1]


def _launch(a: _Attn, cfg: DecodeConfig, splits: int | None = None) -> torch.Tensor:
    q, k, v = a.q, a.k, a.v
    bsz, sq, hq, d = q.shape
    hk, dv = k.shape[2], v.shape[-1]
    g = hq // hk
    rows = sq * g
    out = new_output((bsz, sq, hq, dv), q.dtype, q.device)
    if out.numel() == 0:
        return out
    block_m = max(16, triton.next_power_of_2(min(rows, cfg.max_rows)))
    rc = triton.cdiv(rows, block_m)
    programs = bsz * hk * rc
    cap = _capacity(k, a.block_table)
    if splits is None:
        sms = device.num_sms(q.device.index or 0)
        splits = plan_splits(programs, triton.cdiv(cap, cfg.block_n), sms, cfg)
    splits = max(1, min(int(splits), MAX_SPLITS))
    direct = splits == 1
    if direct:
        opart = lpart = out  # unused placeholders
    else:
        opart = torch.empty((bsz * sq * hq, splits, dv), dtype=torch.float32, device=q.device)
        lpart = torch.empty((bsz * sq * hq, splits), dtype=torch.float32, device=q.device)
    paged = a.block_table is not None
    bt = a.block_table if paged else a.seqlens
    q2 = a.q2 if a.q2 is not None else q
    k2 = a.k2 if a.k2 is not None else k
    d2 = q2.shape[-1] if a.q2 is not None else 16
    r = a.rope
    norm = r is not None and r.q_norm is not None
    cos, sin = (r.cos, r.sin) if r is not None else (q, q)
    qn, kn = (r.q_norm, r.k_norm) if norm else (q, q)
    _decode_kernel[(programs, splits)](
        q, q2, k, k2, v, a.seqlens, bt, opart, lpart, out, cos, sin, qn, kn,
        sq, g, rows, hk, rc, k.shape[1], bt.shape[-1] if paged else 1, k.shape[0],
        k.shape[1] if paged else 1,
        q.stride(0), q.stride(1), q.stride(2), q2.stride(0), q2.stride(1), q2.stride(2),
        k.stride(0), k.stride(1), k.stride(2), k2.stride(0), k2.stride(1), k2.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        bt.stride(0) if paged else 0, out.stride(0), out.stride(1), out.stride(2), cos.stride(0),
        float(a.scale), float(a.softcap or 1.0), int(a.window or 0), r.eps if r else 0.0,
        D=d, D2=d2, DV=dv, BLOCK_M=block_m, BLOCK_N=cfg.block_n,
        BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_D2=max(16, triton.next_power_of_2(d2)),
        BLOCK_DV=max(16, triton.next_power_of_2(dv)),
        PAGED=paged, HAS_PE=a.q2 is not None, SHARED_KV=a.shared_kv,
        HAS_SOFTCAP=a.softcap is not None, HAS_WINDOW=a.window is not None, DIRECT=direct,
        ROPE=r is not None, NORM=norm, UPCAST=device.INTERPRET, IEEE=q.dtype == torch.float32,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_args(),
    )  # fmt: skip
    if not direct:
        block_dv = triton.next_power_of_2(dv)
        _combine_kernel[(bsz * sq * hq,)](
            opart, lpart, out, sq, hq, splits, out.stride(0), out.stride(1), out.stride(2),
            DV=dv, BLOCK_S=max(2, triton.next_power_of_2(splits)), BLOCK_DV=block_dv,
            num_warps=max(1, min(4, block_dv // 128)), **pdl_args(),
        )  # fmt: skip
    return out


def _pick(a: _Attn) -> DecodeConfig:
    """The launch config: tuned once per shape bucket on a GPU, a fixed one elsewhere."""
    if device.INTERPRET:
        return INTERPRET_CONFIG
    q, k = a.q, a.k
    bsz, sq, hq, d = q.shape
    hk = k.shape[2]
    if a.shared_kv:
        wide = sq * (hq // hk) >= DEFAULT_MLA_WIDE.max_rows
        tuner, default = MLA_TUNER, (DEFAULT_MLA_WIDE if wide else DEFAULT_MLA)
    else:
        tuner, default = MHA_TUNER, DEFAULT_MHA_256 if d > 128 else DEFAULT_MHA
        if d <= 128 and q.dtype == torch.float32:
            default = DEFAULT_MHA_FP32
    key = (tune.bucket(bsz * hk), tune.bucket(_capacity(k, a.block_table)), sq * (hq // hk), d,
           a.v.shape[-1], q.dtype, a.block_table is not None)  # fmt: skip
    return tuner.pick(key, lambda cfg: _launch(a, cfg), default)


def decode_attention(a: _Attn, cfg: DecodeConfig | None = None,
                     splits: int | None = None) -> torch.Tensor:  # fmt: skip
    """Run the split-KV kernel (and the combine) for ``a``; ``cfg``/``splits`` override the
    planned launch (tests, sweeps)."""
    return _launch(a, cfg or _pick(a), splits)


def append_cache(k_new, v_new, k_cache, v_cache, cache_seqlens, block_table) -> None:
    """Launch the append kernel: one program per new token, K and V together."""
    bsz, sn = k_new.shape[:2]
    if bsz * sn == 0:
        return
    paged = block_table is not None
    bt = block_table if paged else cache_seqlens
    hkn, dk = k_new.shape[2], k_new.shape[3]
    hvn, dv = v_new.shape[2], v_new.shape[3]
    bdk, bdv = triton.next_power_of_2(dk), triton.next_power_of_2(dv)
    cap = _capacity(k_cache, block_table)
    _append_kernel[(bsz * sn,)](
        k_new, v_new, k_cache, v_cache, cache_seqlens, bt, sn, hkn, hvn, cap,
        bt.shape[-1] if paged else 1, k_cache.shape[0], k_cache.shape[1] if paged else 1,
        bt.stride(0) if paged else 0,
        *k_new.stride()[:3], *k_cache.stride()[:3], *v_new.stride()[:3], *v_cache.stride()[:3],
        DK=dk, DV=dv, PAGED=paged,
        BLOCK_HK=min(triton.next_power_of_2(hkn), max(1, 4096 // bdk)), BLOCK_DK=bdk,
        BLOCK_HV=min(triton.next_power_of_2(hvn), max(1, 4096 // bdv)), BLOCK_DV=bdv,
        num_warps=4,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Input validation (called by the public ops in kernforge.ops before any backend runs)
# ----------------------------------------------------------------------------------------------


def _tensor(op: str, name: str, x, dims: tuple[int, ...]) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in dims:
        want = " or ".join(f"{d}-D" for d in dims)
        raise ShapeError(f"{op}: {name} must be {want}, got shape {tuple(x.shape)}")


def _float(op: str, name: str, x: torch.Tensor) -> None:
    if not x.dtype.is_floating_point:
        raise DTypeError(
            f"{op}: {name} has dtype {x.dtype}; expected float16, bfloat16 or float32 "
            "(float64 on the torch backend)"
        )


def _same(op: str, what: str, **tensors: torch.Tensor | None) -> None:
    given = {k: v for k, v in tensors.items() if v is not None}
    dtypes = {v.dtype for v in given.values()}
    if len(dtypes) > 1:
        listed = ", ".join(f"{k}={v.dtype}" for k, v in given.items())
        raise DTypeError(f"{op}: {what} must share one dtype, got {listed}. Cast them to match.")


def _index_tensor(op: str, name: str, x, shape: tuple[int, ...], what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.int32:
        raise DTypeError(f"{op}: {name} must be int32 ({what}), got {x.dtype}; pass {name}.int()")
    if tuple(x.shape) != shape:
        raise ShapeError(f"{op}: {name} has shape {tuple(x.shape)}, expected {shape} ({what})")


def _check_cache_indices(op: str, cache: torch.Tensor, seqlens: torch.Tensor,
                         block_table: torch.Tensor | None, extra: int = 0) -> None:  # fmt: skip
    """Every sequence's ``cache_seqlens + extra`` keys fit the cache; every page they use is a
    page of the cache. Syncs: run only under KERNFORGE_CHECK_INDICES=1."""
    if seqlens.numel() == 0:
        return
    ends = seqlens.long() + extra
    lo, hi = int(seqlens.min()), int(ends.max())
    off = "(set KERNFORGE_CHECK_INDICES=0 to skip this check, which syncs the device)"
    if lo < 0:
        raise ShapeError(f"{op}: cache_seqlens has a negative length ({lo}) {off}")
    cap = _capacity(cache, block_table)
    if hi > cap:
        kind = (f"{block_table.shape[1]} pages of {cache.shape[1]} tokens" if block_table
                is not None else f"{cache.shape[1]} positions")  # fmt: skip
        raise ShapeError(
            f"{op}: the cache is too short: a sequence needs {hi} positions but the cache holds "
            f"{cap} ({kind}). Grow the cache or fix cache_seqlens {off}"
        )
    if block_table is None:
        return
    ps = cache.shape[1]
    used = (ends + ps - 1) // ps  # pages each sequence touches
    cols = torch.arange(block_table.shape[1], device=block_table.device)
    live = cols[None, :] < used[:, None]
    bad = live & ((block_table < 0) | (block_table >= cache.shape[0]))
    if bool(bad.any()):
        b, p = (int(i) for i in bad.nonzero()[0])
        raise ShapeError(
            f"{op}: block_table[{b}, {p}] = {int(block_table[b, p])} is out of range: the cache "
            f"has {cache.shape[0]} pages (valid page ids 0..{cache.shape[0] - 1}) {off}"
        )


def _check_block_table(op: str, block_table, bsz: int, cache: torch.Tensor) -> None:
    if block_table is None:
        return
    if not isinstance(block_table, torch.Tensor):
        raise TypeError(f"{op}: block_table must be a torch.Tensor or None")
    if block_table.dim() != 2 or block_table.shape[0] != bsz:
        raise ShapeError(
            f"{op}: block_table must be [batch={bsz}, max_pages] (page ids per sequence), got "
            f"shape {tuple(block_table.shape)}"
        )
    if block_table.dtype != torch.int32:
        raise DTypeError(
            f"{op}: block_table must be int32, got {block_table.dtype}; pass block_table.int()"
        )


def _cache_batch(op: str, name: str, cache: torch.Tensor, bsz: int, paged: bool) -> None:
    if not paged and cache.shape[0] != bsz:
        raise ShapeError(
            f"{op}: a contiguous {name} is [batch={bsz}, max_seq, ...], got shape "
            f"{tuple(cache.shape)}; for a paged cache [num_pages, page_size, ...] pass block_table"
        )


def normalize_window(op: str, window) -> int | None:
    """The number of keys a query sees (itself included), or None for all. ``window`` follows
    ``ops.fmha``: an int ``left`` or a ``(left, right)`` pair (right is moot: decode is
    causal), -1 meaning unbounded; a query at position p sees keys ``p - left .. p``."""
    if window is None:
        return None
    if isinstance(window, tuple | list) and len(window) == 2:
        left = window[0]
        ok = all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window)
    else:
        left = window
        ok = isinstance(window, int) and not isinstance(window, bool) and window >= -1
    if not ok:
        raise ArgumentError(
            f"{op}: window={window!r}; use None, an int left size or a (left, right) pair of "
            "ints >= 0, -1 meaning unbounded (a query at p sees keys p - left .. p)"
        )
    return None if left == -1 else left + 1


def check_scalars(op: str, scale, softcap) -> None:
    """Raise ArgumentError unless ``scale`` and ``softcap`` are None or finite and positive."""
    if scale is not None and (not isinstance(scale, int | float) or isinstance(scale, bool)
                              or not math.isfinite(scale) or scale <= 0):  # fmt: skip
        raise ArgumentError(f"{op}: scale={scale!r}; pass a finite float > 0 or None")
    if softcap is not None and (not isinstance(softcap, int | float) or isinstance(softcap, bool)
                                or not math.isfinite(softcap) or softcap < 0):  # fmt: skip
        raise ArgumentError(f"{op}: softcap={softcap!r}; pass a finite float > 0, or None/0")


def check_fmha_decode(q, k_cache, v_cache, cache_seqlens, block_table, scale, softcap,
                      window) -> None:  # fmt: skip
    """Raise a kernforge error for bad ``fmha_decode`` input (see ``ops.fmha_decode``)."""
    op = "fmha_decode"
    _tensor(op, "q", q, (4,))
    _tensor(op, "k_cache", k_cache, (4,))
    _tensor(op, "v_cache", v_cache, (4,))
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        _float(op, name, t)
    _same(op, "q, k_cache and v_cache", q=q, k_cache=k_cache, v_cache=v_cache)
    bsz, _, hq, d = q.shape
    if k_cache.shape[-1] != d:
        raise ShapeError(
            f"{op}: head dims differ: q {tuple(q.shape)} has D={d}, k_cache "
            f"{tuple(k_cache.shape)} has D={k_cache.shape[-1]}"
        )
    if tuple(v_cache.shape[:3]) != tuple(k_cache.shape[:3]):
        raise ShapeError(
            f"{op}: v_cache {tuple(v_cache.shape)} must match k_cache {tuple(k_cache.shape)} "
            "in all but the head dim"
        )
    hk = k_cache.shape[2]
    if hk == 0 or hq % hk:
        raise ShapeError(
            f"{op}: KV heads ({hk}) must divide query heads ({hq}) (GQA groups query heads over "
            "KV heads)"
        )
    paged = block_table is not None
    _check_block_table(op, block_table, bsz, k_cache)
    _cache_batch(op, "k_cache", k_cache, bsz, paged)
    _index_tensor(op, "cache_seqlens", cache_seqlens, (bsz,), "keys per sequence, new included")
    checks.same_device(op, q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens,
                 block_table=block_table)  # fmt: skip
    check_scalars(op, scale, softcap)
    normalize_window(op, window)
    if checks.index_checks_on():
        _check_cache_indices(op, k_cache, cache_seqlens, block_table)


def check_append_kv(k_new, v_new, k_cache, v_cache, cache_seqlens, block_table) -> None:
    """Raise a kernforge error for bad ``append_kv`` input (see ``ops.append_kv``)."""
    op = "append_kv"
    for name, t in (("k_new", k_new), ("v_new", v_new), ("k_cache", k_cache),
                    ("v_cache", v_cache)):  # fmt: skip
        _tensor(op, name, t, (3, 4))
        _float(op, name, t)
    _same(op, "k_new, v_new, k_cache and v_cache", k_new=k_new, v_new=v_new, k_cache=k_cache,
          v_cache=v_cache)  # fmt: skip
    for new, cache, nn, cn in ((k_new, k_cache, "k_new", "k_cache"),
                               (v_new, v_cache, "v_new", "v_cache")):  # fmt: skip
        if new.dim() != cache.dim() or new.shape[2:] != cache.shape[2:]:
            raise ShapeError(
                f"{op}: {nn} {tuple(new.shape)} must match {cn} {tuple(cache.shape)} in its "
                "heads and head dim ([B, Sn, H, D] into [.., H, D]; [B, Sn, D] into [.., D])"
            )
    if k_new.shape[:2] != v_new.shape[:2]:
        raise ShapeError(f"{op}: k_new {tuple(k_new.shape)} and v_new {tuple(v_new.shape)} "
                         "must have the same batch and new-token count")  # fmt: skip
    if k_cache.shape[:2] != v_cache.shape[:2]:
        raise ShapeError(f"{op}: k_cache {tuple(k_cache.shape)} and v_cache "
                         f"{tuple(v_cache.shape)} must have the same first two sizes")  # fmt: skip
    bsz = k_new.shape[0]
    paged = block_table is not None
    _check_block_table(op, block_table, bsz, k_cache)
    _cache_batch(op, "k_cache", k_cache, bsz, paged)
    _index_tensor(op, "cache_seqlens", cache_seqlens, (bsz,), "positions to write at")
    checks.same_device(op, k_new=k_new, v_new=v_new, k_cache=k_cache, v_cache=v_cache,
                 cache_seqlens=cache_seqlens, block_table=block_table)  # fmt: skip
    if checks.index_checks_on():
        _check_cache_indices(op, k_cache, cache_seqlens, block_table, extra=k_new.shape[1])


def check_mla_decode(q_nope, q_rope, ckv_cache, kpe_cache, cache_seqlens, block_table,
                     scale) -> None:  # fmt: skip
    """Raise a kernforge error for bad ``mla_decode`` input (see ``ops.mla_decode``)."""
    op = "mla_decode"
    _tensor(op, "q_nope", q_nope, (4,))
    _tensor(op, "q_rope", q_rope, (4,))
    _tensor(op, "ckv_cache", ckv_cache, (3,))
    _tensor(op, "kpe_cache", kpe_cache, (3,))
    for name, t in (("q_nope", q_nope), ("q_rope", q_rope), ("ckv_cache", ckv_cache),
                    ("kpe_cache", kpe_cache)):  # fmt: skip
        _float(op, name, t)
    _same(op, "queries and caches", q_nope=q_nope, q_rope=q_rope, ckv_cache=ckv_cache,
          kpe_cache=kpe_cache)  # fmt: skip
    if q_rope.shape[:3] != q_nope.shape[:3]:
        raise ShapeError(f"{op}: q_rope {tuple(q_rope.shape)} must match q_nope "
                         f"{tuple(q_nope.shape)} in batch, tokens and heads")  # fmt: skip
    if ckv_cache.shape[-1] != q_nope.shape[-1]:
        raise ShapeError(
            f"{op}: latent dims differ: q_nope {tuple(q_nope.shape)} has Dc={q_nope.shape[-1]}, "
            f"ckv_cache {tuple(ckv_cache.shape)} has Dc={ckv_cache.shape[-1]}"
        )
    if kpe_cache.shape[-1] != q_rope.shape[-1]:
        raise ShapeError(
            f"{op}: rope dims differ: q_rope {tuple(q_rope.shape)} has Dr={q_rope.shape[-1]}, "
            f"kpe_cache {tuple(kpe_cache.shape)} has Dr={kpe_cache.shape[-1]}"
        )
    if kpe_cache.shape[:2] != ckv_cache.shape[:2]:
        raise ShapeError(f"{op}: kpe_cache {tuple(kpe_cache.shape)} must match ckv_cache "
                         f"{tuple(ckv_cache.shape)} in its first two sizes")  # fmt: skip
    bsz = q_nope.shape[0]
    paged = block_table is not None
    _check_block_table(op, block_table, bsz, ckv_cache)
    _cache_batch(op, "ckv_cache", ckv_cache, bsz, paged)
    _index_tensor(op, "cache_seqlens", cache_seqlens, (bsz,), "keys per sequence, new included")
    checks.same_device(op, q_nope=q_nope, q_rope=q_rope, ckv_cache=ckv_cache, kpe_cache=kpe_cache,
                 cache_seqlens=cache_seqlens, block_table=block_table)  # fmt: skip
    check_scalars(op, scale, None)
    if checks.index_checks_on():
        _check_cache_indices(op, ckv_cache, cache_seqlens, block_table)


# ----------------------------------------------------------------------------------------------
# Custom ops (torch.compile sees these) and the registered implementations
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("kernforge::fmha_decode", mutates_args=())
def fmha_decode_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_table: torch.Tensor | None,
    scale: float,
    softcap: float | None,
    window: int | None,
) -> torch.Tensor:
    """Triton split-KV decode attention (see the module docs)."""
    a = _Attn(q, None, k_cache, None, v_cache, cache_seqlens, block_table, scale, softcap,
              window, shared_kv=False)  # fmt: skip
    return decode_attention(a)


@fmha_decode_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, block_table, scale, softcap, window):
    return q.new_empty((*q.shape[:3], v_cache.shape[-1]))


@torch.library.custom_op("kernforge::mla_decode", mutates_args=())
def mla_decode_op(
    q_nope: torch.Tensor,
    q_rope: torch.Tensor,
    ckv_cache: torch.Tensor,
    kpe_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_table: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Triton split-KV MLA decode over the latent cache (see the module docs)."""
    a = _Attn(q_nope, q_rope, ckv_cache[:, :, None], kpe_cache[:, :, None],
              ckv_cache[:, :, None], cache_seqlens, block_table, scale, None, None,
              shared_kv=True)  # fmt: skip
    return decode_attention(a)


@mla_decode_op.register_fake
def _(q_nope, q_rope, ckv_cache, kpe_cache, cache_seqlens, block_table, scale):
    return q_nope.new_empty(q_nope.shape)


@torch.library.custom_op("kernforge::rope_append_fmha_decode", mutates_args=("k_cache", "v_cache"))
def rope_append_fmha_decode_op(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache_seqlens: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    num_heads: int,
    block_table: torch.Tensor | None,
    q_norm: torch.Tensor | None,
    k_norm: torch.Tensor | None,
    eps: float,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """The decode kernel with the new token's q/k norm, rope and cache append in front."""
    d = k_cache.shape[-1]
    q = qkv[:, : num_heads * d].view(qkv.shape[0], 1, num_heads, d)
    a = _Attn(q, None, k_cache, None, v_cache, cache_seqlens, block_table, scale, None, window,
              shared_kv=False, rope=_Rope(cos, sin, q_norm, k_norm, eps))  # fmt: skip
    return decode_attention(a)


@rope_append_fmha_decode_op.register_fake
def _(qkv, cos, sin, cache_seqlens, k_cache, v_cache, num_heads, block_table, q_norm, k_norm,
      eps, scale, window):  # fmt: skip
    return qkv.new_empty((qkv.shape[0], 1, num_heads, k_cache.shape[-1]))


@torch.library.custom_op("kernforge::append_kv", mutates_args=("k_cache", "v_cache"))
def append_kv_op(
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_table: torch.Tensor | None,
) -> None:
    """Triton append of new K/V into the caches, in place."""
    append_cache(k_new, v_new, k_cache, v_cache, cache_seqlens, block_table)


@append_kv_op.register_fake
def _(k_new, v_new, k_cache, v_cache, cache_seqlens, block_table):
    return None


def _last_dim_unit(**tensors: torch.Tensor | None) -> str | None:
    for name, t in tensors.items():
        if t is not None and t.shape[-1] > 1 and t.stride(-1) != 1:
            return f"{name} has last-dim stride {t.stride(-1)} (the kernels read rows in place)"
    return None


def _supports_fmha_decode(q, k_cache, v_cache, cache_seqlens, block_table=None, scale=None,
                          softcap=None, window=None):  # fmt: skip
    reason = triton_reason(q, k_cache, v_cache)
    if reason is None and wants_grad(q, k_cache, v_cache):
        reason = "gradients requested (the Triton decode kernel is inference-only)"
    if reason is None and max(q.shape[-1], v_cache.shape[-1]) > 512:
        reason = f"head dim {q.shape[-1]} > 512"
    return reason or _last_dim_unit(q=q, k_cache=k_cache, v_cache=v_cache)


def _supports_mla_decode(q_nope, q_rope, ckv_cache, kpe_cache, cache_seqlens, block_table=None,
                         scale=None):  # fmt: skip
    reason = triton_reason(q_nope, q_rope, ckv_cache, kpe_cache)
    if reason is None and wants_grad(q_nope, q_rope, ckv_cache, kpe_cache):
        reason = "gradients requested (the Triton decode kernel is inference-only)"
    if reason is None and max(q_nope.shape[-1], q_rope.shape[-1]) > 1024:
        reason = f"latent dim {q_nope.shape[-1]} > 1024"
    return reason or _last_dim_unit(q_nope=q_nope, q_rope=q_rope, ckv_cache=ckv_cache,
                                    kpe_cache=kpe_cache)  # fmt: skip


def _supports_append_kv(k_new, v_new, k_cache, v_cache, cache_seqlens, block_table=None):
    return triton_reason(k_new, v_new, k_cache, v_cache) or _last_dim_unit(
        k_new=k_new, v_new=v_new, k_cache=k_cache, v_cache=v_cache)  # fmt: skip


def _supports_rope_append_fmha_decode(qkv, cos, sin, cache_seqlens, k_cache, v_cache,
                                      num_heads, block_table=None, q_norm=None, k_norm=None,
                                      eps=1e-6, scale=None, window=None):  # fmt: skip
    reason = triton_reason(qkv, cos, sin, k_cache, v_cache, q_norm, k_norm)
    if reason is None and wants_grad(qkv, k_cache, v_cache):
        reason = "gradients requested (the Triton decode kernel is inference-only)"
    if reason is None and k_cache.shape[-1] > 512:
        reason = f"head dim {k_cache.shape[-1]} > 512"
    return reason or _last_dim_unit(qkv=qkv, cos=cos, sin=sin, k_cache=k_cache, v_cache=v_cache)


def default_scale(d: int, scale: float | None) -> float:
    """``scale``, or ``1 / sqrt(d)`` when None."""
    return float(scale) if scale is not None else 1.0 / math.sqrt(d)


@register_impl("fmha_decode", "triton", supports=_supports_fmha_decode)
def fmha_decode_triton(q, k_cache, v_cache, cache_seqlens, block_table=None, scale=None,
                       softcap=None, window=None):  # fmt: skip
    """Triton flash-decoding over a contiguous or paged cache."""
    w = normalize_window("fmha_decode", window)
    sc = default_scale(q.shape[-1], scale)
    return op_call(fmha_decode_op, q, k_cache, v_cache, cache_seqlens, block_table, sc,
                   float(softcap) if softcap else None, w)  # fmt: skip


@register_impl("mla_decode", "triton", supports=_supports_mla_decode)
def mla_decode_triton(q_nope, q_rope, ckv_cache, kpe_cache, cache_seqlens, block_table=None,
                      scale=None):  # fmt: skip
    """Triton MLA decode over the latent cache."""
    sc = default_scale(q_nope.shape[-1] + q_rope.shape[-1], scale)
    return op_call(mla_decode_op, q_nope, q_rope, ckv_cache, kpe_cache, cache_seqlens,
                   block_table, sc)  # fmt: skip


@register_impl("rope_append_fmha_decode", "triton", supports=_supports_rope_append_fmha_decode)
def rope_append_fmha_decode_triton(qkv, cos, sin, cache_seqlens, k_cache, v_cache, num_heads,
                                   block_table=None, q_norm=None, k_norm=None, eps=1e-6,
                                   scale=None, window=None):  # fmt: skip
    """One Triton kernel: q/k norm, rope and cache append in front of the decode attention."""
    w = normalize_window("rope_append_fmha_decode", window)
    sc = default_scale(k_cache.shape[-1], scale)
    out = op_call(rope_append_fmha_decode_op, qkv, cos, sin, cache_seqlens, k_cache, v_cache,
                  num_heads, block_table, q_norm, k_norm, float(eps), sc, w)  # fmt: skip
    return out[:, 0]


def _heads4(x: torch.Tensor) -> torch.Tensor:
    """A [B, S, D] latent tensor as [B, S, 1, D] (one head); 4-D tensors unchanged."""
    return x[:, :, None] if x.dim() == 3 else x


@register_impl("append_kv", "triton", supports=_supports_append_kv)
def append_kv_triton(k_new, v_new, k_cache, v_cache, cache_seqlens, block_table=None):
    """Triton append (one kernel for K and V); returns None."""
    op_call(append_kv_op, _heads4(k_new), _heads4(v_new), _heads4(k_cache), _heads4(v_cache),
            cache_seqlens, block_table)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Torch references: gather the cache, math in fp32 (fp64 for fp64 input)
# ----------------------------------------------------------------------------------------------


def gather_cache(cache: torch.Tensor, block_table: torch.Tensor | None) -> torch.Tensor:
    """The cache as [B, capacity, ...] per sequence: itself (contiguous), or its pages in
    block-table order (entries outside the cache are clamped: masked by the caller)."""
    if block_table is None:
        return cache
    pages = block_table.long().clamp(0, cache.shape[0] - 1)
    g = cache[pages]  # [B, max_pages, page_size, ...]
    return g.reshape(g.shape[0], g.shape[1] * g.shape[2], *g.shape[3:])


def _keep_mask(seqlens, sq: int, n: int, window: int | None, dev) -> torch.Tensor:
    """[B, Sq, n] bool: key j is visible to new token i of sequence b."""
    j = torch.arange(n, device=dev)
    qpos = seqlens.long()[:, None] - sq + torch.arange(sq, device=dev)[None, :]  # [B, Sq]
    keep = j[None, None, :] <= qpos[:, :, None]
    if window is not None:
        keep &= j[None, None, :] > qpos[:, :, None] - window
    return keep


def _softmax_av(scores, keep, v, dtype):
    """softmax over keys of ``scores`` [B, H, Sq, n] where ``keep`` [B, 1, Sq, n], then @ v
    [B, H or 1, n, DV]; rows with no visible key give zeros. Values no row sees are zeroed
    first: cache slots past a sequence's length hold whatever the memory held (NaN/inf too),
    and a zero weight times NaN is NaN."""
    scores = scores.masked_fill(~keep, float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    v = v.masked_fill(~keep.any(dim=2)[..., None], 0.0)
    return (p @ v).to(dtype)


@register_impl("fmha_decode", "torch")
def fmha_decode_torch(q, k_cache, v_cache, cache_seqlens, block_table=None, scale=None,
                      softcap=None, window=None):  # fmt: skip
    """Reference: gather each sequence's keys, softmax(scale * q k^T) v in fp32 with the
    causal (among the new tokens) and window masks."""
    w = normalize_window("fmha_decode", window)
    ct = upcast(q).dtype
    bsz, sq, hq, d = q.shape
    k = gather_cache(k_cache, block_table).to(ct)  # [B, n, Hk, D]
    v = gather_cache(v_cache, block_table).to(ct)
    g = hq // k.shape[2]
    k = k.permute(0, 2, 1, 3).repeat_interleave(g, dim=1)  # [B, Hq, n, D]
    v = v.permute(0, 2, 1, 3).repeat_interleave(g, dim=1)
    qt = q.to(ct).permute(0, 2, 1, 3)  # [B, Hq, Sq, D]
    scores = (qt @ k.transpose(-1, -2)) * default_scale(d, scale)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    keep = _keep_mask(cache_seqlens, sq, k.shape[2], w, q.device)[:, None]
    return _softmax_av(scores, keep, v, q.dtype).permute(0, 2, 1, 3)


@register_impl("mla_decode", "torch")
def mla_decode_torch(q_nope, q_rope, ckv_cache, kpe_cache, cache_seqlens, block_table=None,
                     scale=None):  # fmt: skip
    """Reference: scores = q_nope . ckv + q_rope . kpe, out = softmax(scale * scores) @ ckv."""
    ct = upcast(q_nope).dtype
    sq = q_nope.shape[1]
    ckv = gather_cache(ckv_cache, block_table).to(ct)[:, None]  # [B, 1, n, Dc]
    kpe = gather_cache(kpe_cache, block_table).to(ct)[:, None]
    qn = q_nope.to(ct).permute(0, 2, 1, 3)  # [B, H, Sq, Dc]
    qr = q_rope.to(ct).permute(0, 2, 1, 3)
    sc = default_scale(q_nope.shape[-1] + q_rope.shape[-1], scale)
    scores = (qn @ ckv.transpose(-1, -2) + qr @ kpe.transpose(-1, -2)) * sc
    keep = _keep_mask(cache_seqlens, sq, ckv.shape[2], None, q_nope.device)[:, None]
    return _softmax_av(scores, keep, ckv, q_nope.dtype).permute(0, 2, 1, 3)


@register_impl("append_kv", "torch")
def append_kv_torch(k_new, v_new, k_cache, v_cache, cache_seqlens, block_table=None):
    """Reference: index_put of each new token at ``cache_seqlens[b] + i`` (returns None)."""
    k_new, v_new = _heads4(k_new), _heads4(v_new)
    k_cache, v_cache = _heads4(k_cache), _heads4(v_cache)
    bsz, sn = k_new.shape[:2]
    pos = cache_seqlens.long()[:, None] + torch.arange(sn, device=k_new.device)[None, :]
    if block_table is None:
        rows = torch.arange(bsz, device=k_new.device)[:, None].expand(bsz, sn)
        idx = (rows, pos)
    else:
        ps = k_cache.shape[1]
        idx = (block_table.long().gather(1, pos // ps), pos % ps)
    k_cache[idx] = k_new.to(k_cache.dtype)
    v_cache[idx] = v_new.to(v_cache.dtype)


@register_impl("rope_append_fmha_decode", "torch")
def rope_append_fmha_decode_torch(qkv, cos, sin, cache_seqlens, k_cache, v_cache, num_heads,
                                  block_table=None, q_norm=None, k_norm=None, eps=1e-6,
                                  scale=None, window=None):  # fmt: skip
    """Reference: ``rope_append_kv`` then ``fmha_decode``, both on the torch backend."""
    from .. import ops
    from ..dispatch import backend

    with backend("torch"):
        q = ops.rope_append_kv(qkv, cos, sin, cache_seqlens, k_cache, v_cache, num_heads,
                               block_table, q_norm, k_norm, eps)  # fmt: skip
        o = ops.fmha_decode(q[:, None], k_cache, v_cache, cache_seqlens + 1, block_table, scale,
                            window=window)  # fmt: skip
    return o[:, 0]


def _tune_cli(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """``kernforge tune fmha_decode --shapes BxCTX[xPAGE]``: 32 query / 8 KV heads of 128."""
    bsz, ctx, page = (*shape, 0)[:3]
    dev = torch.device("cuda")
    q = torch.randn(bsz, 1, 32, 128, device=dev).to(dtype)
    if page:
        n = bsz * -(-ctx // page)
        k = torch.randn(n, page, 8, 128, device=dev).to(dtype)
        bt = torch.randperm(n, device=dev).view(bsz, -1).to(torch.int32)
    else:
        k, bt = torch.randn(bsz, ctx, 8, 128, device=dev).to(dtype), None
    lens = torch.full((bsz,), ctx, dtype=torch.int32, device=dev)
    fmha_decode_triton(q, k, torch.randn_like(k), lens, bt)


tune.register_cli("fmha_decode", run=_tune_cli, shapes_help="BATCHxCONTEXT[xPAGE_SIZE]",
                  default_shapes=[(b, c, p) for b in (1, 16, 64) for c in (1024, 8192, 32768)
                                  for p in (0, 64)])  # fmt: skip
