"""softmax and log_softmax against a float64 reference, forward and backward, one-pass and looped
(wide-row) kernels, non-finite inputs and any ``dim``."""

from __future__ import annotations

import math

import pytest
import torch

import kernforge as kf
from kernforge import dispatch, ops
from kernforge.kernels import softmax as softmax_mod
from kernforge.kernels.common import RowLaunch
from tests.helpers import (
    DEVICE,
    DTYPES,
    LAYOUTS,
    assert_close,
    f64,
    grads,
    randn,
    reference,
    sizes,
)

OPS = {"softmax": ops.softmax, "log_softmax": ops.log_softmax}
SHAPES = sizes(
    cpu=[(1, 1), (3, 127), (2, 3, 1000), (65, 64), (2, 4095)],
    gpu=[(1000, 4096), (7, 8192), (33, 14336), (2, 65536), (3, 152064), (2, 262144)],
)
#: Shapes for the looped kernels with LOOP_ROW / LOOP_BLOCK patched small (see `looped`):
#: several steps, a ragged last step, and a row one feature over the threshold.
LOOPED_SHAPES = [(3, 100), (2, 5, 65), (1, 257)]
INF = float("inf")


@pytest.fixture
def looped(monkeypatch):
    """Route rows wider than 64 features through the looped kernels, 32 features a step."""
    monkeypatch.setattr(softmax_mod, "LOOP_ROW", 64)
    monkeypatch.setattr(softmax_mod, "LOOP_FWD", RowLaunch(1, 32, 1))
    monkeypatch.setattr(softmax_mod, "LOOP_BWD", RowLaunch(1, 32, 1))


def check(name, x, dim=-1, gy=None, tol_scale=1.0):
    """Run op ``name`` on the Triton backend, forward and backward, against float64 torch."""
    op = OPS[name]
    assert dispatch.select(name, {"x": x, "dim": dim}).backend == "triton"
    with kf.backend("triton"):
        y = op(x, dim)
        gy = torch.randn_like(y) if gy is None else gy
        (dx,) = grads([y], [x], [gy])
    (xd,) = f64(x)
    ref = reference(op, xd, dim)
    (want,) = grads([ref], [xd], [gy.double()])
    assert y.dtype == x.dtype
    assert_close(y, ref, x.dtype, "y", tol_scale)
    assert_close(dx, want, x.dtype, "dx", tol_scale)
    return y, dx


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", OPS)
def test_softmax_matches_reference(shape, dtype, name):
    check(name, randn(shape, dtype, requires_grad=True, scale=2.0))


