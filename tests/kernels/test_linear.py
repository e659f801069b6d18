"""ops.linear: the CUDA GEMV (M <= 16) against a float64 reference on the GPU; on the CPU, the
GEMV source compiling through NVRTC for every shipped variant, the split-K plan, the input
checks and the torch path."""

from __future__ import annotations

import warnings

import pytest
import torch

import kernforge as kf
from kernforge import cuda as kcuda
from kernforge import dispatch, ops
from kernforge.errors import DTypeError, ShapeError
from kernforge.kernels import linear
from tests.helpers import DEVICE, ON_GPU, assert_close, f64, grads, randn

GEMV_DTYPES = [torch.bfloat16, torch.float16]
needs_nvrtc = pytest.mark.skipif(
    kcuda.compile_available() is not None, reason=f"{kcuda.compile_available()}"
)


def ref_linear(x, w, b):
    """float64 reference of x @ w.T + b."""
    xd, wd, bd = f64(x, w, b)
    return torch.nn.functional.linear(xd, wd, bd)


# ---------------------------------------------------------------- CPU: compile, plan, checks


@needs_nvrtc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_every_gemv_variant_compiles(arch):
    variants = linear.shipped_variants()
    assert {mt for _, mt, _ in variants} == {8, 16}
    for dtype, mt, cfg in variants:
        k = linear.gemv_kernel(dtype, mt, cfg, arch=arch)
        assert k.arch == arch and len(k.cubin) > 1000, (dtype, mt, cfg)
        assert [p.name for p in k.params][:4] == ["x", "w", "bias", "y"]
    if arch == "sm_90":  # the decode step's dependent launches (griddepcontrol is sm_90+)
        for dtype, mt, cfg in variants:
            k = linear.gemv_kernel(dtype, mt, cfg, arch=arch, pdl=True)
            assert len(k.cubin) > 1000, (dtype, mt, cfg)


@needs_nvrtc
def test_gemv_launch_arguments_are_checked():
    k = linear.gemv_kernel(torch.bfloat16, 8, linear.DEFAULT, arch="sm_90")
    x = torch.randn(1, 64).bfloat16()
    w = torch.randn(17, 64).bfloat16()
    out = torch.empty(1, 17, dtype=torch.bfloat16)
    rest = (None, None, 1, 17, 64, 64, 0, None, None, 0.0)  # partial .. eps
    k.check_args(x, w, None, out, *rest, require_cuda=False)
    with pytest.raises(kf.errors.ArgumentError):  # fp16 weight for a bf16 kernel
        k.check_args(x, w.half(), None, out, *rest, require_cuda=False)


FUSIONS = [linear.Fusion(rms, glu, res) for rms in (0, 1, 2) for glu in (0, 1) for res in (0, 1)]


@needs_nvrtc
def test_every_fused_gemv_variant_compiles():
    """fused_linear's variants (norm, SwiGLU, residual), as the decode step launches them."""
    for dtype, mt, cfg in linear.shipped_variants():
        for fusion in FUSIONS[1:]:
            k = linear.gemv_kernel(dtype, mt, cfg, arch="sm_90", pdl=True, fusion=fusion)
            assert len(k.cubin) > 1000, (dtype, mt, cfg, fusion)
            assert [p.name for p in k.params][-3:] == ["nw", "res", "eps"]


