"""ops.conv2d (implicit GEMM with the fused bias / residual / activation epilogue), max_pool2d
and adaptive_avg_pool2d against torch float32 on fresh random inputs: odd sizes, every kernel
path (flat-K for small C, channel blocks with and without a tail, 1x1), strides, padding,
dilation, memory layouts, packed weights, and the argument checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernforge as kf
from kernforge import ops
from kernforge.errors import (
    ArgumentError,
    DeviceError,
    DTypeError,
    ShapeError,
    UnsupportedError,
)
from kernforge.kernels import conv
from tests.helpers import DEVICE, ON_GPU, assert_close, sizes

#: fp16 everywhere; bf16 on the GPU only (the interpreter's bf16 tensor-core math is wrong).
CONV_DTYPES = [torch.float16] + ([torch.bfloat16] if ON_GPU else [])

#: (N, C, H, W, O, k, stride, padding, dilation, activation, residual, bias). On the CPU: the
#: flat-K path (C 3 and 5), channel blocks with a tail (C 17 over 16-wide blocks) and without
#: (C 32), H = W = 1, 1x1 with and without stride, each activation, residual with and without
#: an activation, no bias.
CASES = sizes(
    cpu=[
        (2, 17, 7, 7, 19, 3, 1, 1, 1, "relu", True, True),
        (1, 3, 13, 13, 20, 7, 2, 3, 1, None, False, True),
        (2, 32, 13, 11, 24, 3, 2, 1, 2, "gelu", False, True),
        (3, 16, 1, 1, 17, 1, 1, 0, 1, "silu", True, True),
        (1, 17, 7, 9, 33, 1, 2, 0, 1, None, True, True),
        (2, 5, 7, 7, 6, 3, 1, 0, 1, "relu", True, False),
        (1, 7, 9, 8, 5, 3, 1, 2, 2, "silu", False, True),
    ],
    gpu=[
        (4, 64, 56, 56, 64, 3, 1, 1, 1, "relu", True, True),
        (2, 3, 224, 224, 64, 7, 2, 3, 1, "relu", False, True),
        (4, 256, 14, 14, 1024, 1, 1, 0, 1, "relu", True, True),
        (4, 256, 14, 14, 1024, 1, 1, 0, 1, "relu", False, True),
        (4, 128, 28, 28, 130, 3, 2, 1, 1, None, False, True),
        (3, 520, 7, 7, 72, 1, 2, 0, 1, None, True, True),
    ],
)


def _reference(x, w, b, stride, padding, dilation, act, res):
    z = F.conv2d(x.float(), w.float(), None if b is None else b.float(), stride, padding,
                 dilation)  # fmt: skip
    if res is not None:
        z = z + res.float()
    return conv.apply_activation(z, act)


def _inputs(n, c, h, w, o, k, stride, padding, dilation, with_res, with_bias, dtype):
    x = torch.randn(n, c, h, w, device=DEVICE).to(dtype)
    wt = (torch.randn(o, c, k, k, device=DEVICE) * (c * k * k) ** -0.5).to(dtype)
    b = torch.randn(o, device=DEVICE).to(dtype) if with_bias else None
    oh = (h + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    ow = (w + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    res = torch.randn(n, o, oh, ow, device=DEVICE).to(dtype) if with_res else None
    return x, wt, b, res


def _run(x, wt, b, stride, padding, dilation, act, res):
    with kf.backend("triton"):
        return ops.conv2d(x, wt, b, stride, padding, dilation, activation=act, residual=res)


@pytest.mark.parametrize("dtype", CONV_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_conv2d_matches_torch(case, dtype):
    n, c, h, w, o, k, stride, padding, dilation, act, with_res, with_bias = case
    x, wt, b, res = _inputs(n, c, h, w, o, k, stride, padding, dilation, with_res, with_bias,
                            dtype)  # fmt: skip
    x = x.contiguous(memory_format=torch.channels_last)
    y = _run(x, wt, b, stride, padding, dilation, act, res)
    ref = _reference(x, wt, b, stride, padding, dilation, act, res)
    assert y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y, ref, dtype, f"conv2d {case}")


def test_conv2d_layouts_and_packed_weight():
    """NCHW-contiguous and non-contiguous (sliced) inputs and residuals, packed and unpacked
    weights, tuple arguments: all give the reference's result."""
    dtype = torch.float16
    big = torch.randn(2, 20, 9, 11, device=DEVICE).to(dtype)
    x = big[:, 1:18, :, 1:10]  # C 17, W 9, not contiguous in any format
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    wt = (torch.randn(19, 17, 3, 3, device=DEVICE) * 0.1).to(dtype)
    b = torch.randn(19, device=DEVICE).to(dtype)
    res = torch.randn(2, 19, 5, 9, device=DEVICE).to(dtype)  # NCHW-contiguous residual
    ref = _reference(x, wt, b, (2, 1), (1, 1), 1, "relu", res)
    for xi in (x, x.contiguous()):
        for wi in (wt, conv.pack_conv_weight(wt)):
            y = _run(xi, wi, b, (2, 1), (1, 1), (1, 1), "relu", res)
            assert_close(y, ref, dtype, "layouts")
    packed = conv.pack_conv_weight(wt)
    assert conv.is_packed(packed) and not conv.is_packed(wt)
    stored = packed.permute(0, 2, 3, 1).contiguous()  # what a program saves: [O, KH, KW, C]
    again = conv.packed_from_storage(stored)
    assert again.data_ptr() == stored.data_ptr() and conv.is_packed(again)
    assert torch.equal(again, wt)


