"""ops.fmha and ops.fmha_varlen (flash attention) against the float64 math reference, forward
(out and log-sum-exp) and backward (dq, dk, dv), and their input checks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import kernforge as kf
from kernforge import config, ops
from kernforge.kernels import attention as attn
from tests.helpers import DEVICE, ON_GPU, assert_close, f64, grads, reference

F16, BF16 = torch.float16, torch.bfloat16

#: Backward tolerance over the forward's: dS = P (dP - delta) cancels, and dK/dQ sum many blocks.
GRAD_SCALE = 3.0


def qkv_shape(b, s, h, d, layout):
    return (b, s, h, d) if layout == "bshd" else (b, h, s, d)


def rand(shape, dtype, scale=1.0):
    return (torch.randn(shape, device=DEVICE) * scale).to(dtype).requires_grad_(True)


def check_lse(lse, ref_lse, what="lse"):
    """lse matches where finite (fp32: tight) and is +inf exactly where the reference is."""
    ref_lse = ref_lse.detach().double().cpu()
    lse = lse.detach().double().cpu()
    assert lse.shape == ref_lse.shape, f"{what}: shape {tuple(lse.shape)} != {tuple(ref_lse.shape)}"
    inf = torch.isinf(ref_lse)
    assert (torch.isinf(lse) == inf).all() and (lse[inf] > 0).all(), f"{what}: empty rows differ"
    if (~inf).any():
        err = (lse[~inf] - ref_lse[~inf]).abs().max().item()
        assert err < 2e-3, f"{what}: max abs error {err:.3g}"


def run_fmha(q, k, v, layout="bshd", **kw):
    """ops.fmha on Triton and on the float64 reference: out, lse and the three gradients."""
    dtype = q.dtype
    with kf.backend("triton"):
        out, lse = ops.fmha(q, k, v, layout=layout, return_lse=True, **kw)
        gout = torch.randn_like(out)
        got = grads([out], [q, k, v], [gout])
    qd, kd, vd = f64(q, k, v)
    ref, ref_lse = reference(ops.fmha, qd, kd, vd, layout=layout, return_lse=True, **kw)
    want = grads([ref], [qd, kd, vd], [gout.double()])
    assert out.dtype == dtype and out.shape == q.shape and lse.dtype == torch.float32
    assert_close(out, ref, dtype, "out")
    check_lse(lse, ref_lse)
    for g, w, name in zip(got, want, ["dq", "dk", "dv"], strict=True):
        assert g.dtype == dtype
        assert_close(g, w, dtype, name, tol_scale=GRAD_SCALE)


# (batch, seq_q, seq_k, q heads, kv heads, head dim, dtype, layout, keyword arguments)
CPU_CASES = [
    (1, 1, 1, 2, 2, 64, F16, "bshd", {}),
    (2, 7, 7, 4, 2, 64, BF16, "bshd", {"causal": True}),
    (1, 33, 33, 2, 1, 64, F16, "bhsd", {"causal": True}),  # MQA
    (2, 33, 17, 2, 2, 64, BF16, "bshd", {"causal": True}),  # Sq > Sk: early rows see no key
    (1, 17, 40, 4, 2, 96, F16, "bshd", {"causal": True}),  # Sq < Sk; 96 padded to 128
    (1, 33, 33, 2, 2, 64, F16, "bshd", {"window": (5, 3)}),
    (1, 33, 20, 2, 1, 64, BF16, "bhsd", {"window": 6, "causal": True}),
    (1, 20, 33, 2, 2, 64, F16, "bshd", {"softcap": 2.0, "scale": 0.3}),
    (1, 20, 20, 2, 2, 128, BF16, "bshd", {"softcap": 5.0, "causal": True, "window": (4, -1)}),
    (1, 9, 12, 2, 2, 64, F16, "bshd", {"scale": -0.25, "causal": True}),  # a negative scale
]
GPU_CASES = [
    (2, 1000, 1000, 16, 16, 128, BF16, "bshd", {}),
    (2, 1000, 1000, 8, 2, 128, F16, "bhsd", {"causal": True}),
    (1, 4097, 4097, 4, 1, 64, BF16, "bshd", {"causal": True}),
    (1, 4097, 1000, 4, 4, 96, F16, "bshd", {}),
    (1, 1000, 4097, 8, 8, 256, BF16, "bhsd", {"causal": True}),
    (3, 7, 7, 8, 1, 128, F16, "bshd", {"causal": True}),
    (2, 1, 4097, 4, 2, 128, BF16, "bshd", {"causal": True}),  # decode-like: one query
    (1, 1000, 1000, 8, 4, 64, F16, "bshd", {"window": (128, 0)}),
    (1, 1000, 1000, 4, 4, 256, F16, "bshd", {"window": (100, 50)}),
    (2, 1000, 1000, 8, 2, 128, BF16, "bshd", {"softcap": 30.0, "causal": True}),
    (1, 4097, 4097, 2, 2, 96, BF16, "bhsd", {"causal": True, "window": 300}),
]
CASES = CPU_CASES + (GPU_CASES if ON_GPU else [])


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[:7]}-{c[7]}-{c[8]}")
def test_fmha_matches_reference(case):
    b, sq, sk, hq, hk, d, dtype, layout, kw = case
    q = rand(qkv_shape(b, sq, hq, d, layout), dtype)
    k = rand(qkv_shape(b, sk, hk, d, layout), dtype)
    v = rand(qkv_shape(b, sk, hk, d, layout), dtype)
    run_fmha(q, k, v, layout, **kw)


#: Every kernel variant the GPU may pick, run through the interpreter too (small tiles there,
#: so that short sequences cross tile edges; GPU-sized tiles on the GPU).
if ON_GPU:
    VARIANTS = {
        "pointers": (attn.FwdConfig(64, 64, 4, 2), attn.BwdConfig(
            attn.KernelConfig(32, 64, 4, 2), attn.KernelConfig(64, 32, 4, 2))),
        "tma": (attn.FwdConfig(64, 64, 4, 2, tma=True), attn.BwdConfig(
            attn.KernelConfig(32, 64, 4, 2, tma=True), attn.KernelConfig(64, 32, 4, 2, tma=True))),
        "tma+warp_spec": (attn.FwdConfig(128, 64, 4, 2, tma=True, warp_spec=True), None),
    }  # fmt: skip
else:
    VARIANTS = {
        "pointers": (attn.FwdConfig(32, 16, 4, 1), attn.BwdConfig(
            attn.KernelConfig(16, 32, 4, 1), attn.KernelConfig(32, 16, 4, 1))),
        "tma": (attn.FwdConfig(16, 32, 4, 1, tma=True), attn.BwdConfig(
            attn.KernelConfig(32, 16, 4, 1, tma=True), attn.KernelConfig(16, 32, 4, 1, tma=True))),
        "tma+warp_spec": (attn.FwdConfig(32, 16, 4, 1, tma=True, warp_spec=True), None),
    }  # fmt: skip


#: Warp specialization compiles and runs on the H100 but gave NaN rows in some cases there (a
#: Triton 3.6 issue not yet isolated; docs/attention.md): no config table selects it.
WS_ON_GPU = pytest.mark.xfail(ON_GPU, reason="warp-specialized loop: NaN rows on the H100",
                              strict=False)  # fmt: skip


def _variant_params(names):
    return [pytest.param(n, marks=WS_ON_GPU) if "warp_spec" in n else n for n in names]


@pytest.mark.parametrize("variant", _variant_params(VARIANTS))
@pytest.mark.parametrize(
    "kw", [{"causal": True}, {"window": (3, 5)}, {"softcap": 3.0}], ids=["causal", "window", "cap"]
)
def test_fmha_kernel_variants(variant, kw):
    """Pointer loads, tensor descriptors (TMA) and the warp-specialized single loop."""
    fwd, bwd = VARIANTS[variant]
    q = rand((2, 33, 4, 96), F16)
    k = rand((2, 40, 2, 96), F16)
    v = rand((2, 40, 2, 96), F16)
    with attn.force_config(fwd=fwd, bwd=bwd):
        run_fmha(q, k, v, **kw)


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("variant", _variant_params(VARIANTS))
def test_fmha_gqa_groups_of_three(variant, layout):
    """GQA dK/dV: per-q-head fp32 slices summed over groups of 3 (attention_bwd.group_sum),
    causal over a ragged sequence, in both layouts."""
    fwd, bwd = VARIANTS[variant]
    q = rand(qkv_shape(2, 37, 6, 64, layout), BF16)
    k = rand(qkv_shape(2, 37, 2, 64, layout), BF16)
    v = rand(qkv_shape(2, 37, 2, 64, layout), BF16)
    with attn.force_config(fwd=fwd, bwd=bwd):
        run_fmha(q, k, v, layout=layout, causal=True)


def test_fmha_views_of_fused_qkv():
    """q, k, v as slices of one fused projection (strided heads), transposed to bhsd."""
    b, s, hq, hk, d = 2, 9, 4, 2, 64
    qkv = rand((b, s, (hq + 2 * hk) * d), BF16)
    heads = qkv.view(b, s, hq + 2 * hk, d)
    q, k, v = heads[:, :, :hq], heads[:, :, hq : hq + hk], heads[:, :, hq + hk :]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    assert not q.is_contiguous()
    with kf.backend("triton"):
        out = ops.fmha(q, k, v, causal=True, layout="bhsd")
        gout = torch.randn_like(out)
        (got,) = grads([out], [qkv], [gout])
    (qkv_d,) = f64(qkv)
    heads_d = qkv_d.view(b, s, hq + 2 * hk, d).transpose(1, 2)
    ref = reference(ops.fmha, heads_d[:, :hq], heads_d[:, hq : hq + hk], heads_d[:, hq + hk :],
                    causal=True, layout="bhsd")  # fmt: skip
    (want,) = grads([ref], [qkv_d], [gout.double()])
    assert_close(out, ref, BF16, "out")
    assert_close(got, want, BF16, "dqkv", tol_scale=GRAD_SCALE)


def test_fmha_default_output_and_empty_keys():
    """Without return_lse only out comes back; no keys at all gives zeros (and lse +inf)."""
    q, k, v = rand((1, 5, 2, 64), F16), rand((1, 0, 2, 64), F16), rand((1, 0, 2, 64), F16)
    with kf.backend("triton"):
        out = ops.fmha(q, k, v)
        out2, lse = ops.fmha(q, k, v, return_lse=True)
    assert isinstance(out, torch.Tensor) and (out == 0).all() and (out2 == 0).all()
    assert torch.isinf(lse).all() and (lse > 0).all()


def test_fmha_empty_queries():
    q, k, v = rand((2, 0, 2, 64), BF16), rand((2, 3, 1, 64), BF16), rand((2, 3, 1, 64), BF16)
    with kf.backend("triton"):
        out = ops.fmha(q, k, v)
        out.sum().backward()
    assert out.shape == q.shape and (k.grad == 0).all() and (v.grad == 0).all()


# ---------------------------------------------------------------------------------------------
# varlen


def run_varlen(lens_q, lens_k, hq, hk, d, dtype, **kw):
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32,
                        device=DEVICE)  # fmt: skip
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32,
                        device=DEVICE)  # fmt: skip
    q = rand((sum(lens_q), hq, d), dtype)
    k = rand((sum(lens_k), hk, d), dtype)
    v = rand((sum(lens_k), hk, d), dtype)
    args = (cu_q, cu_k, max(lens_q), max(lens_k))
    with kf.backend("triton"):
        out, lse = ops.fmha_varlen(q, k, v, *args, return_lse=True, **kw)
        gout = torch.randn_like(out)
        got = grads([out], [q, k, v], [gout])
    qd, kd, vd = f64(q, k, v)
    ref, ref_lse = reference(ops.fmha_varlen, qd, kd, vd, *args, return_lse=True, **kw)
    want = grads([ref], [qd, kd, vd], [gout.double()])
    assert lse.shape == (hq, sum(lens_q))
    assert_close(out, ref, dtype, "out")
    check_lse(lse, ref_lse)
    for g, w, name in zip(got, want, ["dq", "dk", "dv"], strict=True):
        assert_close(g, w, dtype, name, tol_scale=GRAD_SCALE)


VARLEN_CPU = [
    ([3, 0, 1, 17], [5, 2, 0, 17], 4, 2, 64, F16, {}),  # an empty q, an empty k, length 1
    ([3, 0, 1, 17], [3, 0, 1, 17], 2, 2, 64, BF16, {"causal": True}),
    ([9, 33], [20, 5], 2, 1, 96, F16, {"causal": True, "window": (4, 2)}),
    ([1, 1, 1], [7, 0, 33], 2, 2, 64, F16, {"softcap": 4.0}),
]
VARLEN_GPU = [
    ([1000, 0, 1, 4097, 513], [1000, 0, 1, 4097, 513], 8, 2, 128, BF16, {"causal": True}),
    ([700, 1, 0, 2048], [1500, 33, 7, 2048], 4, 4, 64, F16, {}),
    ([4097, 300], [4097, 300], 4, 1, 256, BF16, {"causal": True, "window": (256, 0)}),
    ([1000, 17], [1000, 17], 4, 2, 96, F16, {"softcap": 20.0}),
]
VARLEN = VARLEN_CPU + (VARLEN_GPU if ON_GPU else [])


@pytest.mark.parametrize("case", VARLEN, ids=lambda c: f"{c[0][:3]}-{c[4]}-{c[5]}-{c[6]}")
def test_fmha_varlen_matches_reference(case):
    run_varlen(*case[:6], **case[6])


@pytest.mark.parametrize("variant", _variant_params(["tma", "tma+warp_spec"]))
def test_fmha_varlen_variants(variant):
    fwd, bwd = VARIANTS[variant]
    with attn.force_config(fwd=fwd, bwd=bwd):
        run_varlen([3, 0, 1, 70], [5, 2, 0, 66], 2, 1, 64, BF16, causal=True)


def _tile_cost(lq: int, lk: int, j: int, block: int, left: int, right: int) -> int:
    diag = lk - lq
    hi = lk if right < 0 else min(lk, max((j + 1) * block + diag, 0))
    lo = 0 if left < 0 else min(max(j * block + diag - left, 0), hi)
    return hi - lo + 1


@pytest.mark.parametrize("left,right", [(-1, -1), (-1, 0), (20, 0)])
def test_varlen_tiles_costliest_first(left, right):
    """The packed batch's tile table: every (sequence, query block) with rows exactly once,
    costs never increasing, -1 past the real tiles."""
    from kernforge.kernels.attention_fwd import varlen_tiles

    lens_q, lens_k, block = [5, 0, 70, 33, 1], [9, 4, 70, 40, 0], 16
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    cu_q, cu_k = cu_q.to(DEVICE), cu_k.to(DEVICE)
    tiles, count = varlen_tiles(cu_q, cu_k, 5, 70, sum(lens_q), block, left, right)
    got = tiles.tolist()
    assert count == len(got) == 12  # min(5 x 5 pairs, ceil(109 / 16) + 5)
    real = [(t >> 16, t & 0xFFFF) for t in got if t >= 0]
    want = {(b, j) for b, n in enumerate(lens_q) for j in range(-(-n // block))}
    assert sorted(real) == sorted(want) and len(real) == len(want)
    assert all(t < 0 for t in got[len(real) :])
    costs = [_tile_cost(lens_q[b], lens_k[b], j, block, left, right) for b, j in real]
    assert costs == sorted(costs, reverse=True)


def test_fmha_varlen_unscheduled_grid(monkeypatch):
    """A packed batch with more tiles than one program sorts runs the two-dimensional grid."""
    from kernforge.kernels import attention_fwd

    monkeypatch.setattr(attention_fwd, "MAX_SCHEDULED_TILES", 0)
    run_varlen([3, 0, 1, 70], [5, 2, 0, 66], 2, 1, 64, BF16, causal=True)


def test_sdpa_route_rules(monkeypatch):
    """Which dense calls auto dispatch hands to torch's SDPA on Hopper (none elsewhere)."""
    from types import SimpleNamespace

    monkeypatch.setattr(attn.device, "capability", lambda index=0: (9, 0))
    monkeypatch.setattr(attn.device, "INTERPRET", False)

    def route(d=64, dtype=torch.bfloat16, **kw):
        q = SimpleNamespace(is_cuda=True, shape=(2, 16, 4, d), dtype=dtype,
                            device=SimpleNamespace(index=0))  # fmt: skip
        args = dict(seq_q=16, seq_k=16, left=-1, right=-1, softcap=0.0, return_lse=False)
        return attn.sdpa_route(q, **{**args, **kw})

    assert route() and route(d=128) and route(right=0) and route(dtype=torch.float16)
    assert not route(right=0, seq_k=20)  # causal, fewer queries than keys: aligned otherwise
    assert not route(left=4) and not route(softcap=5.0) and not route(return_lse=True)
    assert not route(d=96) and not route(dtype=torch.float32)
    with kf.backend("triton"):
        assert not route()
    monkeypatch.setattr(attn.device, "capability", lambda index=0: (8, 0))
    assert not route()