@pytest.mark.parametrize(
    "m,n,k",
    [(1, 14336, 4096), (1, 4096, 14336), (16, 151936, 1536), (4, 4096, 4096), (1, 1, 8),
     (3, 17, 264), (16, 1000, 4104), (2, 5, 40)],
)  # fmt: skip
def test_plan_covers_k_and_n(m, n, k):
    for sms in (4, 132):
        p = linear.plan(m, n, k, sms)
        assert p.mt == (8 if m <= 8 else 16)
        assert p.kchunk % 8 == 0 and p.kchunk > 0
        assert (p.splits - 1) * p.kchunk < k <= p.splits * p.kchunk  # every split has work
        assert p.grid == (-(-n // p.config.rows), p.splits)
        for s in (1, 2, 3, 7):
            q = linear.plan(m, n, k, sms, splits=s)
            assert (q.splits - 1) * q.kchunk < k <= q.splits * q.kchunk


def test_plan_splits_k_only_where_n_is_short():
    # The bar's shapes give at least 512 blocks of 8 warps: no split. Few rows: split K.
    for n, k in [(14336, 4096), (4096, 14336), (151936, 1536), (4096, 4096)]:
        assert linear.plan(1, n, k, 132).splits == 1
    assert linear.plan(1, 1000, 4104, 132).splits > 1
    assert linear.plan(16, 128, 14336, 132).splits > 1


def test_checks_raise_clear_errors():
    x = torch.randn(3, 64)
    w = torch.randn(17, 64)
    with pytest.raises(ShapeError, match="in_features"):
        ops.linear(x, torch.randn(17, 63))
    with pytest.raises(ShapeError, match="2-D"):
        ops.linear(x, torch.randn(64))
    with pytest.raises(ShapeError, match="bias"):
        ops.linear(x, w, torch.randn(16))
    with pytest.raises(DTypeError, match="share one dtype"):
        ops.linear(x.bfloat16(), w)
    with pytest.raises(DTypeError, match="share one dtype"):
        ops.linear(x, w, torch.randn(17).half())
    with pytest.raises(DTypeError, match="floating"):
        ops.linear(torch.ones(3, 64, dtype=torch.int32), w.int())
    with pytest.raises(TypeError):
        ops.linear(x.numpy(), w)


@pytest.mark.parametrize("shape", [(64,), (3, 64), (2, 3, 64), (40, 64)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_torch_backend_matches_reference(shape, dtype):
    x = randn(shape, dtype, requires_grad=True)
    w = randn((17, 64), dtype, requires_grad=True, scale=0.1)
    b = randn((17,), dtype, requires_grad=True)
    with kf.backend("torch"):
        y = ops.linear(x, w, b)
        gy = randn(y.shape, dtype)
        got = grads([y], [x, w, b], [gy])
    leaves = f64(x, w, b)
    ref = torch.nn.functional.linear(*leaves)
    want = grads([ref], leaves, [gy.double()])
    assert_close(y, ref, dtype, "y")
    for g, r, what in zip(got, want, "xwb", strict=True):
        assert_close(g, r, dtype, f"d{what}")


def test_cuda_backend_reasons_on_this_machine():
    x = torch.randn(2, 64, device=DEVICE).bfloat16()
    w = torch.randn(8, 64, device=DEVICE).bfloat16()
    reason = linear._supports_cuda(x, w)
    if not ON_GPU:
        assert reason is not None and "cpu" in reason
        return
    assert reason is None
    assert "float16" in linear._supports_cuda(x.float(), w.float())
    assert "multiple of 8" in linear._supports_cuda(x[:, :60], w[:, :60].contiguous())
    assert "contiguous" in linear._supports_cuda(
        x, torch.randn(64, 8, device=DEVICE).t().bfloat16()
    )
    # More than 16 rows: accepted by the cuda backend, which routes them to torch's matmul.
    assert linear._supports_cuda(torch.randn(17, 64, device=DEVICE).float(), w.float()) is None


# ---------------------------------------------------------------- GPU: the GEMV itself

MS = [1, 3, 16]
NS = [1, 17, 1000]
KS = [8, 264, 4104]


def run_cuda(*args, **kwargs):
    with kf.backend("cuda"):
        return ops.linear(*args, **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("dtype", GEMV_DTYPES, ids=str)
def test_gemv_matches_reference(dtype, m, n, k, has_bias):
    x = randn((m, k), dtype)
    w = randn((n, k), dtype, scale=k**-0.5)
    b = randn((n,), dtype) if has_bias else None
    y = run_cuda(x, w, b)
    assert y.dtype == dtype and y.shape == (m, n)
    assert_close(y, ref_linear(x, w, b), dtype, "y")


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["padded", "strided"])
@pytest.mark.parametrize("dtype", GEMV_DTYPES, ids=str)
def test_gemv_non_contiguous_x(dtype, layout):
    x = randn((5, 264), dtype, layout=layout)
    assert not x.is_contiguous()
    w = randn((33, 264), dtype, scale=0.1)
    b = randn((33,), dtype)
    assert_close(run_cuda(x, w, b), ref_linear(x, w, b), dtype, "y")


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4104,), (2, 3, 4104), (4, 4, 4104), (1, 1, 4104)], ids=str)
def test_gemv_leading_dims(shape):
    dtype = torch.bfloat16
    x = randn(shape, dtype)
    w = randn((1000, 4104), dtype, scale=4104**-0.5)
    b = randn((1000,), dtype)
    y = run_cuda(x, w, b)
    assert y.shape == (*shape[:-1], 1000)
    assert_close(y, ref_linear(x, w, b), dtype, "y")


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, 2, 5, 16])
@pytest.mark.parametrize("m", [1, 9, 16])
def test_gemv_split_k_is_exact_and_deterministic(m, splits):
    dtype = torch.bfloat16
    n, k = 999, 8200
    x = randn((m, k), dtype)
    w = randn((n, k), dtype, scale=k**-0.5)
    b = randn((n,), dtype)
    p = linear.plan(m, n, k, kf.device.num_sms(), splits=splits)
    outs = []
    for _ in range(3):
        out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
        linear.gemv(x, w, b, out, p)
        outs.append(out)
    assert_close(outs[0], ref_linear(x, w, b), dtype, f"S={p.splits}")
    assert all(torch.equal(outs[0], o) for o in outs[1:]), "split-K result changed between runs"


