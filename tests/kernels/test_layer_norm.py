"""layer_norm against a float64 reference, forward and backward, with and without affine."""

from __future__ import annotations

import pytest
import torch

import kernforge as kf
from kernforge import ops
from kernforge.kernels import layer_norm as ln
from tests.helpers import (
    DEVICE,
    DTYPES,
    LAYOUTS,
    TOL,
    assert_close,
    f64,
    grads,
    randn,
    reference,
    sizes,
)

SHAPES = sizes(
    cpu=[(1, 1), (3, 127), (2, 3, 1000), (65, 64), (2, 4095)],
    gpu=[(1000, 4096), (7, 8192), (33, 14336), (2, 65536), (4096, 14336)],
)
#: Which of weight and bias are given.
AFFINE = {
    "affine": (True, True),
    "weight": (True, False),
    "bias": (False, True),
    "none": (False, False),
}


def check(x, w, b, eps=1e-5, tol_scale=1.0):
    """Run ops.layer_norm on Triton and the float64 reference; compare y and every gradient."""
    dtype = x.dtype
    with kf.backend("triton"):
        y = ops.layer_norm(x, w, b, eps)
        gy = torch.randn_like(y)
        got = grads([y], [x, w, b], [gy])
    xd, wd, bd = f64(x, w, b)
    ref = reference(ops.layer_norm, xd, wd, bd, eps)
    want = grads([ref], [xd, wd, bd], [gy.double()])
    assert y.dtype == dtype
    assert_close(y, ref, dtype, "y", tol_scale)
    # A 1-wide row's dx is 0 in exact arithmetic; rounding in x - mean is amplified by rstd,
    # which is then 1/sqrt(eps).
    cond = eps**-0.5 if x.shape[-1] == 1 else 1
    assert_close(got[0], want[0], dtype, "dx", tol_scale * cond)
    for g, wg, t, name in [(got[1], want[1], w, "dweight"), (got[2], want[2], b, "dbias")]:
        if t is not None and t.requires_grad:
            assert g.dtype == t.dtype
            assert_close(g, wg, dtype, name, tol_scale * 2)  # summed over many rows
        else:
            assert g is None


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer_norm_matches_reference(shape, dtype):
    x = randn(shape, dtype, requires_grad=True)
    w = randn(shape[-1:], dtype, requires_grad=True)
    b = randn(shape[-1:], dtype, requires_grad=True)
    check(x, w, b)


@pytest.mark.parametrize("layout", LAYOUTS[1:])
@pytest.mark.parametrize("affine", list(AFFINE), ids=str)
def test_layer_norm_layouts_and_affine(layout, affine):
    has_w, has_b = AFFINE[affine]
    dtype = torch.float16
    x = randn((5, 3, 96), dtype, layout=layout, requires_grad=True)
    # Weight and bias in a non-contiguous layout too (every other element of a buffer).
    w = randn((96,), dtype, layout=layout, requires_grad=True) if has_w else None
    b = randn((96,), dtype, layout=layout, requires_grad=True) if has_b else None
    with kf.backend("triton"):
        y = ops.layer_norm(x, w, b, 1e-5)
        gy = randn(y.shape, dtype, layout=layout)
        got = grads([y], [x, w, b], [gy])
    xd, wd, bd = f64(x, w, b)
    ref = reference(ops.layer_norm, xd, wd, bd, 1e-5)
    want = grads([ref], [xd, wd, bd], [gy.double()])
    assert_close(y, ref, dtype, "y")
    assert_close(got[0], want[0], dtype, "dx")
    for g, wg, t, name in [(got[1], want[1], w, "dweight"), (got[2], want[2], b, "dbias")]:
        assert (g is None) == (t is None), name
        if t is not None:
            assert_close(g, wg, dtype, name, tol_scale=2)


def test_layer_norm_large_mean_is_stable():
    # |mean| >> std: E[x^2] - E[x]^2 in fp32 would lose most digits of the variance (relative
    # error ~5e-2 here); centring first keeps the error at torch fp32's (~3e-5).
    x = (randn((8, 1000), torch.float32) + 1000.0).requires_grad_(True)
    w = randn((1000,), torch.float32, requires_grad=True)
    b = randn((1000,), torch.float32, requires_grad=True)
    check(x, w, b, tol_scale=5)


def test_layer_norm_saved_statistics():
    x = randn((6, 3, 200), torch.bfloat16)
    y, mean, rstd = torch.ops.kernforge.layer_norm_fwd(x, None, None, 1e-5)
    var, want_mean = torch.var_mean(x.double(), dim=-1, correction=0)
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == (6, 3)
    assert torch.allclose(mean.double(), want_mean, rtol=1e-5, atol=1e-6)
    assert torch.allclose(rstd.double(), torch.rsqrt(var + 1e-5), rtol=1e-5)


def test_layer_norm_frozen_weight_and_mixed_dtypes():
    # bf16 activations with fp32 parameters, the weight frozen: only dx and dbias come back.
    x = randn((9, 300), torch.bfloat16, requires_grad=True)
    w = randn((300,), torch.float32)
    b = randn((300,), torch.float32, requires_grad=True)
    check(x, w, b)


