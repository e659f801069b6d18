"""silu_and_mul, swiglu and geglu (tanh and exact) against a float64 reference, forward and
backward."""

from __future__ import annotations

import pytest
import torch

import kernforge as kf
from kernforge import ops
from kernforge.kernels import glu
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

#: Output shapes [..., d]. On the CPU: a size-1 row, odd widths, more rows than a tile holds,
#: rows split over several column tiles (2 * 4095, 2 * 5000) and a flattened contiguous tensor
#: over several programs (4 * 5000).
SHAPES = sizes(
    cpu=[(1, 1), (3, 127), (2, 3, 1000), (65, 64), (2, 4095), (4, 5000)],
    gpu=[(1000, 4096), (33, 14336), (7, 3, 8192), (4099, 1), (3, 65537)],
)

#: (op, keyword arguments) of the two-input ops.
GLUS = {
    "swiglu": (ops.swiglu, {}),
    "geglu-tanh": (ops.geglu, {"approximate": "tanh"}),
    "geglu-erf": (ops.geglu, {"approximate": "none"}),
}


def check_silu_and_mul(x, gy_layout="contiguous"):
    """ops.silu_and_mul(x) on Triton against the float64 reference, forward and dx."""
    dtype = x.dtype
    with kf.backend("triton"):
        y = ops.silu_and_mul(x)
        gy = randn(y.shape, dtype, layout=gy_layout)
        (dx,) = grads([y], [x], [gy])
    (xd,) = f64(x)
    ref = reference(ops.silu_and_mul, xd)
    (want,) = grads([ref], [xd], [gy.double()])
    assert y.dtype == dtype and dx.dtype == dtype
    assert_close(y, ref, dtype, "y")
    assert_close(dx, want, dtype, "dx")


def check_glu(name, gate, up, gy_layout="contiguous"):
    """A two-input GLU on Triton against the float64 reference, forward and both gradients."""
    op, kw = GLUS[name]
    dtype = gate.dtype
    with kf.backend("triton"):
        y = op(gate, up, **kw)
        gy = randn(y.shape, dtype, layout=gy_layout)
        got = grads([y], [gate, up], [gy])
    gd, ud = f64(gate, up)
    ref = reference(op, gd, ud, **kw)
    want = grads([ref], [gd, ud], [gy.double()])
    assert y.dtype == dtype
    assert_close(y, ref, dtype, "y")
    for g, w, what in zip(got, want, ["dgate", "dup"], strict=True):
        if w is None:
            assert g is None, f"{what}: gradient for an input that does not require one"
        else:
            assert g.dtype == dtype
            assert_close(g, w, dtype, what)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_silu_and_mul_matches_reference(shape, dtype):
    x = randn((*shape[:-1], 2 * shape[-1]), dtype, requires_grad=True)
    check_silu_and_mul(x)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(GLUS))
def test_glu_matches_reference(name, shape, dtype):
    gate = randn(shape, dtype, requires_grad=True)
    up = randn(shape, dtype, requires_grad=True)
    check_glu(name, gate, up)


@pytest.mark.parametrize("layout", LAYOUTS[1:])
def test_silu_and_mul_layouts(layout):
    # 2 * 2500 features: each half spans two column tiles in the interpreter.
    x = randn((3, 2, 5000), torch.float16, layout=layout, requires_grad=True)
    check_silu_and_mul(x, gy_layout=layout)


@pytest.mark.parametrize(
    "gate_layout, up_layout",
    [("padded", "strided"), ("strided", "contiguous"), ("contiguous", "padded")],
)
@pytest.mark.parametrize("name", list(GLUS))
def test_glu_layouts(name, gate_layout, up_layout):
    gate = randn((3, 2, 2500), torch.float16, layout=gate_layout, requires_grad=True)
    up = randn((3, 2, 2500), torch.float16, layout=up_layout, requires_grad=True)
    check_glu(name, gate, up, gy_layout=gate_layout)


def test_glu_transposed_inputs():
    # Rows not collapsible: the forward reads them through their strides, the backward copies;
    # the result must not care.
    gate = randn((40, 6), torch.float32).t().requires_grad_()
    up = randn((6, 40), torch.float32, requires_grad=True)
    check_glu("geglu-erf", gate, up)


@pytest.mark.parametrize("name", list(GLUS))
@pytest.mark.parametrize("which", [0, 1], ids=["gate-only", "up-only"])
def test_glu_partial_requires_grad(name, which):
    gate = randn((5, 33), torch.float32, requires_grad=which == 0)
    up = randn((5, 33), torch.float32, requires_grad=which == 1)
    check_glu(name, gate, up)


def test_silu_and_mul_equals_swiglu_of_halves():
    # Same kernel, same math: bitwise equal, whether the halves come as one x or two views.
    x = randn((7, 2 * 300), torch.bfloat16)
    with kf.backend("triton"):
        fused = ops.silu_and_mul(x)
        split = ops.swiglu(x[:, :300], x[:, 300:])
    assert torch.equal(fused, split)