def test_fmha_varlen_matches_dense():
    """One varlen batch of equal lengths is the dense call."""
    q, k, v = rand((2, 9, 2, 64), F16), rand((2, 9, 2, 64), F16), rand((2, 9, 2, 64), F16)
    cu = torch.tensor([0, 9, 18], dtype=torch.int32, device=DEVICE)
    with kf.backend("triton"):
        dense = ops.fmha(q, k, v, causal=True)
        packed = ops.fmha_varlen(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu, 9, 9,
                                 causal=True)  # fmt: skip
    torch.testing.assert_close(packed.view_as(dense), dense, atol=2e-3, rtol=0)


# ---------------------------------------------------------------------------------------------
# compile, custom ops, dispatch


def test_fmha_compiles_without_graph_break():
    q, k, v = rand((1, 5, 2, 64), F16), rand((1, 5, 1, 64), F16), rand((1, 5, 1, 64), F16)

    def f(q, k, v):
        return ops.fmha(q, k, v, causal=True).float().sum(-1)

    with kf.backend("triton"):
        out = torch.compile(f, fullgraph=True)(q, k, v)
        (dq,) = torch.autograd.grad(out.sum(), [q])
        want = f(q, k, v)
        (want_dq,) = torch.autograd.grad(want.sum(), [q])
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(dq, want_dq)