@pytest.mark.parametrize("shape", LOOPED_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", OPS)
def test_softmax_looped_matches_reference(looped, shape, dtype, name):
    check(name, randn(shape, dtype, requires_grad=True, scale=2.0))


@pytest.mark.parametrize("name", OPS)
def test_softmax_row_over_the_loop_threshold(name):
    """The real threshold and step sizes: one row that fits one pass, one just over it."""
    for n in (softmax_mod.LOOP_ROW, softmax_mod.LOOP_ROW + 1):
        check(name, randn((2, n), torch.bfloat16, requires_grad=True, scale=2.0))


@pytest.mark.parametrize("path", ["one-pass", "looped"])
@pytest.mark.parametrize("layout", LAYOUTS[1:])
@pytest.mark.parametrize("name", OPS)
def test_softmax_layouts(request, path, layout, name):
    if path == "looped":
        request.getfixturevalue("looped")
    dtype = torch.float16
    x = randn((5, 3, 96), dtype, layout=layout, requires_grad=True)
    check(name, x, gy=randn(x.shape, dtype, layout=layout))


@pytest.mark.parametrize("dim", [0, 1, -3, -2, 2])
@pytest.mark.parametrize("name", OPS)
def test_softmax_any_dim(dim, name):
    x = randn((6, 5, 33), torch.float32, requires_grad=True)
    y, _ = check(name, x, dim)
    # the probabilities sum to 1 along the op's dim, not the last one
    probs = y.exp() if name == "log_softmax" else y
    total = probs.sum(dim)
    assert torch.allclose(total, torch.ones_like(total), atol=1e-5)


@pytest.mark.parametrize("shape", [(0, 32), (3, 0), (2, 0, 7)], ids=str)
@pytest.mark.parametrize("name", OPS)
def test_softmax_empty(shape, name):
    x = randn(shape, torch.float32, requires_grad=True)
    with kf.backend("triton"):
        y = OPS[name](x)
        y.sum().backward()
    assert y.shape == shape and x.grad.shape == shape


@pytest.mark.parametrize("path", ["one-pass", "looped"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", OPS)
def test_softmax_neg_inf_entries(request, path, dtype, name):
    """-inf beside finite values (masking) gets probability 0; in the looped kernels whole
    steps are -inf, before and after the finite values."""
    if path == "looped":
        request.getfixturevalue("looped")
    x = randn((4, 100), dtype, scale=2.0)
    x[:, :40] = -INF  # whole first steps of 32 in the looped kernels
    x[1, 70:] = -INF
    x[2, ::3] = -INF
    x[3] = -INF
    x[3, 45] = 1.0  # the one finite value: probability 1
    x.requires_grad_(True)
    gy = randn(x.shape, dtype)
    with kf.backend("triton"):
        y = OPS[name](x)
        (dx,) = grads([y], [x], [gy])
    (xd,) = f64(x)
    ref = reference(OPS[name], xd)
    (want,) = grads([ref], [xd], [gy.double()])
    masked = torch.isinf(x.detach())
    if name == "softmax":
        assert (y[masked] == 0).all()
        assert_close(y, ref, dtype, "y")
        assert y[3, 45] == 1
    else:
        assert torch.equal(y[masked], torch.full_like(y[masked], -INF))
        assert_close(y[~masked], ref[~masked], dtype, "y")
        assert y[3, 45] == 0
    assert_close(dx, want, dtype, "dx")


@pytest.mark.parametrize("path", ["one-pass", "looped"])
@pytest.mark.parametrize("name", OPS)
def test_softmax_nan_rows_like_torch(request, path, name):
    """A row of all -inf, or holding +inf or NaN, is NaN throughout, as torch makes it."""
    if path == "looped":
        request.getfixturevalue("looped")
    x = randn((5, 100), torch.float32)
    x[0] = -INF
    x[1, 50] = INF
    x[2, 3] = INF
    x[2, 90] = -INF
    x[3, 99] = float("nan")
    with kf.backend("triton"):
        y = OPS[name](x)
    ref = reference(OPS[name], x.double())
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    assert torch.isnan(y[:4]).all()
    assert_close(y[4], ref[4], torch.float32, "finite row")


def test_softmax_large_magnitudes():
    """Logits far from 0 (where exp without the max shift overflows) stay exact in fp32."""
    x = (randn((4, 300), torch.float32) * 50 + 1e4).requires_grad_(True)
    check("softmax", x)
    check("log_softmax", x)


def test_softmax_wide_rows_take_triton():
    """Rows over the one-pass limit stay on Triton (the looped kernels); fp64 is refused
    (the kernel tests forbid the fallback, so dispatch raises with Triton's reason)."""
    wide = torch.empty(2, softmax_mod.LOOP_ROW + 1, device=DEVICE)
    assert dispatch.select("softmax", {"x": wide, "dim": -1}).backend == "triton"
    x64 = torch.ones(2, 8, dtype=torch.float64, device=DEVICE)
    with pytest.raises(kf.UnsupportedError, match="float64"):
        dispatch.select("log_softmax", {"x": x64, "dim": -1})
    assert "float64" in softmax_mod._supports_triton(x64, -1)


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize(
    "make, dim, error, word",
    [
        (lambda: torch.ones(4, 8, dtype=torch.int32, device=DEVICE), -1, kf.DTypeError, "dtype"),
        (lambda: torch.tensor(1.0, device=DEVICE), -1, kf.ShapeError, "dimension"),
        (lambda: [1.0, 2.0], -1, TypeError, "Tensor"),
        (lambda: randn((4, 8)), 2, kf.ArgumentError, "dim"),
        (lambda: randn((4, 8)), -3, kf.ArgumentError, "dim"),
        (lambda: randn((4, 8)), 1.0, kf.ArgumentError, "dim"),
        (lambda: randn((4, 8)), None, kf.ArgumentError, "dim"),
    ],
    ids=["int-x", "scalar", "not-tensor", "dim-high", "dim-low", "dim-float", "dim-none"],
)
def test_softmax_bad_input(name, make, dim, error, word):
    with pytest.raises(error, match=word):
        OPS[name](make(), dim)


def test_softmax_compiles_without_graph_breaks():
    """Both ops in one torch.compile(fullgraph=True) graph, forward and backward."""

    def f(x):
        return (ops.softmax(x, 0) * ops.log_softmax(x)).sum()

    x = randn((4, 37), torch.float32, requires_grad=True)
    with kf.backend("triton"):
        out = torch.compile(f, fullgraph=True)(x)
        (dx,) = torch.autograd.grad(out, [x])
    (xd,) = f64(x)
    want = reference(f, xd)
    (want_dx,) = torch.autograd.grad(want, [xd])
    assert math.isclose(out.item(), want.item(), rel_tol=1e-5)
    assert_close(dx, want_dx, torch.float32, "dx")