def test_layer_norm_eps_matters():
    x = randn((4, 64), torch.float32, scale=1e-3)
    with kf.backend("triton"):
        small = ops.layer_norm(x, None, None, 1e-12)
        big = ops.layer_norm(x, None, None, 1e-2)
    assert_close(small, reference(ops.layer_norm, *f64(x), None, None, 1e-12), torch.float32)
    assert_close(big, reference(ops.layer_norm, *f64(x), None, None, 1e-2), torch.float32)
    assert big.abs().max() < 0.1 < small.abs().max()


@pytest.mark.parametrize("shape", [(0, 32), (2, 0, 32), (3, 0)], ids=str)
def test_layer_norm_empty(shape):
    x = randn(shape, torch.float32, requires_grad=True)
    w = randn(shape[-1:], torch.float32, requires_grad=True)
    b = randn(shape[-1:], torch.float32, requires_grad=True)
    with kf.backend("triton"):
        y = ops.layer_norm(x, w, b)
        y.sum().backward()
    assert y.shape == shape
    assert x.grad.shape == shape
    assert torch.equal(w.grad, torch.zeros_like(w))
    assert torch.equal(b.grad, torch.zeros_like(b))


def test_layer_norm_supports():
    x = randn((2, 16))
    assert ln._supports_triton(x, None, None, 1e-5) is None
    assert "65536" in ln._supports_triton(randn((1, 65537)), None, None, 1e-5)
    assert "float64" in ln._supports_triton(x, None, x[0].double(), 1e-5)


def test_layer_norm_compiles_without_graph_break():
    x = randn((4, 3, 48), torch.bfloat16, requires_grad=True)
    w = randn((48,), torch.bfloat16, requires_grad=True)
    b = randn((48,), torch.bfloat16, requires_grad=True)

    @torch.compile(fullgraph=True)
    def f(x, w, b):
        return ops.layer_norm(x, w, b, 1e-5) * 2.0

    with kf.backend("triton"):
        y = f(x, w, b)
        gy = torch.randn_like(y)
        got = grads([y], [x, w, b], [gy])
    xd, wd, bd = f64(x, w, b)
    ref = reference(ops.layer_norm, xd, wd, bd, 1e-5) * 2.0
    want = grads([ref], [xd, wd, bd], [gy.double()])
    assert_close(y, ref, torch.bfloat16, "y")
    for g, r, name in zip(got, want, ["dx", "dweight", "dbias"], strict=True):
        assert_close(g, r, torch.bfloat16, name, tol_scale=2)


@pytest.mark.parametrize(
    "make, error, word",
    [
        (lambda: (randn((4, 8)), randn((7,)), None), kf.ShapeError, "weight"),
        (lambda: (randn((4, 8)), randn((2, 8)), None), kf.ShapeError, "weight"),
        (lambda: (randn((4, 8)), None, randn((9,))), kf.ShapeError, "bias"),
        (lambda: (randn((4, 8)), None, randn((1, 8))), kf.ShapeError, "bias"),
        (
            lambda: (torch.ones(4, 8, dtype=torch.int32, device=DEVICE), None, None),
            kf.DTypeError,
            "x",
        ),  # fmt: skip
        (lambda: (randn((4, 8)), randn((8,)).to(torch.int64), None), kf.DTypeError, "weight"),
        (lambda: (randn((4, 8)), None, randn((8,)).bool()), kf.DTypeError, "bias"),
        (lambda: (torch.tensor(1.0, device=DEVICE), None, None), kf.ShapeError, "x"),
        (lambda: ([1.0, 2.0], None, None), TypeError, "x"),
        (lambda: (randn((4, 8)), [1.0] * 8, None), TypeError, "weight"),
    ],
    ids=[
        "weight-size",
        "weight-rank",
        "bias-size",
        "bias-rank",
        "int-x",
        "int-weight",
        "bool-bias",
        "scalar",
        "not-tensor",
        "list-weight",
    ],  # fmt: skip
)
def test_layer_norm_bad_input(make, error, word):
    x, w, b = make()
    with pytest.raises(error, match=word):
        ops.layer_norm(x, w, b)


@pytest.mark.gpu
def test_layer_norm_params_on_other_device():
    x = randn((4, 8))
    with pytest.raises(kf.DeviceError, match="weight"):
        ops.layer_norm(x, torch.ones(8))
    with pytest.raises(kf.DeviceError, match="bias"):
        ops.layer_norm(x, None, torch.ones(8))


def test_tolerances_cover_dtypes():
    assert set(TOL) == set(DTYPES)


def test_layer_norm_separate_dbias_path(monkeypatch):
    """Wide rows sum dbias outside the kernel; that path is exact too."""
    from kernforge.kernels import layer_norm as module

    monkeypatch.setattr(module, "SEPARATE_DBIAS", 1)  # every row counts as wide
    x = randn((37, 100), torch.float16, requires_grad=True)
    w = randn((100,), torch.float16, requires_grad=True)
    b = randn((100,), torch.float16, requires_grad=True)
    check(x, w, b)
