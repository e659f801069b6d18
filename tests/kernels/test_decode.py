"""fmha_decode, append_kv and mla_decode against a float64 math reference (the torch backend on
float64 copies): contiguous and paged caches with shuffled pages, per-sequence lengths, GQA
ratios, several new tokens, split-KV slices, softcap and window, bad input."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import kernforge as kf
from kernforge import config, ops
from kernforge.errors import ArgumentError, DTypeError, ShapeError, UnsupportedError
from kernforge.kernels import decode
from tests.helpers import DEVICE, DTYPES, assert_close, f64, reference, sizes


def _lens(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


def make_cache(bsz, cap, heads, dim, dtype, page_size=None, spare_pages=3):
    """Random K and V caches of capacity ``cap`` per sequence: contiguous [B, cap, H, D], or
    paged [pages, page_size, H, D] with a block table of shuffled pages (plus unused ones)."""
    if page_size is None:
        k = torch.randn(bsz, cap, heads, dim, device=DEVICE).to(dtype)
        v = torch.randn(bsz, cap, heads, dim, device=DEVICE).to(dtype)
        return k, v, None
    per_seq = -(-cap // page_size)
    pages = bsz * per_seq + spare_pages
    k = torch.randn(pages, page_size, heads, dim, device=DEVICE).to(dtype)
    v = torch.randn(pages, page_size, heads, dim, device=DEVICE).to(dtype)
    perm = torch.randperm(pages, device=DEVICE)[: bsz * per_seq]
    return k, v, perm.view(bsz, per_seq).to(torch.int32)


def check_decode(q, k, v, lens, block_table=None, tol_scale=1.0, **kw):
    """ops.fmha_decode on Triton against the float64 reference."""
    with kf.backend("triton"):
        out = ops.fmha_decode(q, k, v, lens, block_table, **kw)
    qd, kd, vd = f64(q, k, v)
    want = reference(ops.fmha_decode, qd, kd, vd, lens, block_table, **kw)
    assert out.dtype == q.dtype
    assert_close(out, want, q.dtype, "fmha_decode", tol_scale)
    return out


#: (batch, Sq, Hq, Hk, D, lengths per sequence). Lengths include odd ones and 1; the GPU adds
#: the issue's 1000 and 4097 and the production head dims.
CASES = sizes(
    cpu=[
        (3, 1, 4, 2, 32, [1, 7, 37]),
        (2, 3, 4, 4, 24, [5, 30]),  # MHA, non-power-of-two head dim, 3 new tokens
        (2, 1, 6, 1, 16, [19, 3]),  # MQA, 6 heads per group
        (1, 3, 8, 1, 16, [12]),  # 24 query rows per group: two row chunks (16 per program)
    ],
    gpu=[
        (4, 1, 32, 8, 128, [1, 7, 1000, 4097]),
        (3, 3, 16, 2, 64, [4097, 1000, 7]),
        (2, 1, 8, 8, 256, [4097, 1]),
        (2, 8, 64, 4, 128, [1000, 4097]),  # 128 query rows per group: two row chunks
    ],
)


@pytest.mark.parametrize("paged", [None, 16], ids=["contiguous", "paged"])
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fmha_decode_matches_reference(case, paged, dtype):
    bsz, sq, hq, hk, d, lens = case
    cap = max(lens) + 5
    k, v, bt = make_cache(bsz, cap, hk, d, dtype, paged)
    q = torch.randn(bsz, sq, hq, d, device=DEVICE).to(dtype)
    check_decode(q, k, v, _lens(lens), bt)


@pytest.mark.parametrize("splits", [2, 5, 64], ids=lambda s: f"splits{s}")
@pytest.mark.parametrize("paged", [None, 8], ids=["contiguous", "paged"])
def test_fmha_decode_split_kv_combine(splits, paged):
    """Forced KV slices (the combine kernel), including more slices than key blocks (empty
    slices) and a zero-length sequence (zeros)."""
    dtype = torch.float16
    k, v, bt = make_cache(3, 50, 2, 32, dtype, paged)
    q = torch.randn(3, 2, 4, 32, device=DEVICE).to(dtype)
    lens = _lens([50, 1, 0])
    a = decode._Attn(q, None, k, None, v, lens, bt, 32**-0.5, None, None, False)
    out = decode.decode_attention(a, splits=splits)
    want = reference(ops.fmha_decode, *f64(q, k, v), lens, bt)
    assert_close(out, want, dtype, f"splits={splits}")
    # Sequence 2 has no keys; sequence 1 has one key, which only its last new token sees.
    assert torch.count_nonzero(out[2]) == 0 and torch.count_nonzero(out[1, 0]) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "kw",
    [
        {"softcap": 3.0},
        {"window": 9},
        {"window": (0, 0)},  # each query sees itself only
        {"window": (4, -1), "softcap": 1.5},
        {"scale": 0.3, "softcap": 0.0},
    ],
    ids=str,
)
def test_fmha_decode_softcap_window_scale(kw, dtype):
    k, v, bt = make_cache(2, 40, 2, 32, dtype, 16)
    q = torch.randn(2, 3, 4, 32, device=DEVICE).to(dtype)
    check_decode(q, k, v, _lens([40, 13]), bt, **kw)


def test_reference_semantics_independent():
    """The torch reference itself, against SDPA with an explicit mask (float64): new token i of
    a sequence of length L sits at L - Sq + i and sees keys up to itself, ``left`` back; with
    ``window=0`` a query sees only its own key, so the output is that key's value."""
    bsz, sq, hq, hk, d, n = 2, 3, 4, 2, 8, 12
    q = torch.randn(bsz, sq, hq, d, dtype=torch.float64)
    k = torch.randn(bsz, n, hk, d, dtype=torch.float64)
    v = torch.randn(bsz, n, hk, d, dtype=torch.float64)
    lens = torch.tensor([12, 7], dtype=torch.int32)
    got = decode.fmha_decode_torch(q, k, v, lens, window=4)
    for b, length in enumerate(lens.tolist()):
        pos = torch.arange(length - sq, length)[:, None]
        j = torch.arange(length)[None, :]
        mask = (j <= pos) & (j >= pos - 4)
        kk = k[b, :length].repeat_interleave(hq // hk, 1).transpose(0, 1)
        vv = v[b, :length].repeat_interleave(hq // hk, 1).transpose(0, 1)
        want = torch.nn.functional.scaled_dot_product_attention(
            q[b].transpose(0, 1), kk, vv, attn_mask=mask
        ).transpose(0, 1)
        torch.testing.assert_close(got[b], want)
    with kf.backend("triton"):
        qf, kf_, vf = (t.float().to(DEVICE) for t in (q, k, v))
        own = ops.fmha_decode(qf, kf_, vf, lens.to(DEVICE), window=0)
    for b, length in enumerate(lens.tolist()):
        for i in range(sq):
            want = v[b, length - sq + i].repeat_interleave(hq // hk, 0).float()
            torch.testing.assert_close(own[b, i].cpu(), want)


@pytest.mark.parametrize("paged", [None, 8], ids=["contiguous", "paged"])
def test_reference_ignores_unwritten_slots(paged):
    """Cache slots past each sequence's length may hold NaN or inf (the LLM's cache is
    torch.empty): neither the torch reference nor the kernel lets them into the output."""
    k, v, bt = make_cache(2, 24, 2, 16, torch.float32, paged)
    lens = _lens([9, 24])
    q = torch.randn(2, 1, 4, 16, device=DEVICE)
    want = reference(ops.fmha_decode, q, k, v, lens, bt)
    kg, vg = decode.gather_cache(k, bt), decode.gather_cache(v, bt)  # views when contiguous
    for c, g in ((k, kg), (v, vg)):
        g = g.clone()
        g[0, 9:] = float("nan")
        g[0, 10:] = float("inf")
        if bt is None:
            c.copy_(g)
        else:  # scatter back through the block table
            c[bt.long()] = g.view(2, -1, 8, *c.shape[2:])
    for name in ("torch", "triton"):
        with kf.backend(name):
            got = ops.fmha_decode(q, k, v, lens, bt)
        assert_close(got, want, torch.float32, f"{name} with NaN/inf past the lengths")


def test_fmha_decode_strided_views():
    """q as a slice of a fused qkv tensor, K and V as views into one [B, S, 2, Hk, D] cache:
    read in place through their strides."""
    dtype = torch.bfloat16
    qkv = torch.randn(2, 1, 4 + 2 * 2, 32, device=DEVICE).to(dtype)
    q = qkv[:, :, :4]
    kv = torch.randn(2, 33, 2, 2, 32, device=DEVICE).to(dtype)
    k, v = kv[:, :, 0], kv[:, :, 1]
    assert not q.is_contiguous() and not k.is_contiguous()
    check_decode(q, k, v, _lens([33, 20]))


@pytest.mark.parametrize("paged", [None, 4], ids=["contiguous", "paged"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_append_kv_then_decode(paged, dtype):
    """Prefill a cache with append_kv (5 tokens), then decode steps of 1 and 3 new tokens,
    appending each step's K/V first: the caches match the torch append bit for bit, the
    attention matches the reference over everything appended."""
    bsz, hq, hk, d, cap = 2, 4, 2, 16, 24
    k, v, bt = make_cache(bsz, cap, hk, d, dtype, paged)
    k_ref, v_ref = k.clone(), v.clone()
    lens = _lens([0, 3])  # sequence 1 already holds 3 tokens
    for sn in (5, 1, 3):
        kn = torch.randn(bsz, sn, hk, d, device=DEVICE).to(dtype)
        vn = torch.randn(bsz, sn, hk, d, device=DEVICE).to(dtype)
        with kf.backend("triton"):
            assert ops.append_kv(kn, vn, k, v, lens, bt) is None
        reference(ops.append_kv, kn, vn, k_ref, v_ref, lens, bt)
        assert torch.equal(k, k_ref) and torch.equal(v, v_ref), f"append of {sn} tokens"
        lens = lens + sn
        q = torch.randn(bsz, sn, hq, d, device=DEVICE).to(dtype)
        check_decode(q, k, v, lens, bt)


def test_append_kv_strided_new_and_latent():
    """New K/V as strided views; a 3-D latent cache ([B, S, D], as MLA's) appended in place."""
    dtype = torch.float32
    kvn = torch.randn(2, 2, 2, 3, 8, device=DEVICE).to(dtype)
    kn, vn = kvn[:, :, 0], kvn[:, :, 1]  # [B, Sn, H=3, D=8], not contiguous
    k, v, _ = make_cache(2, 10, 3, 8, dtype)
    k_ref, v_ref = k.clone(), v.clone()
    lens = _lens([4, 8])
    with kf.backend("triton"):
        ops.append_kv(kn, vn, k, v, lens)
    reference(ops.append_kv, kn, vn, k_ref, v_ref, lens)
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
    ckv = torch.randn(2, 10, 24, device=DEVICE)
    kpe = torch.randn(2, 10, 8, device=DEVICE)
    c_ref, p_ref = ckv.clone(), kpe.clone()
    cn, pn = torch.randn(2, 1, 24, device=DEVICE), torch.randn(2, 1, 8, device=DEVICE)
    with kf.backend("triton"):
        ops.append_kv(cn, pn, ckv, kpe, lens)
    reference(ops.append_kv, cn, pn, c_ref, p_ref, lens)
    assert torch.equal(ckv, c_ref) and torch.equal(kpe, p_ref)


#: MLA (batch, Sq, heads, Dc, Dr, lengths): DeepSeek's 512 + 64 on the GPU.
MLA_CASES = sizes(
    cpu=[(2, 1, 4, 64, 16, [1, 37]), (1, 3, 3, 32, 16, [21])],
    gpu=[(3, 1, 16, 512, 64, [4097, 1000, 7]), (2, 2, 128, 512, 64, [1000, 4097])],
)


def _rope_step(bsz, hq, hk, d, cap, dtype, paged, lens, norm):
    """Inputs of a rope_append_fmha_decode step: a fused q/k/v row per sequence (a view with
    padded rows), rope tables, caches whose new-token slots hold NaN (so a kernel that reads
    them before writing them fails), lengths before the token and the q/k norm weights."""
    from kernforge.llm.config import preset
    from kernforge.llm.model import rope_tables

    k, v, bt = make_cache(bsz, cap, hk, d, dtype, paged)
    lens = _lens(lens)
    nan = torch.full((bsz, 1, hk, d), float("nan"), device=DEVICE, dtype=dtype)
    with kf.backend("torch"):
        ops.append_kv(nan, nan, k, v, lens, bt)
    cfg = preset("tiny").replace(num_heads=hq, num_kv_heads=hk, head_dim=d)
    cos, sin = rope_tables(cfg, cap, dtype, DEVICE)
    qkv = torch.randn(bsz, (hq + 2 * hk) * d + 5, device=DEVICE).to(dtype)[:, :-5]
    qn = kn = None
    if norm:
        qn, kn = (1 + 0.1 * torch.randn(d, device=DEVICE)).to(dtype), \
            (1 + 0.1 * torch.randn(d, device=DEVICE)).to(dtype)  # fmt: skip
    return qkv, cos, sin, lens, k, v, bt, qn, kn


def check_rope_step(args, hq, dtype, splits=None, **kw):
    """rope_append_fmha_decode on Triton (or its kernel with forced ``splits``) against the
    float64 reference: the output, and both caches after the append."""
    qkv, cos, sin, lens, k, v, bt, qn, kn = args
    want_k, want_v = f64(k, v)
    want = reference(ops.rope_append_fmha_decode, *f64(qkv, cos, sin), lens, want_k, want_v, hq,
                     bt, *f64(qn, kn), **kw)  # fmt: skip
    if splits is None:
        with kf.backend("triton"):
            out = ops.rope_append_fmha_decode(qkv, cos, sin, lens, k, v, hq, bt, qn, kn, **kw)
    else:
        d = k.shape[-1]
        q = qkv[:, : hq * d].view(qkv.shape[0], 1, hq, d)
        rope = decode._Rope(cos, sin, qn, kn, 1e-6)
        a = decode._Attn(q, None, k, None, v, lens, bt, d**-0.5, None, None, False, rope)
        out = decode.decode_attention(a, splits=splits)[:, 0]
    assert out.dtype == dtype
    assert_close(out, want, dtype, "rope_append_fmha_decode", 2.0)
    assert_close(k, want_k, dtype, "k_cache")
    assert_close(v, want_v, dtype, "v_cache")


#: (batch, Hq, Hk, D, cache capacity, lengths before the new token).
ROPE_CASES = sizes(
    cpu=[(3, 4, 2, 32, 48, [0, 7, 40]), (2, 6, 1, 24, 40, [19, 3]), (1, 2, 2, 16, 20, [19])],
    gpu=[
        (4, 12, 2, 128, 4100, [0, 130, 1000, 4096]),
        (2, 32, 8, 128, 600, [511, 17]),
        (3, 16, 4, 64, 300, [299, 1, 64]),
    ],  # fmt: skip
)


@pytest.mark.parametrize("norm", [False, True], ids=["plain", "qk_norm"])
@pytest.mark.parametrize("paged", [None, 16], ids=["contiguous", "paged"])
@pytest.mark.parametrize("case", ROPE_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rope_append_fmha_decode_matches_reference(case, paged, norm, dtype):
    """The fused step against rope_append_kv then fmha_decode in float64: lengths 0, odd, one
    short of the capacity; GQA and MQA; head dims 16-128; Qwen3's q/k norm."""
    bsz, hq, hk, d, cap, lens = case
    args = _rope_step(bsz, hq, hk, d, cap, dtype, paged, lens, norm)
    check_rope_step(args, hq, dtype)


@pytest.mark.parametrize("splits", [2, 3, 7], ids=lambda s: f"splits{s}")
@pytest.mark.parametrize("paged", [None, 8], ids=["contiguous", "paged"])
def test_rope_append_fmha_decode_splits(splits, paged):
    """The program that appends is the one whose KV slice holds the new token, wherever that
    slice is; the other slices do not read the token's slot (its NaN would show)."""
    args = _rope_step(3, 4, 2, 32, 50, torch.bfloat16, paged, [49, 20, 0], norm=True)
    check_rope_step(args, 4, torch.bfloat16, splits=splits)


@pytest.mark.parametrize("kw", [{"window": 5}, {"window": (0, 0)}, {"scale": 0.3}], ids=str)
def test_rope_append_fmha_decode_window_scale(kw):
    args = _rope_step(2, 4, 2, 16, 32, torch.float32, 16, [31, 9], norm=False)
    check_rope_step(args, 4, torch.float32, **kw)


def test_rope_append_fmha_decode_bad_input(check_indices):
    qkv, cos, sin, lens, k, v, bt, _, _ = _rope_step(2, 4, 2, 16, 32, torch.float16, None,
                                                     [3, 31], norm=False)  # fmt: skip
    op = ops.rope_append_fmha_decode
    with pytest.raises(ShapeError, match="rope_append_fmha_decode: qkv has"):
        op(qkv[:, :-16], cos, sin, lens, k, v, 4)
    with pytest.raises(ArgumentError, match="num_heads"):
        op(qkv, cos, sin, lens, k, v, 3)
    with pytest.raises(ArgumentError, match="together"):
        op(qkv, cos, sin, lens, k, v, 4, q_norm=torch.ones(16, device=DEVICE))
    with pytest.raises(ArgumentError, match="scale"):
        op(qkv, cos, sin, lens, k, v, 4, scale=-1.0)
    with pytest.raises(ArgumentError, match="window"):
        op(qkv, cos, sin, lens, k, v, 4, window=-2)
    with pytest.raises(ShapeError, match="too short"):
        op(qkv, cos, sin, _lens([3, 32]), k, v, 4)
    with pytest.raises(DTypeError, match="one dtype|same dtype|dtype"):
        op(qkv.float(), cos, sin, lens, k, v, 4)


def test_rope_append_fmha_decode_opcheck():
    """The custom op's schema (it mutates the caches), fake tensor and torch.compile paths."""
    qkv, cos, sin, lens, k, v, bt, qn, kn = _rope_step(2, 4, 2, 16, 32, torch.float16, 16,
                                                       [3, 20], norm=True)  # fmt: skip
    torch.library.opcheck(decode.rope_append_fmha_decode_op,
                          (qkv, cos, sin, lens, k, v, 4, bt, qn, kn, 1e-6, 0.25, None))  # fmt: skip


@pytest.mark.gpu
def test_rope_append_fmha_decode_cuda_graph():
    """Captured once, replayed over several steps with the lengths advanced in place: each
    replay appends its token and attends to everything appended so far."""
    dtype, hq = torch.bfloat16, 12
    qkv, cos, sin, lens, k, v, bt, qn, kn = _rope_step(2, hq, 2, 128, 300, dtype, 16,
                                                       [100, 7], norm=True)  # fmt: skip
    k_ref, v_ref = f64(k, v)
    with kf.backend("triton"):
        ops.rope_append_fmha_decode(qkv, cos, sin, lens, k, v, hq, bt, qn, kn)  # compile, tune
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = ops.rope_append_fmha_decode(qkv, cos, sin, lens, k, v, hq, bt, qn, kn)
    for _ in range(3):
        qkv.copy_(torch.randn_like(qkv))
        graph.replay()
        want = reference(ops.rope_append_fmha_decode, *f64(qkv, cos, sin), lens, k_ref, v_ref,
                         hq, bt, *f64(qn, kn))  # fmt: skip
        assert_close(out, want, dtype, "graph replay", 2.0)
        assert_close(k, k_ref, dtype, "k_cache")
        lens += 1


@pytest.mark.parametrize("paged", [None, 16], ids=["contiguous", "paged"])
@pytest.mark.parametrize("case", MLA_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mla_decode_matches_reference(case, paged, dtype):
    bsz, sq, h, dc, dr, lens = case
    cap = max(lens) + 3
    ckv, kpe, bt = make_cache(bsz, cap, 1, dc, dtype, paged)
    ckv = ckv[:, :, 0]
    kpe = torch.randn(*ckv.shape[:2], dr, device=DEVICE).to(dtype)
    qn = torch.randn(bsz, sq, h, dc, device=DEVICE).to(dtype)
    qr = torch.randn(bsz, sq, h, dr, device=DEVICE).to(dtype)
    scale = (128 + 64) ** -0.5
    with kf.backend("triton"):
        out = ops.mla_decode(qn, qr, ckv, kpe, _lens(lens), bt, scale=scale)
    want = reference(ops.mla_decode, *f64(qn, qr, ckv, kpe), _lens(lens), bt, scale=scale)
    assert out.dtype == dtype
    assert_close(out, want, dtype, "mla_decode")


def test_mla_decode_split_and_fused_cache():
    """Forced KV slices, and ckv/kpe as the two parts of one [pages, page, 576]-style cache."""
    dtype = torch.bfloat16
    kv = torch.randn(9, 8, 48 + 16, device=DEVICE).to(dtype)
    ckv, kpe = kv[..., :48], kv[..., 48:]
    bt = torch.randperm(9, device=DEVICE)[:8].view(2, 4).to(torch.int32)
    qn = torch.randn(2, 1, 4, 48, device=DEVICE).to(dtype)
    qr = torch.randn(2, 1, 4, 16, device=DEVICE).to(dtype)
    lens = _lens([32, 9])
    a = decode._Attn(qn, qr, ckv[:, :, None], kpe[:, :, None], ckv[:, :, None], lens, bt,
                     0.125, None, None, True)  # fmt: skip
    out = decode.decode_attention(a, splits=3)
    want = reference(ops.mla_decode, *f64(qn, qr, ckv, kpe), lens, bt, scale=0.125)
    assert_close(out, want, dtype, "mla split")


def test_plan_splits():
    """One sequence fills the GPU (about one program per SM); a batch that fills it alone runs
    unsplit; slices are never shorter than min_blocks key blocks."""
    cfg = decode.DecodeConfig(block_n=64, programs_per_sm=1, min_blocks=2)
    assert decode.plan_splits(8, 512, 132, cfg) == 17  # B=1, Hk=8, 32k keys
    assert decode.plan_splits(8, 16, 132, cfg) == 8  # B=1, 1k keys: 8 slices of 2 blocks
    assert decode.plan_splits(8, 3, 132, cfg) == 1  # too short to split
    assert decode.plan_splits(128, 512, 132, cfg) == 1  # B=16: 128 programs fill 132 SMs
    assert decode.plan_splits(64, 512, 132, cfg) == 3
    wide = dataclasses.replace(cfg, programs_per_sm=4)
    assert decode.plan_splits(1, 10**6, 132, wide) == decode.MAX_SPLITS


# ---------------------------------------------------------------------------------------------
# Bad input: a clear kernforge error before any kernel runs
# ---------------------------------------------------------------------------------------------


def _inputs(paged=False):
    k, v, bt = make_cache(2, 16, 2, 16, torch.float16, 8 if paged else None)
    q = torch.randn(2, 1, 4, 16, device=DEVICE).to(torch.float16)
    return q, k, v, _lens([16, 3]), bt


@pytest.fixture
def check_indices(monkeypatch):
    monkeypatch.setattr(config, "settings",
                        dataclasses.replace(config.settings, check_indices=True))  # fmt: skip


def test_fmha_decode_bad_input(check_indices):
    q, k, v, lens, _ = _inputs()
    with pytest.raises(ShapeError, match="head dims differ"):
        ops.fmha_decode(q[..., :8], k, v, lens)
    with pytest.raises(ShapeError, match="must divide query heads"):
        ops.fmha_decode(torch.randn(2, 1, 3, 16, device=DEVICE).half(), k, v, lens)
    with pytest.raises(DTypeError, match="one dtype"):
        ops.fmha_decode(q.float(), k, v, lens)
    with pytest.raises(DTypeError, match="int32"):
        ops.fmha_decode(q, k, v, lens.long())
    with pytest.raises(ShapeError, match="cache_seqlens"):
        ops.fmha_decode(q, k, v, lens[:1])
    with pytest.raises(ShapeError, match="too short"):
        ops.fmha_decode(q, k, v, _lens([17, 3]))
    with pytest.raises(ShapeError, match="v_cache"):
        ops.fmha_decode(q, k, v[:, :8], lens)
    with pytest.raises(ShapeError, match="contiguous"):
        ops.fmha_decode(q, k[:1], v[:1], lens)
    with pytest.raises(ShapeError, match="4-D"):
        ops.fmha_decode(q[0], k, v, lens)
    with pytest.raises(ArgumentError, match="window"):
        ops.fmha_decode(q, k, v, lens, window=-2)
    with pytest.raises(ArgumentError, match="softcap"):
        ops.fmha_decode(q, k, v, lens, softcap=-1.0)


def test_fmha_decode_bad_block_table(check_indices):
    q, k, v, lens, bt = _inputs(paged=True)
    with pytest.raises(DTypeError, match="block_table must be int32"):
        ops.fmha_decode(q, k, v, lens, bt.long())
    with pytest.raises(ShapeError, match="block_table must be"):
        ops.fmha_decode(q, k, v, lens, bt[0])
    with pytest.raises(ShapeError, match="block_table must be"):
        ops.fmha_decode(q, k, v, lens, bt[:1])
    bad = bt.clone()
    bad[0, 1] = k.shape[0]  # one past the last page
    with pytest.raises(ShapeError, match=r"block_table\[0, 1\]"):
        ops.fmha_decode(q, k, v, lens, bad)
    bad = bt.clone()
    bad[1, 1] = -5  # an unused entry (sequence 1 holds 3 tokens: one page) is not checked
    with kf.backend("triton"):
        ops.fmha_decode(q, k, v, lens, bad)
    with pytest.raises(ShapeError, match="too short"):
        ops.fmha_decode(q, k, v, _lens([17, 3]), bt)


def test_out_of_range_not_read_without_checks(monkeypatch):
    """With KERNFORGE_CHECK_INDICES=0 nothing syncs; a bad page id or an over-long length is
    skipped by the kernel (those keys are not read), never dereferenced."""
    monkeypatch.setattr(config, "settings",
                        dataclasses.replace(config.settings, check_indices=False))  # fmt: skip
    q, k, v, lens, bt = _inputs(paged=True)
    bt[0, 1] = 10**6
    with kf.backend("triton"):
        out = ops.fmha_decode(q, k, v, lens, bt)
    assert torch.isfinite(out).all()
    q, k, v, lens, _ = _inputs()
    with kf.backend("triton"):
        out = ops.fmha_decode(q, k, v, _lens([99, 3]))
    want = reference(ops.fmha_decode, *f64(q, k, v), _lens([16, 3]))
    assert_close(out, want, q.dtype, "clamped to the cache")


def test_append_kv_bad_input(check_indices):
    _, k, v, lens, _ = _inputs()
    kn = torch.randn(2, 2, 2, 16, device=DEVICE).half()
    with pytest.raises(ShapeError, match="too short"):
        ops.append_kv(kn, kn, k, v, _lens([15, 0]))
    with pytest.raises(ShapeError, match="must match k_cache"):
        ops.append_kv(kn[..., :8], kn, k, v, _lens([0, 0]))
    with pytest.raises(DTypeError, match="one dtype"):
        ops.append_kv(kn.float(), kn, k, v, _lens([0, 0]))
    _, kp, vp, _, bt = _inputs(paged=True)
    bad = bt.clone()
    bad[1, 0] = -1
    with pytest.raises(ShapeError, match=r"block_table\[1, 0\]"):
        ops.append_kv(kn, kn, kp, vp, _lens([0, 0]), bad)


def test_mla_decode_bad_input(check_indices):
    qn = torch.randn(1, 1, 2, 32, device=DEVICE)
    qr = torch.randn(1, 1, 2, 8, device=DEVICE)
    ckv, kpe = torch.randn(1, 10, 32, device=DEVICE), torch.randn(1, 10, 8, device=DEVICE)
    with pytest.raises(ShapeError, match="latent dims differ"):
        ops.mla_decode(qn, qr, ckv[..., :16], kpe, _lens([4]))
    with pytest.raises(ShapeError, match="rope dims differ"):
        ops.mla_decode(qn, qr, ckv, kpe[..., :4], _lens([4]))
    with pytest.raises(ShapeError, match="too short"):
        ops.mla_decode(qn, qr, ckv, kpe, _lens([11]))
    with pytest.raises(DTypeError, match="one dtype"):
        ops.mla_decode(qn.half(), qr, ckv, kpe, _lens([4]))


def test_gradients_fall_back():
    """The Triton kernels are inference-only: with gradients requested the op runs the torch
    reference (differentiable), or raises when the fallback is forbidden (kernel tests)."""
    q, k, v, lens, _ = _inputs()
    q = q.float().requires_grad_()
    with kf.backend("triton"), pytest.raises(UnsupportedError, match="inference-only"):
        ops.fmha_decode(q, k.float(), v.float(), lens)


@pytest.mark.gpu
def test_fmha_decode_cuda_graph(monkeypatch):
    """A decode step captured in a CUDA graph (index checks skip themselves while capturing)
    replays correctly after the cache and lengths change in place."""
    dtype = torch.bfloat16
    k, v, bt = make_cache(4, 2048, 8, 128, dtype, 64)
    q = torch.randn(4, 1, 32, 128, device=DEVICE).to(dtype)
    lens = _lens([2048, 1, 700, 1500])
    with kf.backend("triton"):
        ops.fmha_decode(q, k, v, lens, bt)  # warm-up: compile and tune outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = ops.fmha_decode(q, k, v, lens, bt)
    lens.copy_(_lens([5, 2000, 64, 1023]))
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    want = reference(ops.fmha_decode, *f64(q, k, v), lens, bt)
    assert_close(out, want, dtype, "graph replay")


@pytest.mark.gpu
def test_tuner_measures_in_graphs():
    """The tuner times each candidate config in CUDA-graph replays and picks one of them; the
    picked config computes the same answer."""
    from kernforge import tune

    dtype = torch.bfloat16
    k, v, bt = make_cache(2, 3000, 2, 64, dtype, 32)
    q = torch.randn(2, 1, 8, 64, device=DEVICE).to(dtype)
    lens = _lens([3000, 1234])
    a = decode._Attn(q, None, k, None, v, lens, bt, 0.125, None, None, False)
    with tune.forcing():
        cfg = decode._pick(a)
    assert cfg in decode.MHA_TUNER.configs
    want = reference(ops.fmha_decode, *f64(q, k, v), lens, bt, scale=0.125)
    assert_close(decode.decode_attention(a, cfg), want, dtype, f"tuned {cfg}")
