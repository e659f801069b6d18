"""rms_norm (plain and fused residual) against a float64 reference, forward and backward."""

from __future__ import annotations

import pytest
import torch

import kernforge as kf
from kernforge import ops
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

SHAPES = sizes(
    cpu=[(1, 1), (3, 127), (2, 3, 1000), (65, 64), (2, 4095)],
    gpu=[(1000, 4096), (7, 8192), (33, 14336), (2, 65536)],
)


def run(x, w, residual, eps=1e-6):
    """Forward and backward through ops.rms_norm; returns outputs and input gradients."""
    out = ops.rms_norm(x, w, eps, residual=residual)
    outs = out if isinstance(out, tuple) else (out,)
    gouts = [torch.randn_like(o) for o in outs]
    return outs, gouts


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_rms_norm_matches_reference(shape, dtype, with_residual):
    x = randn(shape, dtype, requires_grad=True)
    w = randn(shape[-1:], dtype, requires_grad=True)
    r = randn(shape, dtype, requires_grad=True) if with_residual else None
    with kf.backend("triton"):
        outs, gouts = run(x, w, r)
        got = grads(outs, [x, w, r], gouts)
    xd, wd, rd = f64(x, w, r)
    ref = reference(ops.rms_norm, xd, wd, 1e-6, residual=rd)
    refs = ref if isinstance(ref, tuple) else (ref,)
    want = grads(refs, [xd, wd, rd], [g.double() for g in gouts])
    for o, ro, name in zip(outs, refs, ["y", "h"], strict=False):
        assert o.dtype == dtype
        assert_close(o, ro, dtype, name)
    # A 1-wide row's dx = w*dy*(1 - xhat**2)*rstd cancels in fp32, and rstd reaches
    # 1/sqrt(eps): the error bound grows by that factor.
    cond = 1e-6**-0.5 if shape[-1] == 1 else 1
    assert_close(got[0], want[0], dtype, "dx", tol_scale=cond)
    assert_close(got[1], want[1], dtype, "dweight", tol_scale=2)  # summed over many rows
    if with_residual:
        assert_close(got[2], want[2], dtype, "dresidual", tol_scale=cond)


@pytest.mark.parametrize("layout", LAYOUTS[1:])
@pytest.mark.parametrize("no_weight", [False, True], ids=["weight", "no-weight"])
def test_rms_norm_layouts_and_no_weight(layout, no_weight):
    dtype = torch.float16
    x = randn((5, 3, 96), dtype, layout=layout, requires_grad=True)
    w = None if no_weight else randn((96,), dtype, requires_grad=True)
    with kf.backend("triton"):
        y = ops.rms_norm(x, w, 1e-5)
        gy = randn(y.shape, dtype, layout=layout)
        got = grads([y], [x, w], [gy])
    xd, wd = f64(x, w)
    ref = reference(ops.rms_norm, xd, wd, 1e-5)
    want = grads([ref], [xd, wd], [gy.double()])
    assert_close(y, ref, dtype, "y")
    assert_close(got[0], want[0], dtype, "dx")
    if w is not None:
        assert_close(got[1], want[1], dtype, "dweight", tol_scale=2)


@pytest.mark.parametrize("shape", [(0, 32), (3, 0)], ids=["no-rows", "no-features"])
def test_rms_norm_empty(shape):
    x = randn(shape, torch.float32, requires_grad=True)
    w = randn(shape[-1:], torch.float32, requires_grad=True)
    with kf.backend("triton"):
        y = ops.rms_norm(x, w)
        y.sum().backward()
    assert y.shape == shape and x.grad.shape == shape
    assert torch.equal(w.grad, torch.zeros_like(w))


def test_rms_norm_strided_weight():
    x = randn((6, 40), torch.float32, requires_grad=True)
    w = randn((40,), layout="strided", requires_grad=True)
    assert not w.is_contiguous()
    with kf.backend("triton"):
        y = ops.rms_norm(x, w)
        got = grads([y], [x, w], [torch.ones_like(y)])
    xd, wd = f64(x, w)
    ref = reference(ops.rms_norm, xd, wd)
    want = grads([ref], [xd, wd], [torch.ones_like(ref)])
    assert_close(y, ref, torch.float32, "y")
    assert_close(got[1], want[1], torch.float32, "dweight")


@pytest.mark.parametrize(
    "make, error",
    [
        (lambda: (randn((4, 8)), randn((7,))), kf.ShapeError),  # weight size
        (lambda: (randn((4, 8)), randn((2, 8))), kf.ShapeError),  # weight rank
        (lambda: (torch.ones(4, 8, dtype=torch.int32, device=DEVICE), None), kf.DTypeError),
        (lambda: (randn((4, 8)), randn((8,)).to(torch.int64)), kf.DTypeError),
        (lambda: (torch.tensor(1.0, device=DEVICE), None), kf.ShapeError),  # rank 0
        (lambda: ([1.0, 2.0], None), TypeError),
    ],
    ids=["weight-size", "weight-rank", "int-x", "int-weight", "scalar", "not-tensor"],
)
def test_rms_norm_bad_input(make, error):
    x, w = make()
    with pytest.raises(error):
        ops.rms_norm(x, w)


def test_rms_norm_bad_residual():
    x = randn((4, 8))
    with pytest.raises(kf.ShapeError, match="residual"):
        ops.rms_norm(x, None, residual=randn((4, 9)))
    with pytest.raises(kf.DTypeError, match="residual"):
        ops.rms_norm(x, None, residual=randn((4, 8), torch.float16))


@pytest.mark.gpu
def test_rms_norm_weight_on_other_device():
    x = randn((4, 8))
    with pytest.raises(kf.DeviceError, match="weight"):
        ops.rms_norm(x, torch.ones(8))


def test_rms_norm_compiles_fullgraph_with_backward():
    torch._dynamo.reset()

    def block(x, w, r):
        y, h = ops.rms_norm(x, w, 1e-6, residual=r)
        return (ops.rms_norm(y, w) * h).sum()

    x = randn((4, 48), requires_grad=True)
    w = randn((48,), requires_grad=True)
    r = randn((4, 48), requires_grad=True)
    with kf.backend("triton"):
        compiled = torch.compile(block, fullgraph=True)  # raises on any graph break
        loss = compiled(x, w, r)
        got = torch.autograd.grad(loss, [x, w, r])
    xd, wd, rd = f64(x, w, r)
    with kf.backend("torch"):
        ref = block(xd, wd, rd)
    want = torch.autograd.grad(ref, [xd, wd, rd])
    assert_close(loss, ref, torch.float32, "loss")
    for g, r_, name in zip(got, want, ["dx", "dw", "dr"], strict=True):
        assert_close(g, r_, torch.float32, name)