#: Issue shapes, and Qwen2.5-1.5B's down projection (a TUNED config).
BAR_SHAPES = [(1, 14336, 4096), (16, 4096, 14336), (4, 151936, 1536), (1, 1536, 8960),
              (8, 1536, 8960)]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("mnk", BAR_SHAPES, ids=str)
def test_gemv_bar_shapes(mnk):
    m, n, k = mnk
    dtype = torch.bfloat16
    x = randn((m, k), dtype)
    w = randn((n, k), dtype, scale=k**-0.5)
    assert_close(run_cuda(x, w), ref_linear(x, w, None), dtype, "y")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GEMV_DTYPES, ids=str)
def test_gemv_gradients(dtype):
    x = randn((2, 3, 264), dtype, requires_grad=True)
    w = randn((17, 264), dtype, requires_grad=True, scale=0.1)
    b = randn((17,), dtype, requires_grad=True)
    y = run_cuda(x, w, b)
    gy = randn(y.shape, dtype)
    got = grads([y], [x, w, b], [gy])
    leaves = f64(x, w, b)
    ref = torch.nn.functional.linear(*leaves)
    want = grads([ref], leaves, [gy.double()])
    assert_close(y, ref, dtype, "y")
    for g, r, what in zip(got, want, "xwb", strict=True):
        assert g.dtype == dtype
        assert_close(g, r, dtype, f"d{what}")


@pytest.mark.gpu
def test_auto_picks_the_gemv_and_large_m_goes_to_torch_silently():
    dtype = torch.bfloat16
    w = randn((40, 64), dtype)
    small = randn((2, 8, 64), dtype)
    args = {"x": small, "weight": w, "bias": None}
    assert dispatch.select("linear", args).backend == "cuda"
    big = randn((3, 7, 64), dtype)  # 21 rows: torch's matmul, by design, with no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = ops.linear(big, w)
    assert_close(y, ref_linear(big, w, None), dtype, "y")


@pytest.mark.gpu
def test_gemv_under_torch_compile():
    dtype = torch.bfloat16
    x = randn((4, 264), dtype)
    w = randn((100, 264), dtype, scale=0.1)
    b = randn((100,), dtype)
    fn = torch.compile(lambda x, w, b: ops.linear(x, w, b) * 2, fullgraph=True)
    assert_close(fn(x, w, b), 2 * ref_linear(x, w, b), dtype, "compiled")