def test_fmha_custom_ops_opcheck():
    q, k, v = (rand(s, F16).detach() for s in ((1, 5, 2, 64), (1, 7, 1, 64), (1, 7, 1, 64)))
    args = (None, None, 0, 0, 0.125, -1, 0, 0.0, "bshd")
    torch.library.opcheck(torch.ops.kernforge.fmha_fwd.default, (q, k, v, *args))
    out, lse = torch.ops.kernforge.fmha_fwd(q, k, v, *args)
    do = torch.randn_like(out)
    torch.library.opcheck(torch.ops.kernforge.fmha_bwd.default,
                          (do, q, k, v, out, lse, *args))  # fmt: skip


def test_fp32_is_not_a_kernel_dtype():
    """fp32 runs on the torch backend; with the fallback forbidden the Triton backend refuses."""
    q = rand((1, 3, 2, 64), torch.float32)
    with kf.backend("triton"), pytest.raises(kf.UnsupportedError, match="float16 and bfloat16"):
        ops.fmha(q, q, q)


# ---------------------------------------------------------------------------------------------
# bad input


def _dense(**over):
    args = {"q": rand((2, 5, 4, 64), F16), "k": rand((2, 6, 2, 64), F16),
            "v": rand((2, 6, 2, 64), F16)}  # fmt: skip
    args.update(over)
    return args


