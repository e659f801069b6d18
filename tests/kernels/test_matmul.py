"""ops.matmul (fused epilogue), ops.bmm and ops.linear for M > 16: both GEMM kernels (TMA and
pointer) against a float64 reference, forward and backward, over odd shapes, transposed and
strided operands, every epilogue, fp16 and bf16; the input checks. Small shapes run in Triton's
CPU interpreter; the gpu-marked tests add large shapes, every tuning candidate,
torch.compile and CUDA graphs."""

from __future__ import annotations

import warnings

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

import kernforge as kf
from kernforge import dispatch, ops
from kernforge.errors import ArgumentError, DeviceError, DTypeError, ShapeError
from kernforge.kernels import common
from kernforge.kernels import matmul as mm
from tests.helpers import DEVICE, ON_GPU, assert_close, f64, grads

DTYPES = [torch.float16, torch.bfloat16]
ACTS = [None, "relu", "gelu", "silu"]


@pytest.fixture(params=["tma", "pointer"])
def kernel(request, monkeypatch):
    """Run the test on each kernel (the TMA kernel runs in the interpreter too)."""
    monkeypatch.setattr(mm, "KERNEL", request.param)
    return request.param


def rnd(shape, dtype, scale=1.0, transposed=False, requires_grad=False):
    """Fresh random values; ``transposed``: the same logical shape stored column-major (a
    ``.t()`` view of a row-major tensor: read in place by the kernels)."""
    shape = tuple(shape)
    if transposed:
        t = (torch.randn(*shape[:-2], shape[-1], shape[-2], device=DEVICE) * scale).to(dtype)
        t = t.transpose(-1, -2)
    else:
        t = (torch.randn(*shape, device=DEVICE) * scale).to(dtype)
    return t.requires_grad_(requires_grad)


def ref_matmul(a, b, bias=None, activation=None, residual=None):
    """float64 reference through the torch backend."""
    a, b, bias, residual = f64(a, b, bias, residual)
    with kf.backend("torch"):
        return ops.matmul(a, b, bias, activation, residual)


def run(*args, **kwargs):
    with kf.backend("triton"):
        return ops.matmul(*args, **kwargs)


SHAPES = [(1, 17, 33), (17, 33, 64), (33, 1, 17), (64, 64, 64), (33, 64, 1), (40, 48, 24)]


