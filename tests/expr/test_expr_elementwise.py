"""kf.elementwise: forward and backward on Triton (interpreter here, GPU there) against the
float64 torch reference; broadcasting, layouts, dtypes, params, explicit gradients, errors."""

from __future__ import annotations

import pytest
import torch

import kernforge as kf
from kernforge.errors import ArgumentError, DTypeError, ShapeError, UnsupportedError
from kernforge.expr import ExpressionError, elementwise, reference
from tests.expr.exprcases import EVERYTHING, everything_inputs
from tests.helpers import DEVICE, DTYPES, LAYOUTS, TOL, assert_close, randn, sizes

SHAPES = sizes(
    cpu=[(1,), (7,), (3, 127), (2, 3, 33), (65, 64), (4, 5000)],
    gpu=[(1000, 4096), (3, 7, 8191), (4099, 1)],
)

SILU_MUL = "silu(x) * y"


def check(op, tensors, params=None, backend="triton", tol_scale=1.0):
    """``op`` on ``backend`` against the float64 reference: output and every gradient."""
    params = params or {}
    dtype = tensors[0].dtype
    with kf.backend(backend):
        out = op(*tensors, **params)
        dy = randn(out.shape, out.dtype)
        got = torch.autograd.grad(out, tensors, dy) if out.requires_grad else []
    ref_in = [t.detach().double().requires_grad_(t.requires_grad) for t in tensors]
    ref = reference(op, *ref_in, **params)
    assert out.dtype == dtype
    assert_close(out, ref, dtype, "out", tol_scale)
    if got:
        want = torch.autograd.grad(ref, ref_in, dy.double())
        for name, g, w, t in zip(op.inputs, got, want, tensors, strict=True):
            assert g.shape == t.shape and g.dtype == t.dtype, name
            assert_close(g, w, dtype, f"d{name}", tol_scale)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_silu_mul(shape, dtype):
    op = elementwise(SILU_MUL)
    check(op, [randn(shape, dtype, requires_grad=True) for _ in "xy"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_function(dtype):
    """Every library function and operator in one kernel, forward and both gradients."""
    op = elementwise(EVERYTHING, params={"alpha": 0.1}, name="test_everything")
    x, y = everything_inputs((5, 77), dtype, DEVICE)
    check(op, [x, y], {"alpha": 0.2}, tol_scale=2.0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous(layout, dtype):
    op = elementwise("gelu_tanh(a) * b + c * 0.5", name="test_non_contiguous")
    shape = (5, 37)
    a = randn(shape, dtype, layout=layout, requires_grad=True)
    b = randn(shape, dtype, requires_grad=True)
    c = randn((37, 5), dtype).t().requires_grad_()  # transposed: column stride != 1
    check(op, [a, b, c])


@pytest.mark.parametrize(
    ("shapes"),
    [
        [(4, 7), (7,)],  # a row vector over rows
        [(4, 1), (4, 7)],  # a column over columns
        [(3, 1, 5), (1, 4, 5)],  # both broadcast
        [(2, 3, 4, 5, 6), (6,)],  # five dimensions: more outer dims than kernels walk
        [(2, 1, 4, 1, 6), (3, 1, 5, 1)],  # broadcast with gaps
        [(), (3, 4)],  # a 0-d tensor
    ],
    ids=str,
)
def test_broadcasting(shapes):
    op = elementwise("x * sigmoid(y) - y", name="test_broadcasting")
    tensors = [randn(s, torch.float32, requires_grad=True) if s else
               torch.randn((), device=DEVICE, requires_grad=True) for s in shapes]  # fmt: skip
    check(op, tensors)


def test_expanded_and_sliced_inputs():
    op = elementwise("x * y + exp(-x * x)", name="test_expanded")
    base = randn((6, 9), torch.float16)
    x = base[1:, 2::3].detach().requires_grad_()  # offset, strided in both dims
    y = randn((1, 3), torch.float16).expand(5, 3).detach().requires_grad_()
    check(op, [x, y])


def test_mixed_dtypes_promote():
    op = elementwise("x * y", name="test_promote")
    x = randn((3, 8), torch.bfloat16, requires_grad=True)
    y = randn((3, 8), torch.float32, requires_grad=True)
    with kf.backend("triton"):
        out = op(x, y)
        gx, gy = torch.autograd.grad(out, [x, y], torch.ones_like(out))
    assert out.dtype == torch.float32
    assert gx.dtype == torch.bfloat16 and gy.dtype == torch.float32
    assert_close(out, x.double() * y.double(), torch.bfloat16, "out")
    assert_close(gx, y.double(), torch.bfloat16, "dx")


def test_params_are_runtime_values():
    op = elementwise("x > 0 ? x : alpha * x", params={"alpha": 0.01}, name="test_leaky")
    x = randn((4, 33), torch.float32, requires_grad=True)
    check(op, [x])
    check(op, [x], {"alpha": 0.2})
    check(op, [x], {"alpha": -1.5})
    with kf.backend("triton"):
        assert torch.equal(op(x, 0.2), op(x, alpha=0.2))


def test_required_params():
    op = elementwise("pow(abs(x) + 1, p) * scale", params=["p", "scale"], name="test_required")
    assert op.params == {"p": None, "scale": None}
    x = randn((3, 10), torch.float32, requires_grad=True)
    check(op, [x], {"p": 1.7, "scale": 0.5})
    with pytest.raises(TypeError, match="missing required argument 'p'"):
        op(x, scale=1.0)


def test_explicit_gradient_is_used():
    # A straight-through estimator: forward rounds, backward passes dy through.
    op = elementwise("floor(x * 4 + 0.5) / 4", grad={"x": "dy"}, name="test_ste")
    x = randn((5, 11), torch.float32, requires_grad=True)
    for backend in ("triton", "torch"):
        with kf.backend(backend):
            out = op(x)
            dy = torch.randn_like(out)
            (gx,) = torch.autograd.grad(out, [x], dy)
        assert torch.equal(out, torch.floor(x.detach() * 4 + 0.5) / 4)
        torch.testing.assert_close(gx, dy)


def test_explicit_local_derivative_and_out():
    # Without dy the expression is the local derivative; `out` is the forward value.
    op = elementwise("exp(x) * y", grad={"x": "out"}, name="test_local")
    x, y = (randn((4, 9), torch.float32, requires_grad=True) for _ in "xy")
    check(op, [x, y])  # the given gradient is right, so it matches autograd of the reference


def test_partial_requires_grad():
    op = elementwise(SILU_MUL)
    x = randn((3, 17), torch.float32, requires_grad=True)
    y = randn((3, 17), torch.float32)
    with kf.backend("triton"):
        out = op(x, y)
        (gx,) = torch.autograd.grad(out, [x], torch.ones_like(out))
    xd = x.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(reference(op, xd, y.double()).sum(), [xd])
    assert_close(gx, want, torch.float32, "dx")


def test_empty_input():
    op = elementwise(SILU_MUL)
    x = torch.randn(0, 5, device=DEVICE, requires_grad=True)
    with kf.backend("triton"):
        out = op(x, x)
    assert out.shape == (0, 5)


def test_same_definition_same_op_and_dispatch_registration():
    a = elementwise("x * y + 1")
    b = elementwise("x * y + 1")
    assert a is b
    assert a.name.startswith("expr.elementwise_")
    assert sorted(kf.registered()[a.name]) == ["cuda", "torch", "triton"]
    named = elementwise("x * y + 2", name="test_named_op")
    assert named.name == "expr.test_named_op"
    assert elementwise("x * y + 2", name="test_named_op") is named
    with pytest.raises(ArgumentError, match="already exists"):
        elementwise("x * y + 3", name="test_named_op")


def test_float64_runs_on_torch_only():
    op = elementwise(SILU_MUL)
    x = torch.randn(3, 4, dtype=torch.float64)
    with kf.backend("triton"), pytest.raises(UnsupportedError, match="float64"):
        op(x, x)
    with kf.backend("torch"):
        torch.testing.assert_close(op(x, x), reference(op, x, x))


def test_call_errors():
    op = elementwise(SILU_MUL)
    x = torch.randn(3, 4)
    with pytest.raises(ArgumentError, match="input 'y' must be a torch.Tensor"):
        op(x, 2.0)
    with pytest.raises(ShapeError, match="do not broadcast"):
        op(x, torch.randn(5))
    with pytest.raises(DTypeError, match="int64"):
        op(x, torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="takes 2 arguments"):
        op(x, x, x)
    lr = elementwise("x * alpha", params={"alpha": 1.0}, name="test_param_type")
    with pytest.raises(ArgumentError, match="must be a number"):
        lr(x, alpha="big")


def test_definition_errors():
    with pytest.raises(ExpressionError, match="unknown variable 'z'"):
        elementwise("x * z", inputs=["x", "y"])
    with pytest.raises(ExpressionError, match="unknown function 'sigmod'"):
        elementwise("sigmod(x)")
    with pytest.raises(ExpressionError, match="not an input"):
        elementwise("x * y", grad={"z": "dy"})
    with pytest.raises(ExpressionError, match="reserved"):
        elementwise("dy * 2")
    with pytest.raises(ExpressionError, match="both an input and a parameter"):
        elementwise("x * a", inputs=["x", "a"], params={"a": 1.0})
    with pytest.raises(ExpressionError, match="no input tensor"):
        elementwise("alpha * 2", params={"alpha": 1.0})
    with pytest.raises(ExpressionError, match="Python keywords"):
        elementwise("lambda * 2")
    with pytest.raises(ExpressionError, match="gradient of x"):
        elementwise("x * y", grad={"x": "y +"})


def test_explicit_inputs_order_and_unused_input():
    op = elementwise("y - x", inputs=["x", "y", "unused"], name="test_order")
    x, y, u = (randn((2, 5), torch.float32, requires_grad=True) for _ in range(3))
    with kf.backend("triton"):
        out = op(x, y, u)
        gx, gy, gu = torch.autograd.grad(out, [x, y, u], torch.ones_like(out))
    torch.testing.assert_close(out, y - x)
    torch.testing.assert_close(gx, -torch.ones_like(x))
    torch.testing.assert_close(gu, torch.zeros_like(u))


def test_torch_compile_traces_without_graph_breaks():
    op = elementwise(SILU_MUL)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(x, y):
        return op(x, y) * 2

    x, y = (randn((3, 20), torch.float32, requires_grad=True) for _ in "xy")
    with kf.backend("triton"):
        out = f(x, y)
        gx, gy = torch.autograd.grad(out.sum(), [x, y])
    xd, yd = (t.detach().double().requires_grad_() for t in (x, y))
    ref = reference(op, xd, yd) * 2
    wx, wy = torch.autograd.grad(ref.sum(), [xd, yd])
    assert_close(out, ref, torch.float32, "out")
    assert_close(gx, wx, torch.float32, "dx")
    assert_close(gy, wy, torch.float32, "dy")


def test_tolerances_used_are_the_shared_ones():
    assert TOL[torch.bfloat16] > TOL[torch.float16] > TOL[torch.float32]