VARIANTS = [
    linear.GemvConfig(r=2, u=2, wn=4, wk=1),
    linear.GemvConfig(r=2, u=4, wn=2, wk=2, hint=0, pipe=1),
    linear.GemvConfig(r=1, u=8, wn=1, wk=4, hint=2),
]


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("cfg", VARIANTS, ids=str)
def test_gemv_launch_variants(cfg, m, splits):
    """The configs the tuning sweep measures (not shipped by default) compute the same."""
    dtype = torch.float16
    n, k = 1000, 4104
    x = randn((m, k), dtype)
    w = randn((n, k), dtype, scale=k**-0.5)
    b = randn((n,), dtype)
    p = linear.plan(m, n, k, kf.device.num_sms(), cfg, splits=splits)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
    linear.gemv(x, w, b, out, p)
    assert_close(out, ref_linear(x, w, b), dtype, f"{cfg} S={p.splits}")


# ---------------------------------------------------------------- fused_linear


def ref_fused_linear(x, w, b, nw, eps, swiglu, res, dtype):
    """float64 reference of ops.fused_linear, rounded to ``dtype`` where the unfused ops hand a
    tensor to the next: the normalised x, y before SwiGLU, y before the residual add."""
    xd = x.double()
    if nw is not None:
        xd = (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps) * nw.double()).to(dtype)
    y = torch.nn.functional.linear(xd.double(), w.double(), None if b is None else b.double())
    if swiglu:
        y = y.to(dtype).double()
        y = torch.nn.functional.silu(y[..., 0::2]) * y[..., 1::2]
    if res is not None:
        y = y.to(dtype).double() + res.double()
    return y


