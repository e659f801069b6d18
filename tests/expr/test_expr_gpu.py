"""GPU: expression ops on the Triton (compiled) and CUDA C++ backends against the float64
reference, at realistic sizes."""

from __future__ import annotations

import pytest
import torch

import kernforge as kf
from kernforge.expr import elementwise, reference, rowwise
from tests.expr.exprcases import EVERYTHING, everything_inputs
from tests.helpers import DTYPES, assert_close, randn

pytestmark = pytest.mark.gpu

BACKENDS = ["triton", "cuda"]


def run(op, tensors, backend, params=None, tol_scale=1.0):
    params = params or {}
    dtype = tensors[0].dtype
    with kf.backend(backend):
        out = op(*tensors, **params)
        dy = randn(out.shape, out.dtype)
        need = [t for t in tensors if t.requires_grad]
        got = torch.autograd.grad(out, need, dy)
        torch.cuda.synchronize()
    ref_in = [t.detach().double().requires_grad_(t.requires_grad) for t in tensors]
    ref = reference(op, *ref_in, **params)
    assert out.dtype == dtype
    assert_close(out, ref, dtype, f"{backend} out", tol_scale)
    want = torch.autograd.grad(ref, [t for t in ref_in if t.requires_grad], dy.double())
    for g, w, t in zip(got, want, need, strict=True):
        assert g.shape == t.shape and g.dtype == t.dtype
        assert_close(g, w, dtype, f"{backend} grad", tol_scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1000, 4096), (3, 7, 8191), (4099, 1), (7,), (1, 1)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_silu_mul_gpu(backend, shape, dtype):
    op = elementwise("silu(x) * y")
    run(op, [randn(shape, dtype, requires_grad=True) for _ in "xy"], backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_function_gpu(backend, dtype):
    op = elementwise(EVERYTHING, params={"alpha": 0.1}, name="test_everything")
    x, y = everything_inputs((37, 515), dtype, "cuda")
    run(op, [x, y], backend, {"alpha": 0.2}, tol_scale=2.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_broadcast_and_strided_gpu(backend):
    op = elementwise("gelu(a) * b - c", name="test_gpu_bcast")
    a = randn((6, 5, 301), torch.bfloat16, layout="strided", requires_grad=True)
    b = randn((301,), torch.bfloat16, requires_grad=True)
    c = randn((6, 1, 301), torch.bfloat16, layout="padded", requires_grad=True)
    run(op, [a, b, c], backend)
    d = randn((2, 3, 4, 5, 6), torch.float32, requires_grad=True)
    e = randn((3, 1, 5, 1), torch.float32, requires_grad=True)
    f = randn((6, 5, 4, 3, 2), torch.float32).permute(4, 3, 2, 1, 0).requires_grad_()
    run(op, [d, e, f], backend)


def _row_ops():
    return {
        "rms_norm": (
            rowwise("x * rsqrt(rowmean(x * x) + eps) * w", params={"eps": 1e-6}, name="test_rms"),
            2,
        ),  # fmt: skip
        "layer_norm": (
            rowwise(
                map=["x", "(x - acc0) * (x - acc0)"],
                reduce="mean",
                finalize="(x - acc0) * rsqrt(acc1 + eps) * w + b",
                params={"eps": 1e-5},
                name="test_layer_norm",
            ),
            3,
        ),  # fmt: skip
        "softmax": (
            rowwise("exp(x - rowmax(x)) / rowsum(exp(x - rowmax(x)))", name="test_softmax"),
            1,
        ),  # fmt: skip
        "logsumexp": (
            rowwise("rowmax(x) + log(rowsum(exp(x - rowmax(x))))", name="test_lse"),
            1,
        ),  # fmt: skip
        "minmax": (
            rowwise(
                map=["x", "x - acc0"],
                reduce=["min", "max"],
                finalize="acc1 * x",
                name="test_gpu_minmax",
            ),
            1,
        ),  # fmt: skip
    }


def _row_cases():
    shapes = [(1000, 4096), (33, 14336), (7, 3, 1000), (4099, 1)]
    cases = [(w, s, torch.bfloat16) for w in _row_ops() for s in shapes]
    cases += [(w, (65, 3000), d) for w in ("rms_norm", "softmax") for d in DTYPES]
    return cases


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("which", "shape", "dtype"), _row_cases(), ids=str)
def test_rowwise_gpu(which, backend, shape, dtype):
    op, k = _row_ops()[which]
    tensors = [randn(shape, dtype, requires_grad=True, scale=2.0)]
    tensors += [randn(shape[-1:], dtype, requires_grad=True) for _ in range(k - 1)]
    run(op, tensors, backend)


def test_cuda_rowwise_wider_than_triton_rows():
    op, _ = _row_ops()["rms_norm"]
    x = randn((3, 70001), torch.bfloat16, requires_grad=True)
    w = randn((70001,), torch.bfloat16, requires_grad=True)
    run(op, [x, w], "cuda")


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_row_input_gpu(backend):
    op = rowwise("exp(x / t - rowmax(x / t)) / rowsum(exp(x / t - rowmax(x / t)))",
                 name="test_gpu_temperature")  # fmt: skip
    x = randn((64, 3, 500), torch.float16, requires_grad=True)
    t = (torch.rand(64, 3, 1, device="cuda") + 0.5).half().requires_grad_()
    run(op, [x, t], backend)


def test_torch_compile_inductor_gpu():
    op = elementwise("silu(x) * y")

    @torch.compile(fullgraph=True)
    def f(x, y):
        return op(x, y) + 1

    x, y = (randn((64, 1024), torch.bfloat16, requires_grad=True) for _ in "xy")
    for backend in BACKENDS:
        with kf.backend(backend):
            out = f(x, y)
            gx, gy = torch.autograd.grad(out.float().sum(), [x, y])
        xd, yd = (t.detach().double().requires_grad_() for t in (x, y))
        ref = reference(op, xd, yd) + 1
        wx, wy = torch.autograd.grad(ref.sum(), [xd, yd])
        assert_close(out, ref, torch.bfloat16, f"{backend} out")
        assert_close(gx, wx, torch.bfloat16, f"{backend} dx")
        assert_close(gy, wy, torch.bfloat16, f"{backend} dy")