@pytest.mark.parametrize("name", list(GLUS))
def test_glu_extreme_gates(name):
    """Far tails (where g**3 or g**2 overflow fp32) stay finite and match elementwise."""
    op, kw = GLUS[name]
    vals = [-1e30, -1e4, -50.0, -10.0, -5.0, -1.0, -1e-3, 0.0, 1e-3, 1.0, 5.0, 10.0, 50.0, 1e4]
    gate = torch.tensor(vals + [1e30], device=DEVICE, requires_grad=True)
    up = torch.full_like(gate, 0.5, requires_grad=True)
    gy = torch.ones_like(gate)
    with kf.backend("triton"):
        y = op(gate, up, **kw)
        got = grads([y], [gate, up], [gy])
    gd, ud = f64(gate, up)
    ref = reference(op, gd, ud, **kw)
    want = grads([ref], [gd, ud], [gy.double()])
    for out, exp, what in zip([y, *got], [ref, *want], ["y", "dgate", "dup"], strict=True):
        assert torch.isfinite(out).all(), f"{what}: {out}"
        torch.testing.assert_close(out.double(), exp.detach(), rtol=1e-5, atol=1e-6, msg=what)


@pytest.mark.parametrize("shape", [(0, 8), (4, 0), (2, 0, 6)], ids=str)
def test_empty_inputs(shape):
    x = randn((*shape[:-1], 2 * shape[-1]), torch.float32, requires_grad=True)
    gate = randn(shape, torch.float32, requires_grad=True)
    up = randn(shape, torch.float32, requires_grad=True)
    with kf.backend("triton"):
        y = ops.silu_and_mul(x)
        z = ops.geglu(gate, up)
        (y.sum() + z.sum()).backward()
    assert y.shape == shape and z.shape == shape
    assert x.grad.shape == x.shape and gate.grad.shape == shape and up.grad.shape == shape


def test_glu_ops_compile_without_graph_breaks():
    """One fullgraph compile through all three ops, forward and backward."""

    def f(x, gate, up):
        d = x.shape[-1] // 2
        a = ops.silu_and_mul(x)
        b = ops.swiglu(gate, up)
        c = ops.geglu(gate, up, approximate="none")
        return a + b + c + ops.geglu(x[..., :d], x[..., d:])

    x = randn((4, 2 * 24), torch.float32, requires_grad=True)
    gate = randn((4, 24), torch.float32, requires_grad=True)
    up = randn((4, 24), torch.float32, requires_grad=True)
    with kf.backend("triton"):
        torch._dynamo.reset()
        out = torch.compile(f, fullgraph=True)(x, gate, up)
        got = grads([out], [x, gate, up], [torch.ones_like(out)])
    xd, gd, ud = f64(x, gate, up)
    with kf.backend("torch"):
        ref = f(xd, gd, ud)
    want = grads([ref], [xd, gd, ud], [torch.ones_like(ref)])
    assert_close(out, ref, torch.float32, "out")
    for g, w, what in zip(got, want, ["dx", "dgate", "dup"], strict=True):
        assert_close(g, w, torch.float32, what)


def test_triton_supports():
    x = randn((4, 8))
    assert glu._supports_silu_and_mul(x) is None
    assert glu._supports_glu(x, x, "tanh") is None
    reason = glu._supports_glu(x.double(), x.double(), "tanh")
    assert reason is not None and "float64" in reason
    assert "float64" in glu._supports_silu_and_mul(x.double())


def test_float64_is_not_taken_by_triton():
    # The fixture forbids the fallback, so dispatch says why Triton refused.
    gate, up = randn((3, 5)).double(), randn((3, 5)).double()
    with kf.backend("triton"), pytest.raises(kf.UnsupportedError, match="float64"):
        ops.swiglu(gate, up)


@pytest.mark.parametrize(
    "make, error, word",
    [
        (lambda: randn((4, 7)), kf.ShapeError, "even"),
        (lambda: torch.ones(4, 8, dtype=torch.int32, device=DEVICE), kf.DTypeError, "dtype"),
        (lambda: torch.tensor(1.0, device=DEVICE), kf.ShapeError, "dimension"),
        (lambda: [1.0, 2.0], TypeError, "Tensor"),
    ],
    ids=["odd-width", "int", "scalar", "not-tensor"],
)
def test_silu_and_mul_bad_input(make, error, word):
    with pytest.raises(error, match=word):
        ops.silu_and_mul(make())


@pytest.mark.parametrize(
    "make, error, word",
    [
        (lambda: (randn((4, 8)), randn((4, 9))), kf.ShapeError, "up"),
        (lambda: (randn((4, 8)), randn((8,))), kf.ShapeError, "up"),
        (lambda: (randn((4, 8)), randn((4, 8), torch.float16)), kf.DTypeError, "dtype"),
        (
            lambda: (torch.ones(4, 8, dtype=torch.int64, device=DEVICE),) * 2,
            kf.DTypeError,
            "gate",
        ),
        (lambda: (torch.tensor(1.0, device=DEVICE), randn((1,))), kf.ShapeError, "gate"),
        (lambda: (randn((4, 8)), [1.0]), TypeError, "up"),
    ],
    ids=["up-size", "up-rank", "mixed-dtype", "int", "scalar", "not-tensor"],
)
@pytest.mark.parametrize("name", list(GLUS))
def test_glu_bad_input(name, make, error, word):
    op, kw = GLUS[name]
    gate, up = make()
    with pytest.raises(error, match=word):
        op(gate, up, **kw)


def test_geglu_bad_approximate():
    x = randn((4, 8))
    with pytest.raises(kf.ArgumentError, match="approximate"):
        ops.geglu(x, x, approximate="exact")


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(GLUS))
def test_glu_inputs_on_two_devices(name):
    op, kw = GLUS[name]
    with pytest.raises(kf.DeviceError, match="device"):
        op(randn((4, 8)), torch.ones(4, 8), **kw)