@pytest.mark.parametrize(
    "over, error, word",
    [
        ({"k": rand((2, 6, 2, 32), F16), "v": rand((2, 6, 2, 32), F16)}, kf.ShapeError, "head dim"),
        ({"k": rand((2, 6, 3, 64), F16), "v": rand((2, 6, 3, 64), F16)}, kf.ShapeError, "divide"),
        ({"q": rand((2, 5, 4, 12), F16), "k": rand((2, 6, 2, 12), F16),
          "v": rand((2, 6, 2, 12), F16)}, kf.ShapeError, "head dim 12"),
        ({"q": rand((2, 5, 4, 264), F16), "k": rand((2, 6, 2, 264), F16),
          "v": rand((2, 6, 2, 264), F16)}, kf.ShapeError, "head dim 264"),
        ({"k": rand((2, 6, 2, 64), BF16)}, kf.DTypeError, "dtype"),
        ({"v": rand((2, 7, 2, 64), F16)}, kf.ShapeError, "one shape"),
        ({"k": rand((1, 6, 2, 64), F16), "v": rand((1, 6, 2, 64), F16)}, kf.ShapeError, "batch"),
        ({"q": rand((5, 4, 64), F16)}, kf.ShapeError, "4-D"),
        ({"q": [1.0]}, TypeError, "q"),
        ({"layout": "sbhd"}, kf.ArgumentError, "layout"),
        ({"window": (1, 2, 3)}, kf.ArgumentError, "window"),
        ({"window": (-2, 0)}, kf.ArgumentError, "window"),
        ({"softcap": -1.0}, kf.ArgumentError, "softcap"),
        ({"scale": "x"}, kf.ArgumentError, "scale"),
    ],
)  # fmt: skip
def test_fmha_bad_input(over, error, word):
    with kf.backend("triton"), pytest.raises(error, match=word):
        ops.fmha(**_dense(**over))