@pytest.mark.parametrize("b_t", [False, True], ids=["b", "bT"])
@pytest.mark.parametrize("a_t", [False, True], ids=["a", "aT"])
@pytest.mark.parametrize("mnk", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_shapes_and_transposes(kernel, dtype, mnk, a_t, b_t):
    m, n, k = mnk
    a = rnd((m, k), dtype, transposed=a_t)
    b = rnd((k, n), dtype, scale=k**-0.5, transposed=b_t)
    y = run(a, b)
    assert y.dtype == dtype and y.shape == (m, n) and y.is_contiguous()
    assert_close(y, ref_matmul(a, b), dtype, f"{mnk} a_t={a_t} b_t={b_t}")


@pytest.mark.parametrize("has_res", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("act", ACTS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_epilogues(kernel, dtype, act, has_bias, has_res):
    m, n, k = 37, 72, 48
    a = rnd((m, k), dtype)
    b = rnd((k, n), dtype, scale=k**-0.5, transposed=True)
    bias = rnd((n,), dtype) if has_bias else None
    res = rnd((m, n), dtype) if has_res else None
    y = run(a, b, bias, act, res)
    assert_close(y, ref_matmul(a, b, bias, act, res), dtype, f"act={act}")


@triton.jit
def _act_probe(z_ptr, y_ptr, d_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    z = tl.load(z_ptr + offs, mask=offs < n)
    tl.store(y_ptr + offs, mm._act(z, ACT), mask=offs < n)
    tl.store(d_ptr + offs, mm._act_grad(z, ACT), mask=offs < n)


def test_activations_and_derivatives_in_fp32():
    """The epilogue's activations and the backward's derivatives, in fp32 (no output rounding
    hiding a difference): gelu is the tanh approximation, not erf."""
    z = torch.cat([torch.linspace(-12, 12, 997), torch.tensor([0.0, 30.0, -30.0])]).to(DEVICE)
    fns = {
        "relu": torch.relu,
        "gelu": lambda t: torch.nn.functional.gelu(t, approximate="tanh"),
        "silu": torch.nn.functional.silu,
    }
    for name, fn in fns.items():
        y, d = torch.empty_like(z), torch.empty_like(z)
        _act_probe[(1,)](z, y, d, z.numel(), ACT=mm.ACTIVATIONS[name], BLOCK=1024)
        zd = z.double().requires_grad_()
        want = fn(zd)
        (dwant,) = torch.autograd.grad(want.sum(), [zd])
        assert (y.double() - want).abs().max() < 1e-5, name
        assert (d.double() - dwant).abs().max() < 1e-5, name
    y, d = torch.empty_like(z), torch.empty_like(z)
    _act_probe[(1,)](z, y, d, z.numel(), ACT=mm.ACTIVATIONS["gelu"], BLOCK=1024)
    exact = torch.nn.functional.gelu(z.double())
    assert (y.double() - exact).abs().max() > 1e-4  # the tanh approximation differs from erf


@pytest.mark.parametrize("mnk", [(4097, 3, 16), (2, 5, 4097), (3, 4097, 8)], ids=str)
def test_thin_shapes_with_4097(kernel, mnk):
    m, n, k = mnk
    dtype = torch.bfloat16
    a = rnd((m, k), dtype)
    b = rnd((k, n), dtype, scale=k**-0.5)
    bias = rnd((n,), dtype)
    assert_close(run(a, b, bias, "silu"), ref_matmul(a, b, bias, "silu"), dtype, str(mnk))


def test_strided_operands_use_the_pointer_kernel():
    dtype = torch.float16
    base_a = rnd((19, 2 * 40), dtype)
    a = base_a[:, ::2]  # no unit stride at all
    b = rnd((40, 3 * 24), dtype, scale=0.2)[:, 5:29]  # row stride 72, offset 5: unaligned base
    res = rnd((19, 2 * 24), dtype)[:, ::2]
    out = torch.full((19, 24), float("nan"), dtype=dtype, device=DEVICE)
    assert mm.launch(a, b, out, None, res, "relu", kernel="tma") == "pointer"
    assert_close(out, ref_matmul(a, b, None, "relu", res), dtype, "strided")
    assert_close(run(a, b, None, "relu", res), ref_matmul(a, b, None, "relu", res), dtype, "op")


def test_unaligned_k_falls_back_to_pointer_and_aligned_takes_tma():
    dtype = torch.bfloat16
    for k, want in ((17, "pointer"), (24, "tma")):
        a, b = rnd((20, k), dtype), rnd((k, 16), dtype)
        out = torch.full((20, 16), float("nan"), dtype=dtype, device=DEVICE)
        assert mm.launch(a, b, out, kernel="tma") == want
        assert_close(out, ref_matmul(a, b), dtype, f"K={k}")


@pytest.mark.parametrize("n", [7, 24])  # 7: output rows not 16-byte aligned, stored by pointers
def test_output_store_paths(kernel, n):
    dtype = torch.float16
    a, b = rnd((33, 32), dtype), rnd((32, n), dtype, transposed=True)
    bias, res = rnd((n,), dtype), rnd((33, n), dtype)
    assert_close(run(a, b, bias, "gelu", res), ref_matmul(a, b, bias, "gelu", res), dtype, "y")


def test_leading_dims_and_vector_a(kernel):
    dtype = torch.float16
    a = rnd((2, 3, 5, 24), dtype)
    b = rnd((24, 40), dtype, scale=0.2)
    bias, res = rnd((40,), dtype), rnd((2, 3, 5, 40), dtype)
    y = run(a, b, bias, "relu", res)
    assert y.shape == (2, 3, 5, 40)
    assert_close(y, ref_matmul(a, b, bias, "relu", res), dtype, "leading dims")
    v = rnd((24,), dtype)
    assert_close(run(v, b), ref_matmul(v, b), dtype, "1-D a")


def test_empty_and_k_zero(kernel):
    dtype = torch.float16
    assert run(rnd((0, 8), dtype), rnd((8, 5), dtype)).shape == (0, 5)
    assert run(rnd((3, 8), dtype), rnd((8, 0), dtype)).shape == (3, 0)
    a, b = rnd((3, 0), dtype), rnd((0, 5), dtype)
    bias, res = rnd((5,), dtype), rnd((3, 5), dtype)
    assert_close(run(a, b, bias, "silu", res), ref_matmul(a, b, bias, "silu", res), dtype, "K=0")


def _distinct_tiles(configs):
    seen, out = set(), []
    for c in configs:
        key = (c.block_m, c.block_n, c.block_k, c.subtile, c.split_k > 1)
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


@pytest.mark.parametrize("cfg", _distinct_tiles(mm.TMA_CONFIGS), ids=str)
def test_tma_candidate_configs_interpreted(cfg):
    """The tile walk, subtiled epilogue and masks of the large candidate tiles."""
    dtype = torch.float16
    m, n, k = 140, 264, 72  # partial tiles in M, N and K for every candidate
    a, b = rnd((m, k), dtype), rnd((k, n), dtype, scale=k**-0.5, transposed=True)
    bias, res = rnd((n,), dtype), rnd((m, n), dtype)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
    pre = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
    assert mm.launch(a, b, out, bias, res, "gelu", pre, config=cfg, kernel="tma") == "tma"
    assert_close(out, ref_matmul(a, b, bias, "gelu", res), dtype, "y")
    assert_close(pre, ref_matmul(a, b, bias), dtype, "pre-activation")


@pytest.mark.parametrize("mnk", [(40, 72, 200), (20, 30, 300), (97, 130, 70)], ids=str)
@pytest.mark.parametrize("split", [2, 3, 4])
def test_stream_k(split, mnk):
    """Stream-K: the tiles x K-tiles iterations split evenly over the programs (the
    interpreter has 4 "SMs": one tile shared by up to 4 programs, or 6-20 tiles over 4
    programs with uneven boundaries); partials added by each tile's last contributor in a
    fixed order; the arrival counters left at zero; results identical run to run."""
    m, n, k = mnk
    dtype = torch.bfloat16
    a, b = rnd((m, k), dtype), rnd((k, n), dtype, scale=k**-0.5, transposed=True)
    bias, res = rnd((n,), dtype), rnd((m, n), dtype)
    for cfg in (mm.MatmulConfig(32, 32, 32, 2, 4, 1, split_k=split),
                mm.MatmulConfig(32, 64, 32, 2, 4, 1, subtile=4, split_k=split)):  # fmt: skip
        outs = []
        for _ in range(2):
            out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
            pre = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
            mm.launch(a, b, out, bias, res, "relu", pre, config=cfg, kernel="tma")
            outs.append(out)
        assert_close(outs[0], ref_matmul(a, b, bias, "relu", res), dtype, f"{cfg}")
        assert_close(pre, ref_matmul(a, b, bias), dtype, f"{cfg} pre")
        assert torch.equal(outs[0], outs[1])
        assert all(int(buf.abs().sum()) == 0 for buf in common._arrival.values())


def test_stream_k_batched():
    dtype = torch.float16
    a = rnd((3, 40, 200), dtype)
    w = rnd((200, 72), dtype, scale=0.07)
    b = w.expand(3, 200, 72)
    out = torch.full((3, 40, 72), float("nan"), dtype=dtype, device=DEVICE)
    cfg = mm.MatmulConfig(32, 32, 32, 2, 4, 1, split_k=3)
    mm.launch(a, b, out, config=cfg, kernel="tma")
    assert_close(out, torch.bmm(*f64(a, b)), dtype, "batched stream-K")


# ---------------------------------------------------------------------------------- backward


@pytest.mark.parametrize("layout", ["a_b", "aT_bT"])
@pytest.mark.parametrize("act", ACTS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward(kernel, dtype, act, layout):
    m, n, k = 33, 40, 24
    a_t, b_t = layout == "aT_bT", layout == "aT_bT"
    a = rnd((m, k), dtype, transposed=a_t, requires_grad=True)
    b = rnd((k, n), dtype, scale=0.3, transposed=b_t, requires_grad=True)
    bias = rnd((n,), dtype, requires_grad=True)
    res = rnd((m, n), dtype, requires_grad=True)
    y = run(a, b, bias, act, res)
    gy = rnd(y.shape, dtype)
    got = grads([y], [a, b, bias, res], [gy])
    leaves = f64(a, b, bias, res)
    with kf.backend("torch"):
        ref = ops.matmul(leaves[0], leaves[1], leaves[2], act, leaves[3])
    want = grads([ref], leaves, [gy.double()])
    assert_close(y, ref, dtype, "y")
    for g, r, t, what in zip(got, want, (a, b, bias, res), ("da", "db", "dbias", "dres"),
                             strict=True):  # fmt: skip
        assert g.dtype == dtype, what
        assert g.stride() == t.stride(), f"{what}: strides {g.stride()} != input {t.stride()}"
        assert_close(g, r, dtype, what, tol_scale=2.0)


def test_backward_partial_requirements(kernel):
    dtype = torch.float16
    a = rnd((2, 9, 24), dtype, requires_grad=True)  # leading dims fold; only a needs a grad
    b = rnd((24, 16), dtype, scale=0.3)
    bias = rnd((16,), dtype)
    y = run(a, b, bias, "gelu")
    gy = rnd(y.shape, dtype)
    (da,) = torch.autograd.grad(y, [a], gy)
    la, lb, lbias = f64(a, b, bias)
    with kf.backend("torch"):
        ref = ops.matmul(la, lb, lbias, "gelu")
    (want,) = torch.autograd.grad(ref, [la], gy.double())
    assert_close(da, want, dtype, "da")


def test_no_pre_activation_saved_without_grad(kernel, monkeypatch):
    saved = []
    real = mm.launch

    def spy(*args, **kwargs):
        saved.append(args[6] if len(args) > 6 else kwargs.get("pre"))
        return real(*args, **kwargs)

    monkeypatch.setattr(mm, "launch", spy)
    dtype = torch.float16
    a, b = rnd((17, 16), dtype), rnd((16, 16), dtype)
    run(a, b, None, "gelu")
    assert saved == [None]
    run(a.requires_grad_(), b, None, "gelu")
    assert saved[-1] is not None and saved[-1].shape == (17, 16)


# ---------------------------------------------------------------------------------- bmm


def bmm_run(a, b):
    with kf.backend("triton"):
        return ops.bmm(a, b)


@pytest.mark.parametrize("case", ["plain", "aT_bT", "b_broadcast", "a_broadcast"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bmm_forward_backward(kernel, dtype, case):
    bs, m, n, k = 3, 17, 40, 32
    if case == "b_broadcast":
        a = rnd((bs, m, k), dtype, requires_grad=True)
        w = rnd((k, n), dtype, scale=0.3, requires_grad=True)
        b = w.expand(bs, k, n)
        leaves = [a, w]
    elif case == "a_broadcast":
        w = rnd((m, k), dtype, requires_grad=True)
        a = w.expand(bs, m, k)
        b = rnd((bs, k, n), dtype, scale=0.3, requires_grad=True)
        leaves = [w, b]
    else:
        t = case == "aT_bT"
        a = rnd((bs, m, k), dtype, transposed=t, requires_grad=True)
        b = rnd((bs, k, n), dtype, scale=0.3, transposed=t, requires_grad=True)
        leaves = [a, b]
    y = bmm_run(a, b)
    assert y.shape == (bs, m, n) and y.is_contiguous()
    gy = rnd(y.shape, dtype)
    got = grads([y], leaves, [gy])
    ref_leaves = f64(*leaves)
    if case == "b_broadcast":
        ref = torch.bmm(ref_leaves[0], ref_leaves[1].expand(bs, k, n))
    elif case == "a_broadcast":
        ref = torch.bmm(ref_leaves[0].expand(bs, m, k), ref_leaves[1])
    else:
        ref = torch.bmm(*ref_leaves)
    want = grads([ref], ref_leaves, [gy.double()])
    assert_close(y, ref, dtype, "y")
    for g, r, what in zip(got, want, ("da", "db"), strict=True):
        assert_close(g, r, dtype, what, tol_scale=2.0)


def test_bmm_odd_sizes(kernel):
    dtype = torch.bfloat16
    a, b = rnd((2, 1, 17), dtype), rnd((2, 17, 33), dtype)
    assert_close(bmm_run(a, b), torch.bmm(*f64(a, b)), dtype, "odd")


# ---------------------------------------------------------------------------------- linear


def test_linear_runs_more_than_16_rows_on_the_gemm_when_triton_is_named(kernel):
    dtype = torch.bfloat16
    w = rnd((40, 64), dtype, scale=0.2, requires_grad=True)
    bias = rnd((40,), dtype, requires_grad=True)
    x = rnd((3, 7, 64), dtype, requires_grad=True)  # 21 rows
    args = {"x": x, "weight": w, "bias": bias}
    assert not dispatch._IMPLS["linear"]["triton"].auto  # auto keeps cuBLAS (faster)
    with kf.backend("triton"):
        assert dispatch.select("linear", args).backend == "triton"
    small = rnd((2, 8, 64), dtype)  # 16 rows: the GEMV's (or torch's without a GPU)
    reason = mm._supports_linear(small, w)
    assert reason is not None and "GEMV" in reason
    with warnings.catch_warnings(), kf.backend("triton"):
        warnings.simplefilter("error", kf.FallbackWarning)
        y = ops.linear(x, w, bias)
    gy = rnd(y.shape, dtype)
    got = grads([y], [x, w, bias], [gy])
    leaves = f64(x, w, bias)
    ref = torch.nn.functional.linear(*leaves)
    want = grads([ref], leaves, [gy.double()])
    assert_close(y, ref, dtype, "y")
    for g, r, t, what in zip(got, want, (x, w, bias), ("dx", "dw", "db"), strict=True):
        assert g.stride() == t.stride(), f"{what}: strides {g.stride()} != {t.stride()}"
        assert_close(g, r, dtype, what, tol_scale=2.0)


# ---------------------------------------------------------------------------------- checks


def test_checks_raise_clear_errors():
    a, b = torch.randn(3, 8), torch.randn(8, 5)
    with pytest.raises(ShapeError, match=r"\(3, 7\).*\(8, 5\)"):
        ops.matmul(torch.randn(3, 7), b)
    with pytest.raises(ShapeError, match="2-D"):
        ops.matmul(a, torch.randn(2, 8, 5))
    with pytest.raises(DTypeError, match="share one dtype"):
        ops.matmul(a.half(), b)
    with pytest.raises(DTypeError, match="share one dtype"):
        ops.matmul(a, b, bias=torch.randn(5).bfloat16())
    with pytest.raises(DTypeError, match="floating"):
        ops.matmul(a.int(), b.int())
    with pytest.raises(ArgumentError, match="activation"):
        ops.matmul(a, b, activation="tanh")
    with pytest.raises(ShapeError, match="bias"):
        ops.matmul(a, b, bias=torch.randn(4))
    with pytest.raises(ShapeError, match="residual"):
        ops.matmul(a, b, residual=torch.randn(5, 3))
    with pytest.raises(DeviceError, match="one device"):
        ops.matmul(a, b.to("meta"))
    with pytest.raises(DeviceError, match="one device"):
        ops.matmul(a, b, residual=torch.randn(3, 5, device="meta"))
    with pytest.raises(TypeError):
        ops.matmul(a.numpy(), b)
    with pytest.raises(ShapeError, match="3-D"):
        ops.bmm(a, b)
    with pytest.raises(ShapeError, match="batch"):
        ops.bmm(torch.randn(2, 3, 8), torch.randn(3, 8, 5))
    with pytest.raises(ShapeError, match="chain"):
        ops.bmm(torch.randn(2, 3, 8), torch.randn(2, 7, 5))
    with pytest.raises(DTypeError, match="share one dtype"):
        ops.bmm(torch.randn(2, 3, 8).half(), torch.randn(2, 8, 5))


def test_fp32_is_not_the_triton_kernels():
    a, b = torch.randn(3, 8, device=DEVICE), torch.randn(8, 5, device=DEVICE)
    assert "float16" in mm._supports_matmul(a, b)
    with pytest.raises(kf.UnsupportedError):  # fallback forbidden in kernel tests
        run(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_torch_backend_reference(dtype):
    a = torch.randn(2, 5, 8, dtype=dtype, requires_grad=True)
    b = torch.randn(8, 6, dtype=dtype, requires_grad=True)
    bias, res = torch.randn(6, dtype=dtype), torch.randn(2, 5, 6, dtype=dtype)
    with kf.backend("torch"):
        y = ops.matmul(a, b, bias, "silu", res)
        yb = ops.bmm(a, b.expand(2, 8, 6))
    z = a @ b + bias
    assert torch.allclose(y, z * torch.sigmoid(z) + res, atol=1e-5)
    assert torch.allclose(yb, a @ b, atol=1e-5)


def test_tuning_keys_and_defaults():
    a, b = mm._operand(torch.randn(64, 32)), mm._operand(torch.randn(16, 32).t())
    assert (a.trans, b.trans) == (False, True)
    assert mm._operand(torch.randn(32, 64).t()).trans
    assert mm._operand(torch.randn(1, 64).t()).trans  # one contiguous column
    key = mm._key("tma", 100, 16, 32, a, b, 1, False)
    assert key[0] == 128 and key[4:6] == (0, 1)
    if not ON_GPU:
        assert mm.default_config("tma", 4096, 4096) == mm.INTERPRET_CONFIG
    for kernel in ("tma", "pointer"):
        for cls in ("small", "large"):
            assert (kernel, cls) in mm.DEFAULTS and (kernel, cls) in mm.TUNERS
    assert mm.shape_class(128, 4096) == "small" and mm.shape_class(8192, 8192) == "large"
    assert mm.shape_class(512, 4096, batch=4) == "large"
    # Every shipped default is one of its tuner's candidates (so the tuner can confirm it).
    for key, cfg in mm.DEFAULTS.items():
        assert cfg in mm.TUNERS[key].configs, key


# ---------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("b_t", [False, True], ids=["b", "bT"])
@pytest.mark.parametrize("mnk", [(1000, 1000, 4097), (4097, 1024, 1000), (17, 4096, 4096),
                                 (1, 1000, 1024), (2048, 2048, 2048)], ids=str)  # fmt: skip
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_large_shapes(kernel, dtype, mnk, b_t):
    m, n, k = mnk
    a = rnd((m, k), dtype)
    b = rnd((k, n), dtype, scale=k**-0.5, transposed=b_t)
    bias, res = rnd((n,), dtype), rnd((m, n), dtype)
    assert_close(run(a, b), ref_matmul(a, b), dtype, "plain")
    assert_close(run(a, b, bias, "gelu", res), ref_matmul(a, b, bias, "gelu", res), dtype, "epi")


@pytest.mark.gpu
@pytest.mark.parametrize(
    "kind,cfg",
    [("tma", c) for c in mm.TMA_CONFIGS] + [("pointer", c) for c in mm.PTR_CONFIGS],
    ids=str,
)
def test_gpu_every_candidate_config(kind, cfg):
    """Whatever the tuner picks computes the right thing, fused epilogue included."""
    dtype = torch.bfloat16
    m, n, k = 1000, 1032, 520
    a, b = rnd((m, k), dtype), rnd((k, n), dtype, scale=k**-0.5, transposed=True)
    bias, res = rnd((n,), dtype), rnd((m, n), dtype)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
    pre = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
    try:
        assert mm.launch(a, b, out, bias, res, "silu", pre, config=cfg, kernel=kind) == kind
    except OutOfResources:
        # Flattened loops keep the epilogue's buffers beside the pipeline's: the heaviest
        # epilogue may not fit. launch() then runs SAFE_TMA (test_oversized_config_falls_back).
        assert cfg.flatten, f"{cfg} does not fit the GPU's shared memory"
        pytest.skip("does not fit with the pre-activation output")
    assert_close(out, ref_matmul(a, b, bias, "silu", res), dtype, str(cfg))
    assert_close(pre, ref_matmul(a, b, bias), dtype, "pre-activation")


@pytest.mark.gpu
def test_gpu_oversized_config_falls_back(monkeypatch):
    """A tuned config that does not fit a heavier epilogue variant runs SAFE_TMA instead."""
    too_big = mm._c(256, 256, 64, 8, 4, st=True)  # > 227 KB of shared memory
    monkeypatch.setattr(mm, "_pick", lambda *args: too_big)
    dtype = torch.bfloat16
    a, b = rnd((1000, 520), dtype), rnd((520, 1032), dtype, scale=0.05)
    out = torch.full((1000, 1032), float("nan"), dtype=dtype, device=DEVICE)
    assert mm.launch(a, b, out, None, None, "relu") == "tma"
    assert_close(out, ref_matmul(a, b, None, "relu"), dtype, "fallback")


@pytest.mark.gpu
def test_gpu_bmm_large():
    dtype = torch.bfloat16
    a, b = rnd((4, 1000, 520), dtype), rnd((4, 520, 1032), dtype, scale=0.05)
    assert_close(bmm_run(a, b), torch.bmm(*f64(a, b)), dtype, "bmm")


@pytest.mark.gpu
def test_gpu_torch_compile_and_cuda_graph():
    dtype = torch.bfloat16
    a, b = rnd((300, 256), dtype), rnd((256, 512), dtype, scale=0.1)
    bias = rnd((512,), dtype)
    fn = torch.compile(lambda a, b, c: ops.matmul(a, b, c, "gelu") * 2, fullgraph=True)
    assert_close(fn(a, b, bias), 2 * ref_matmul(a, b, bias, "gelu"), dtype, "compiled")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        run(a, b, bias, "gelu")  # tuned, compiled and split-K counters made before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        y = run(a, b, bias, "gelu")
    a.copy_(rnd(a.shape, dtype))
    graph.replay()
    torch.cuda.synchronize()
    assert_close(y, ref_matmul(a, b, bias, "gelu"), dtype, "graph replay")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_out_is_written_in_place(kernel, backend):
    """``out=``: a NaN-poisoned tensor is filled with exactly the result of the call without
    it (leading dims, epilogue, a transposed weight) and returned."""
    dtype = torch.float16
    a, b = rnd((2, 3, 24), dtype), rnd((24, 40), dtype, scale=0.2, transposed=True)
    bias, res = rnd((40,), dtype), rnd((2, 3, 40), dtype)
    with kf.backend(backend):
        want = ops.matmul(a, b, bias, "silu", res)
        out = torch.full((2, 3, 40), float("nan"), device=DEVICE, dtype=dtype)
        got = ops.matmul(a, b, bias, "silu", res, out=out)
        assert got is out and torch.equal(out, want)
        v, o1 = rnd((24,), dtype), torch.full((40,), float("nan"), device=DEVICE, dtype=dtype)
        assert torch.equal(ops.matmul(v, b, out=o1), ops.matmul(v, b))
    assert_close(out, ref_matmul(a, b, bias, "silu", res), dtype, "out=")


def test_out_errors():
    a, b = rnd((5, 8), torch.float16), rnd((8, 6), torch.float16)
    with pytest.raises(ShapeError, match=r"out has shape \(6, 5\)"):
        ops.matmul(a, b, out=torch.empty(6, 5, device=DEVICE).half())
    with pytest.raises(DTypeError, match="out is torch.float32"):
        ops.matmul(a, b, out=torch.empty(5, 6, device=DEVICE))
    with pytest.raises(DeviceError, match="meta"):
        ops.matmul(a, b, out=torch.empty(5, 6, device="meta").half())
    with pytest.raises(ArgumentError, match="contiguous"):
        ops.matmul(a, b, out=torch.empty(6, 5, device=DEVICE).half().t())
    with pytest.raises(ArgumentError, match="no autograd"):
        ops.matmul(a.clone().requires_grad_(), b, out=torch.empty(5, 6, device=DEVICE).half())