def fused_args(shape, n, dtype, norm, swiglu, has_res, has_bias, layout="contiguous"):
    """Random inputs of ops.fused_linear: x [*shape], weight [n, K] and the optional rest."""
    k = shape[-1]
    x = randn(shape, dtype, layout=layout)
    w = randn((n, k), dtype, scale=k**-0.5)
    b = randn((n,), dtype) if has_bias else None
    nw = (1 + 0.3 * randn((k,))).to(dtype) if norm else None
    res = randn((*shape[:-1], n // 2 if swiglu else n), dtype) if has_res else None
    return x, w, b, nw, res


COMBOS = [  # (norm, swiglu, residual, bias): the decoder's four uses first, then the rest
    (True, False, False, True), (False, False, True, False), (True, True, False, False),
    (True, False, False, False), (False, True, True, True), (True, True, True, True),
    (False, False, False, False),
]  # fmt: skip
COMBO_IDS = ["".join(c for c, on in zip("NSRB", combo, strict=True) if on) or "plain"
             for combo in COMBOS]  # fmt: skip


@pytest.mark.parametrize("combo", COMBOS, ids=COMBO_IDS)
@pytest.mark.parametrize("shape", [(1, 40), (3, 24), (2, 5, 64), (40, 24)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_linear_matches_reference(dtype, shape, combo):
    """Every backend auto picks on this machine (the unfused ops on the CPU, the interpreter's
    Triton kernels in CI; on the GPU the one-launch GEMV, and for 40 rows the unfused ops with
    the residual added by addmm) and the torch reference; x non-contiguous."""
    norm, swiglu, has_res, has_bias = combo
    x, w, b, nw, res = fused_args(shape, 34, dtype, norm, swiglu, has_res, has_bias, "strided")
    want = ref_fused_linear(x, w, b, nw, 1e-6, swiglu, res, dtype)
    for name in ("auto", "torch"):
        with kf.backend(name):
            y = ops.fused_linear(x, w, b, nw, 1e-6, swiglu=swiglu, residual=res)
        assert y.dtype == dtype
        assert_close(y, want, dtype, name, tol_scale=2.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_linear_gradients(dtype):
    """More than 16 rows or autograd: the unfused ops, differentiable in every input."""
    x, w, b, nw, res = fused_args((2, 3, 24), 34, dtype, True, True, True, True)
    leaves = [t.requires_grad_() for t in (x, w, b, nw, res)]
    y = ops.fused_linear(x, w, b, nw, 1e-6, swiglu=True, residual=res)
    gy = randn(y.shape, dtype)
    got = grads([y], leaves, [gy])
    ref_leaves = f64(*leaves)
    ref = ref_fused_linear(*ref_leaves[:2], ref_leaves[2], ref_leaves[3], 1e-6, True,
                           ref_leaves[4], torch.float64)  # fmt: skip
    want = grads([ref], ref_leaves, [gy.double()])
    for g, r, what in zip(got, want, ["x", "weight", "bias", "norm_weight", "residual"],
                          strict=True):  # fmt: skip
        assert g is not None and g.dtype == dtype, what
        assert_close(g, r, dtype, f"d{what}", tol_scale=4.0)


def test_fused_linear_errors():
    x, w = randn((2, 16)), randn((6, 16))
    with pytest.raises(ShapeError):
        ops.fused_linear(x, randn((6, 8)))
    with pytest.raises(ShapeError):
        ops.fused_linear(x, w, randn((5,)))
    with pytest.raises(ShapeError):
        ops.fused_linear(x, w, norm_weight=randn((8,)))
    with pytest.raises(ShapeError):  # odd rows: no gate/up pairs
        ops.fused_linear(x, randn((5, 16)), swiglu=True)
    with pytest.raises(ShapeError):  # the residual has y's shape: [2, 3] after SwiGLU
        ops.fused_linear(x, w, swiglu=True, residual=randn((2, 6)))
    with pytest.raises(DTypeError):
        ops.fused_linear(x, w.double())
    with pytest.raises(DTypeError):
        ops.fused_linear(x, w, residual=randn((2, 6), torch.bfloat16))
    with pytest.raises(TypeError):
        ops.fused_linear(x, "w")


@pytest.mark.gpu
@pytest.mark.parametrize("combo", COMBOS, ids=COMBO_IDS)
@pytest.mark.parametrize("nk", [(2048, 1536), (34, 264), (1000, 4104), (17920, 1536), (2, 8)],
                         ids=str)  # fmt: skip
@pytest.mark.parametrize("m", [1, 3, 8, 9, 16])
@pytest.mark.parametrize("dtype", GEMV_DTYPES, ids=str)
def test_fused_gemv_matches_reference(dtype, m, nk, combo):
    """The one-launch CUDA GEMV against the float64 reference, run twice (deterministic)."""
    norm, swiglu, has_res, has_bias = combo
    n, k = nk
    x, w, b, nw, res = fused_args((m, k), n, dtype, norm, swiglu, has_res, has_bias)
    args = {"x": x, "weight": w, "bias": b, "norm_weight": nw, "residual": res}
    assert dispatch.select("fused_linear", args).backend == "cuda"
    y = ops.fused_linear(x, w, b, nw, 1e-6, swiglu=swiglu, residual=res)
    again = ops.fused_linear(x, w, b, nw, 1e-6, swiglu=swiglu, residual=res)
    want = ref_fused_linear(x, w, b, nw, 1e-6, swiglu, res, dtype)
    assert_close(y, want, dtype, "y", tol_scale=2.0)
    assert torch.equal(y, again), "the fused GEMV is not deterministic"


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("cfg", VARIANTS, ids=str)
def test_fused_gemv_launch_variants(cfg, m, splits):
    """The fusions in the tuning sweep's configs (several warps along N, pipelined loads): the
    norm and SwiGLU run without split-K whatever the plan says, the residual with it."""
    dtype, n, k = torch.float16, 1000, 4104
    for combo in COMBOS:
        norm, swiglu, has_res, has_bias = combo
        x, w, b, nw, res = fused_args((m, k), n, dtype, norm, swiglu, has_res, has_bias)
        p = linear.plan(m, n, k, kf.device.num_sms(), cfg, splits=splits)
        out = torch.full((m, n // 2 if swiglu else n), float("nan"), dtype=dtype, device=DEVICE)
        linear.gemv(x, w, b, out, p, norm_weight=nw, eps=1e-6, swiglu=swiglu, residual=res)
        want = ref_fused_linear(x, w, b, nw, 1e-6, swiglu, res, dtype)
        assert_close(out, want, dtype, f"{cfg} S={p.splits} {combo}", tol_scale=2.0)


@pytest.mark.gpu
def test_fused_gemv_leading_dims_strided_input_and_large_m():
    """[B, S, K] inputs keep their leading dims; strided x and a misaligned norm weight are
    copied for the GEMV; more than 16 rows take the unfused ops."""
    dtype, n, k = torch.bfloat16, 34, 264
    for shape in [(2, 3, k), (1, 1, k), (4, 8, k)]:
        x, w, b, _, res = fused_args(shape, n, dtype, True, True, True, True, "strided")
        nw = (1 + 0.3 * randn((k + 1,))).to(dtype)[1:]  # 2 bytes past a 16-byte boundary
        y = ops.fused_linear(x, w, b, nw, 1e-6, swiglu=True, residual=res)
        assert y.shape == (*shape[:-1], n // 2)
        want = ref_fused_linear(x, w, b, nw, 1e-6, True, res, dtype)
        assert_close(y, want, dtype, str(shape), tol_scale=2.0)


@pytest.mark.gpu
def test_fused_gemv_under_torch_compile():
    dtype, n, k = torch.bfloat16, 100, 264
    x, w, b, nw, res = fused_args((4, k), n, dtype, True, False, True, True)
    fn = torch.compile(lambda *a: ops.fused_linear(*a[:4], 1e-6, residual=a[4]) * 2,
                       fullgraph=True)  # fmt: skip
    want = 2 * ref_fused_linear(x, w, b, nw, 1e-6, False, res, dtype)
    assert_close(fn(x, w, b, nw, res), want, dtype, "compiled", tol_scale=2.0)


@pytest.mark.gpu
def test_norm_mode_by_shape():
    """On the H100: Qwen2.5-1.5B's q/k/v projection (256 blocks) takes the norm in its loop, its
    gate/up (2240 blocks) in a prologue at one row, its head (18992 blocks) after ops.rms_norm;
    each gives the reference."""
    dtype, k = torch.bfloat16, 1536
    x1, x8 = randn((1, k), dtype), randn((8, k), dtype)
    assert linear.norm_mode(1, 2048, x1) == 1 and linear.norm_mode(8, 2048, x8) == 1
    assert linear.norm_mode(1, 17920, x1) == 2 and linear.norm_mode(8, 17920, x8) == 0
    assert linear.norm_mode(1, 151936, x1) == 0
    for n in (2048, 17920, 151936):
        _, w, _, nw, _ = fused_args((1, k), n, dtype, True, False, False, False)
        want = ref_fused_linear(x1, w, None, nw, 1e-6, False, None, dtype)
        assert_close(ops.fused_linear(x1, w, None, nw), want, dtype, str(n), tol_scale=2.0)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", [1, 2])
@pytest.mark.parametrize("m", [1, 3, 8, 16])
def test_gemv_norm_forms_at_any_size(m, mode):
    """Both forms of the norm (KF_RMS 1 and 2) at any M and K (tails), with SwiGLU and a
    residual, whatever norm_mode would pick."""
    dtype, n = torch.float16, 1000
    for k in (264, 4104):
        x, w, b, nw, res = fused_args((m, k), n, dtype, True, True, True, True)
        out = torch.full((m, n // 2), float("nan"), dtype=dtype, device=DEVICE)
        linear.gemv(x, w, b, out, norm_weight=nw, eps=1e-6, swiglu=True, residual=res,
                    norm_mode=mode)  # fmt: skip
        want = ref_fused_linear(x, w, b, nw, 1e-6, True, res, dtype)
        assert_close(out, want, dtype, f"K={k}", tol_scale=2.0)
