"""kf.rowwise: norms, softmax and friends from expressions, forward and derived backward on
Triton (interpreter here) against the float64 torch reference and against torch's own ops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernforge as kf
from kernforge.errors import ShapeError, UnsupportedError
from kernforge.expr import ExpressionError, elementwise, reference, rowwise
from tests.helpers import DEVICE, DTYPES, LAYOUTS, assert_close, randn, sizes

SHAPES = sizes(
    cpu=[(1, 1), (3, 127), (2, 3, 33), (65, 64), (2, 1000)],
    gpu=[(1000, 4096), (33, 14336), (7, 3, 8191), (4099, 1)],
)

RMS = "x * rsqrt(rowmean(x * x) + eps) * w"


def rms_norm():
    return rowwise(RMS, params={"eps": 1e-6}, name="test_rms")


def layer_norm():
    return rowwise(
        map=["x", "(x - acc0) * (x - acc0)"], reduce="mean",
        finalize="(x - acc0) * rsqrt(acc1 + eps) * w + b", params={"eps": 1e-5},
        name="test_layer_norm",
    )  # fmt: skip


def softmax():
    return rowwise("exp(x - rowmax(x)) / rowsum(exp(x - rowmax(x)))", name="test_softmax")


def logsumexp():
    return rowwise("rowmax(x) + log(rowsum(exp(x - rowmax(x))))", name="test_lse")


def check(op, tensors, params=None, backend="triton", tol_scale=1.0, layout="contiguous"):
    """``op`` on ``backend`` against the float64 reference: output and every gradient."""
    params = params or {}
    dtype = tensors[0].dtype
    with kf.backend(backend):
        out = op(*tensors, **params)
        dy = (
            randn(out.shape, out.dtype, layout=layout)
            if out.dim()
            else torch.randn((), device=DEVICE)
        )
        need = [t for t in tensors if t.requires_grad]
        got = torch.autograd.grad(out, need, dy)
    ref_in = [t.detach().double().requires_grad_(t.requires_grad) for t in tensors]
    ref = reference(op, *ref_in, **params)
    assert out.dtype == dtype
    assert_close(out, ref, dtype, "out", tol_scale)
    want = torch.autograd.grad(ref, [t for t in ref_in if t.requires_grad], dy.double())
    names = [n for n, t in zip(op.inputs, tensors, strict=True) if t.requires_grad]
    for name, g, w, t in zip(names, got, want, need, strict=True):
        assert g.shape == t.shape and g.dtype == t.dtype, name
        assert_close(g, w, dtype, f"d{name}", tol_scale)
    return out


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm(shape, dtype):
    x = randn(shape, dtype, requires_grad=True)
    w = randn(shape[-1:], dtype, requires_grad=True)
    # A 1-wide row's dx = w*dy*(1 - xhat**2)*rstd cancels, and rstd reaches 1/sqrt(eps): the
    # error bound grows by that factor (as in tests/kernels/test_rms_norm.py).
    cond = 1e-6**-0.5 if shape[-1] == 1 else 1
    out = check(rms_norm(), [x, w], tol_scale=cond)
    want = F.rms_norm(x.detach().float(), shape[-1:], w.detach().float(), eps=1e-6)
    assert_close(out, want.double(), dtype, "vs F.rms_norm")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_layouts(layout, dtype):
    x = randn((5, 45), dtype, layout=layout, requires_grad=True)
    w = randn((45,), dtype, requires_grad=True)
    check(rms_norm(), [x, w], layout=layout)


def test_map_reduce_finalize_form_matches_expression_form():
    mrf = rowwise(map="x * x", reduce="sum", finalize="x * rsqrt(acc / n + eps) * w",
                  params={"eps": 1e-6}, name="test_rms_mrf")  # fmt: skip
    x = randn((6, 50), torch.float32, requires_grad=True)
    w = randn((50,), torch.float32, requires_grad=True)
    check(mrf, [x, w])
    with kf.backend("triton"):
        torch.testing.assert_close(mrf(x, w), rms_norm()(x, w), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 1), (3, 127), (2, 3, 33)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer_norm(shape, dtype):
    x = randn(shape, dtype, requires_grad=True)
    w = randn(shape[-1:], dtype, requires_grad=True)
    b = randn(shape[-1:], dtype, requires_grad=True)
    out = check(layer_norm(), [x, w, b])
    want = F.layer_norm(x.detach().double(), shape[-1:], w.detach().double(), b.detach().double())
    assert_close(out, want, dtype, "vs F.layer_norm")


@pytest.mark.parametrize("shape", [(1, 1), (3, 127), (4, 3, 40)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_softmax(shape, dtype):
    x = randn(shape, dtype, requires_grad=True, scale=3.0)
    out = check(softmax(), [x])
    assert_close(out, torch.softmax(x.detach().double(), -1), dtype, "vs torch.softmax")


def test_log_softmax():
    op = rowwise("x - rowmax(x) - log(rowsum(exp(x - rowmax(x))))", name="test_log_softmax")
    x = randn((7, 77), torch.float32, requires_grad=True, scale=4.0)
    out = check(op, [x])
    assert_close(out, torch.log_softmax(x.detach().double(), -1), torch.float32, "vs torch")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_per_row_output(dtype):
    """An expression that uses no input outside reductions gives one value per row."""
    x = randn((3, 5, 61), dtype, requires_grad=True, scale=3.0)
    out = check(logsumexp(), [x])
    assert out.shape == (3, 5)
    assert_close(out, torch.logsumexp(x.detach().double(), -1), dtype, "vs torch.logsumexp")


@pytest.mark.parametrize("kind", ["sum", "mean", "max", "min"])
def test_reduce_kinds(kind):
    op = rowwise(map="x * y", reduce=kind, name=f"test_reduce_{kind}")  # finalize: acc
    x = randn((6, 19), torch.float32, requires_grad=True)
    y = randn((6, 19), torch.float32, requires_grad=True)
    out = check(op, [x, y])
    assert out.shape == (6,)


def test_max_gradient_is_shared_among_ties():
    op = rowwise(map="x", reduce="max", name="test_reduce_ties")
    x = torch.tensor([[1.0, 3.0, 3.0, -2.0], [5.0, 5.0, 5.0, 5.0]], device=DEVICE)
    x.requires_grad_()
    with kf.backend("triton"):
        (g,) = torch.autograd.grad(op(x).sum(), [x])
    want = torch.tensor([[0, 0.5, 0.5, 0], [0.25, 0.25, 0.25, 0.25]], device=DEVICE)
    torch.testing.assert_close(g, want)


def test_per_row_input_and_broadcast():
    """A per-row temperature [..., 1] and a per-feature bias [n] broadcast over [..., n]; their
    gradients are summed over the broadcast dimensions."""
    op = rowwise("exp((x + b) / t - rowmax((x + b) / t)) / rowsum(exp((x + b) / t - "
                 "rowmax((x + b) / t)))", name="test_temperature")  # fmt: skip
    x = randn((4, 3, 29), torch.float32, requires_grad=True)
    b = randn((29,), torch.float32, requires_grad=True)
    t = (torch.rand(4, 3, 1, device=DEVICE) + 0.5).requires_grad_()
    check(op, [x, b, t])


def test_chained_reductions_and_params():
    op = rowwise(
        map=["abs(x)", "exp(x / (acc0 + 1)) * scale"], reduce=["max", "sum"],
        finalize="x * acc1 / n + acc0", params={"scale": 1.0}, name="test_chain",
    )  # fmt: skip
    x = randn((5, 33), torch.float32, requires_grad=True)
    check(op, [x], {"scale": 0.7})


def test_explicit_rowwise_gradient():
    # The RMSNorm input gradient written by hand, with its own row reduction.
    r = "rsqrt(rowmean(x * x) + eps)"
    grad_x = f"{r} * (dy * w - x * {r} * {r} * rowmean(dy * w * x))"
    op = rowwise(RMS, params={"eps": 1e-6}, grad={"x": grad_x}, name="test_rms_explicit")
    x = randn((6, 70), torch.float32, requires_grad=True)
    w = randn((70,), torch.float32, requires_grad=True)
    check(op, [x, w])  # matches autograd of the reference: the given gradient is right
    assert any("rowmean(dy * w * x)" in e for e in op.expression("backward"))
    # A wrong explicit gradient is used as given (it is the user's definition).
    wrong = rowwise(RMS, params={"eps": 1e-6}, grad={"x": "dy"}, name="test_rms_wrong")
    with kf.backend("triton"):
        out = wrong(x, w)
        dy = torch.randn_like(out)
        (gx,) = torch.autograd.grad(out, [x], dy)
    torch.testing.assert_close(gx, dy)


def test_torch_backend_matches_triton():
    x = randn((4, 100), torch.float32, requires_grad=True)
    w = randn((100,), torch.float32, requires_grad=True)
    outs = []
    for backend in ("torch", "triton"):
        with kf.backend(backend):
            y = rms_norm()(x, w)
            outs.append((y, *torch.autograd.grad(y.sum(), [x, w])))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_wide_rows_unsupported_on_triton():
    x = torch.randn(1, 65537, device=DEVICE)
    w = torch.randn(65537, device=DEVICE)
    with kf.backend("triton"), pytest.raises(UnsupportedError, match="single-pass"):
        rms_norm()(x, w)


def test_rowwise_call_errors():
    with pytest.raises(ShapeError, match="0 features"):
        rms_norm()(torch.randn(3, 0, device=DEVICE), torch.randn(0, device=DEVICE))
    with pytest.raises(ShapeError, match="0-D"):
        rowwise("rowsum(x)", name="test_rowsum")(torch.randn((), device=DEVICE))


def test_rowwise_definition_errors():
    with pytest.raises(ExpressionError, match="reduces nothing"):
        rowwise("x * 2")
    with pytest.raises(ExpressionError, match="only available in rowwise"):
        elementwise("x / rowsum(x)")
    with pytest.raises(ExpressionError, match="reduce='median'"):
        rowwise(map="x", reduce="median")
    with pytest.raises(ExpressionError, match="either an expression or map"):
        rowwise("rowsum(x)", map="x")
    with pytest.raises(ExpressionError, match="reserved"):
        rowwise("rowsum(x) * n", inputs=["x", "n"])
    with pytest.raises(ExpressionError, match="unknown variable 'acc1'"):
        rowwise(map=["x", "x * acc1"], reduce="sum", finalize="acc0")
    with pytest.raises(ExpressionError, match="2 map expressions but 3"):
        rowwise(map=["x", "x"], reduce=["sum", "sum", "max"])
    with pytest.raises(ExpressionError, match="rowsum\\(\\) takes 1 argument"):
        rowwise("rowsum(x, x)")