def test_conv2d_poisoned_output_written():
    """Every output element is written (outputs are NaN-poisoned before the kernel runs)."""
    x, wt, b, res = _inputs(1, 17, 5, 5, 40, 3, 1, 1, 1, False, True, torch.float16)
    y = _run(x, wt, b, 1, 1, 1, None, None)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_max_pool2d(dtype):
    pools = [((2, 17, 13, 13), 3, 2, 1), ((1, 3, 7, 7), 2, 2, 0), ((2, 5, 1, 1), 1, 1, 0),
             ((1, 17, 7, 9), (3, 2), (1, 2), (1, 1))]  # fmt: skip
    for shape, k, s, p in pools:
        big = torch.randn(shape[0], shape[1], shape[2], shape[3] + 2, device=DEVICE).to(dtype)
        x = big[..., 1:-1]  # non-contiguous
        with kf.backend("triton"):
            y = ops.max_pool2d(x, k, s, p)
        ref = F.max_pool2d(x.float(), k, s, p)
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert_close(y, ref, dtype, f"max_pool2d {shape} {k} {s} {p}")
    with kf.backend("triton"):
        y = ops.max_pool2d(x, 2)  # stride defaults to the kernel size
    assert_close(y, F.max_pool2d(x.float(), 2), dtype, "max_pool2d stride=None")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_adaptive_avg_pool2d(dtype):
    for shape, size in (((2, 17, 7, 7), 1), ((1, 3, 13, 11), (3, 5)), ((2, 5, 1, 1), 1),
                        ((1, 33, 7, 7), (2, 2))):  # fmt: skip
        x = torch.randn(*shape, device=DEVICE).to(dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        with kf.backend("triton"):
            y = ops.adaptive_avg_pool2d(x, size)
        ref = F.adaptive_avg_pool2d(x.float(), size)
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert_close(y, ref, dtype, f"adaptive_avg_pool2d {shape} {size}")


def test_conv2d_argument_errors():
    x = torch.randn(1, 4, 5, 5, device=DEVICE).half()
    w = torch.randn(6, 4, 3, 3, device=DEVICE).half()
    with pytest.raises(ShapeError, match="channel mismatch"):
        ops.conv2d(x, torch.randn(6, 3, 3, 3, device=DEVICE).half())
    with pytest.raises(ShapeError, match="groups=3 must divide"):
        ops.conv2d(x, w, groups=3)
    with pytest.raises(ShapeError, match="5-D"):
        ops.conv2d(x.unsqueeze(2), w)
    with pytest.raises(ShapeError, match="unsqueeze"):
        ops.conv2d(x[0], w)
    with pytest.raises(DTypeError):
        ops.conv2d(x.int(), w)
    with pytest.raises(DTypeError):
        ops.conv2d(x, w.float())
    with pytest.raises(DeviceError):
        ops.conv2d(x, w, torch.randn(6, device="meta").half())
    with pytest.raises(ArgumentError, match="activation"):
        ops.conv2d(x, w, activation="tanh")
    with pytest.raises(ArgumentError, match="stride"):
        ops.conv2d(x, w, stride=0)
    with pytest.raises(ArgumentError, match="padding"):
        ops.conv2d(x, w, padding=(1, -1))
    with pytest.raises(ShapeError, match="does not fit"):
        ops.conv2d(x, torch.randn(6, 4, 7, 7, device=DEVICE).half())
    with pytest.raises(ShapeError, match="residual"):
        ops.conv2d(x, w, residual=torch.randn(1, 6, 5, 5, device=DEVICE).half())
    with pytest.raises(ShapeError, match="bias"):
        ops.conv2d(x, w, torch.randn(4, device=DEVICE).half())
    with pytest.raises(ArgumentError, match="kernel_size"):
        ops.max_pool2d(x, 0)
    with pytest.raises(ArgumentError, match="half the kernel"):
        ops.max_pool2d(x, 2, 1, 2)
    with pytest.raises(ShapeError, match="5-D"):
        ops.adaptive_avg_pool2d(x.unsqueeze(2), 1)
    with pytest.raises(ArgumentError, match="output_size"):
        ops.adaptive_avg_pool2d(x, 0)


def test_conv2d_torch_fallbacks():
    """groups > 1 and calls needing a gradient are the torch backend's: refused with the
    fallback forbidden (the kernel tests' setting), correct on torch."""
    x = torch.randn(1, 4, 5, 5, device=DEVICE).half()
    w = torch.randn(6, 2, 3, 3, device=DEVICE).half()
    with kf.backend("triton"), pytest.raises(UnsupportedError, match="groups=2"):
        ops.conv2d(x, w, groups=2)
    with kf.backend("torch"):
        y = ops.conv2d(x.float(), w.float(), groups=2, padding=1, activation="relu")
    ref = F.relu(F.conv2d(x.float(), w.float(), groups=2, padding=1))
    assert_close(y, ref, torch.float32, "grouped on torch")
    wg = torch.randn(6, 4, 3, 3, device=DEVICE).half().requires_grad_()
    with kf.backend("triton"), pytest.raises(UnsupportedError, match="gradient"):
        ops.conv2d(x, wg)


@pytest.mark.gpu
def test_conv2d_every_config_gpu():
    """Each tuner candidate (and the GEMM route) compiles and is correct on the GPU."""
    dtype = torch.bfloat16
    x, wt, b, res = _inputs(2, 64, 15, 15, 72, 3, 1, 1, 1, True, True, dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    ref = _reference(x, wt, b, 1, 1, 1, "relu", res)
    for cfg in conv.CONFIGS:
        y = conv.conv2d_forward(x, wt, b, 1, 1, 1, "relu", res, config=cfg)
        assert_close(y, ref, dtype, f"config {cfg}")
    xs, ws, bs, _ = _inputs(2, 3, 31, 31, 64, 7, 2, 3, 1, False, True, dtype)
    ref = _reference(xs, ws, bs, 2, 3, 1, "relu", None)
    for cfg in conv.FLAT_CONFIGS:
        y = conv.conv2d_forward(xs, ws, bs, 2, 3, 1, "relu", None, config=cfg)
        assert_close(y, ref, dtype, f"flat config {cfg}")


def _nan_channels_last(shape, dtype):
    return torch.full(shape, float("nan"), device=DEVICE, dtype=dtype).contiguous(
        memory_format=torch.channels_last
    )


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_conv2d_out_is_written_in_place(backend):
    """``out=``: a NaN-poisoned channels-last tensor is filled with exactly the result of the
    call without it, and returned; an NHWC buffer permuted to NCHW works the same way."""
    dtype = torch.float16
    x, wt, b, res = _inputs(2, 17, 7, 7, 19, 3, 1, 1, 1, True, True, dtype)
    with kf.backend(backend):
        want = ops.conv2d(x, wt, b, 1, 1, activation="relu", residual=res)
        out = _nan_channels_last(want.shape, dtype)
        got = ops.conv2d(x, wt, b, 1, 1, activation="relu", residual=res, out=out)
        assert got is out and torch.equal(out, want)
        nhwc = torch.full((2, 7, 7, 19), float("nan"), device=DEVICE, dtype=dtype)
        ops.conv2d(x, wt, b, 1, 1, activation="relu", residual=res, out=nhwc.permute(0, 3, 1, 2))
        assert torch.equal(nhwc.permute(0, 3, 1, 2), want)
    assert_close(want, _reference(x, wt, b, 1, 1, 1, "relu", res), dtype, "conv2d out=")


@pytest.mark.parametrize(
    "route,with_res,act", [("gemm", False, None), ("cudnn", True, "relu"), ("cudnn", False, "silu")]
)
def test_conv2d_out_on_the_other_routes(route, with_res, act):
    """The GEMM route (1x1 convs on kernels/matmul) stores into ``out``; the cuDNN route adds
    the residual into it and applies the activation there (or writes act(conv) into it)."""
    dtype = torch.float16
    x, wt, b, res = _inputs(2, 16, 5, 5, 24, 1, 1, 0, 1, with_res, True, dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    want = conv.conv2d_forward(x, wt, b, 1, 0, 1, act, res, force_route=route)
    out = _nan_channels_last(want.shape, dtype)
    got = conv.conv2d_forward(x, wt, b, 1, 0, 1, act, res, force_route=route, out=out)
    assert got is out and torch.equal(out, want)
    assert_close(out, _reference(x, wt, b, 1, 0, 1, act, res), dtype, f"{route} out=")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_pools_out_is_written_in_place(backend):
    dtype = torch.float16
    x = torch.randn(2, 17, 9, 7, device=DEVICE).to(dtype)
    with kf.backend(backend):
        want = ops.max_pool2d(x, 3, 2, 1)
        out = _nan_channels_last(want.shape, dtype)
        assert ops.max_pool2d(x, 3, 2, 1, out=out) is out and torch.equal(out, want)
        want = ops.adaptive_avg_pool2d(x, (2, 3))
        out = _nan_channels_last(want.shape, dtype)
        assert ops.adaptive_avg_pool2d(x, (2, 3), out=out) is out and torch.equal(out, want)
    assert_close(out, F.adaptive_avg_pool2d(x.float(), (2, 3)), dtype, "adaptive out=")


def test_out_argument_errors():
    """A wrong ``out`` is refused before anything runs, saying what was expected."""
    x = torch.randn(1, 4, 5, 5, device=DEVICE).half()
    w = torch.randn(6, 4, 3, 3, device=DEVICE).half()
    good = _nan_channels_last((1, 6, 5, 5), torch.float16)
    with pytest.raises(ShapeError, match=r"out has shape \(1, 6, 3, 3\)"):
        ops.conv2d(x, w, padding=1, out=_nan_channels_last((1, 6, 3, 3), torch.float16))
    with pytest.raises(DTypeError, match="out is torch.float32"):
        ops.conv2d(x, w, padding=1, out=good.float())
    with pytest.raises(DeviceError, match="meta"):
        ops.conv2d(x, w, padding=1, out=torch.empty(1, 6, 5, 5, device="meta").half())
    with pytest.raises(ArgumentError, match="channels-last contiguous"):
        ops.conv2d(x, w, padding=1, out=torch.empty(1, 6, 5, 5, device=DEVICE).half())
    with pytest.raises(ArgumentError, match="no autograd"):
        ops.conv2d(x, w.clone().requires_grad_(), padding=1, out=good)
    with pytest.raises(TypeError, match="out must be a torch.Tensor"):
        ops.conv2d(x, w, padding=1, out=good.numpy() if not ON_GPU else [1])
    with pytest.raises(ShapeError, match="out has shape"):
        ops.max_pool2d(x, 2, out=good)
    with pytest.raises(ArgumentError, match="channels-last"):
        ops.adaptive_avg_pool2d(x, 1, out=torch.empty(1, 4, 1, 2, device=DEVICE).half()[..., :1])