def _cu(*vals, dtype=torch.int32):
    return torch.tensor(vals, dtype=dtype, device=DEVICE)


def _packed(**over):
    args = {"q": rand((8, 4, 64), F16), "k": rand((9, 2, 64), F16), "v": rand((9, 2, 64), F16),
            "cu_seqlens_q": _cu(0, 3, 8), "cu_seqlens_k": _cu(0, 4, 9),
            "max_seqlen_q": 5, "max_seqlen_k": 5}  # fmt: skip
    args.update(over)
    return args


@pytest.mark.parametrize(
    "over, error, word",
    [
        ({"cu_seqlens_q": _cu(0, 3, 8, dtype=torch.int64)}, kf.DTypeError, "int32"),
        ({"cu_seqlens_q": _cu(0, 3, 8)[None]}, kf.ShapeError, "1-D"),
        ({"cu_seqlens_k": _cu(0, 9)}, kf.ShapeError, "batch"),
        ({"cu_seqlens_q": _cu(0, 5, 3)}, kf.ShapeError, "not decrease"),
        ({"cu_seqlens_q": _cu(0, 3, 7)}, kf.ShapeError, "token count 8"),
        ({"cu_seqlens_k": _cu(1, 4, 9)}, kf.ShapeError, "start at 0"),
        ({"max_seqlen_q": 4}, kf.ShapeError, "max_seqlen"),
        ({"max_seqlen_k": -1}, kf.ArgumentError, "max_seqlen_k"),
        ({"k": rand((9, 3, 64), F16), "v": rand((9, 3, 64), F16)}, kf.ShapeError, "divide"),
        ({"q": rand((8, 4, 128), F16)}, kf.ShapeError, "head dim"),
        ({"v": rand((9, 2, 64), BF16)}, kf.DTypeError, "dtype"),
        ({"q": rand((1, 8, 4, 64), F16)}, kf.ShapeError, "3-D"),
    ],
)  # fmt: skip
def test_fmha_varlen_bad_input(over, error, word):
    with kf.backend("triton"), pytest.raises(error, match=word):
        ops.fmha_varlen(**_packed(**over))


def test_fmha_varlen_value_checks_can_be_skipped(monkeypatch):
    """With KERNFORGE_CHECK_INDICES=0 the cu_seqlens values are trusted (no device sync)."""
    monkeypatch.setattr(config, "settings",
                        dataclasses.replace(config.settings, check_indices=False))  # fmt: skip
    with kf.backend("triton"):
        out = ops.fmha_varlen(**_packed(max_seqlen_q=8, max_seqlen_k=9))
    assert out.shape == (8, 4, 64) and torch.isfinite(out).all()
