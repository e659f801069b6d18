"""ops.fp8_matmul and ops.quantize_fp8. On the CPU: the quantizer's round trip and layouts, the
unsupported-arch error, the dequantizing torch reference and bad input. On a Hopper GPU: the
Triton kernel against fp32 math on the dequantized inputs, every scaling mode, bias, output
dtype, layout, every tuning candidate, and CUDA-graph capture."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

import kernforge as kf
from kernforge import device, ops
from kernforge.errors import ArgumentError, DeviceError, DTypeError, ShapeError, UnsupportedError
from kernforge.kernels import fp8_gemm
from tests.helpers import DEVICE, ON_GPU, assert_close, rel_err

FP8 = torch.float8_e4m3fn
HOPPER = ON_GPU and torch.cuda.get_device_capability()[0] == 9
needs_hopper = pytest.mark.skipif(not HOPPER, reason="the fp8 kernel needs an sm_90 GPU")


def dequant_ref(qa, qb, sa, sb, bias=None):
    """float64 (a * scale_a) @ (b * scale_b) + bias on the quantized values."""
    sa = sa.double().reshape(-1, 1) if sa.numel() != 1 else sa.double().reshape(())
    sb = sb.double().reshape(1, -1) if sb.numel() != 1 else sb.double().reshape(())
    y = (qa.double() * sa) @ (qb.double() * sb)
    return y if bias is None else y + bias.double()


def operands(m, n, k, rows=True, cols=True):
    """Quantized a [M, K] (per-row or per-tensor scale) and b = w.t() of a [N, K] weight."""
    a = torch.randn(m, k, device=DEVICE) * 3
    w = torch.randn(n, k, device=DEVICE) * torch.rand(n, 1, device=DEVICE)  # uneven columns
    qa, sa = ops.quantize_fp8(a, axis=1 if rows else None)
    qb, sb = ops.quantize_fp8(w.t(), axis=0 if cols else None)
    return qa, qb, sa, sb


# ---------------------------------------------------------------- quantizer (any device)


@pytest.mark.parametrize("axis", [None, 0, 1])
def test_quantize_round_trip(axis):
    x = torch.randn(37, 53, device=DEVICE) * torch.logspace(-3, 2, 53, device=DEVICE)
    q, s = ops.quantize_fp8(x, axis)
    assert q.dtype == FP8 and q.shape == x.shape and s.dtype == torch.float32
    want_shape = {None: (), 0: (53,), 1: (37,)}[axis]
    assert tuple(s.shape) == want_shape
    sb = s if axis is None else s.unsqueeze(axis)
    back = q.float() * sb
    # e4m3: 3 mantissa bits (relative error <= 2^-4), subnormal steps of 2^-9 of the scale.
    bound = x.abs() * 2**-4 + sb * 2**-9 * 1.01
    assert ((back - x).abs() <= bound).all()
    # The amax of each slice maps onto 448 exactly.
    amax = q.float().abs().amax() if axis is None else q.float().abs().amax(dim=axis)
    assert torch.equal(amax, torch.full_like(amax, 448.0))


def test_quantize_keeps_layout_and_handles_zeros():
    w = torch.randn(48, 64, device=DEVICE)
    q, s = ops.quantize_fp8(w.t(), axis=0)  # b for fp8_matmul: [K, N] with strides (1, K)
    assert q.shape == (64, 48) and q.stride() == (1, 64) and s.shape == (48,)
    z, sz = ops.quantize_fp8(torch.zeros(4, 5, device=DEVICE), axis=1)
    assert torch.isfinite(sz).all() and (sz > 0).all() and (z.float() == 0).all()


def test_quantize_bad_input():
    with pytest.raises(ArgumentError, match="axis"):
        ops.quantize_fp8(torch.randn(4, 4), axis=2)
    with pytest.raises(ArgumentError, match="2-D"):
        ops.quantize_fp8(torch.randn(2, 4, 4), axis=1)
    with pytest.raises(DTypeError):
        ops.quantize_fp8(torch.ones(4, 4, dtype=torch.int32))


# ---------------------------------------------------------------- dispatch, errors, reference


def test_unsupported_arch_raises_with_fallback_forbidden():
    """The kernel tests forbid the fallback: off Hopper the Triton backend raises, naming the
    device's arch and the sm_90 requirement."""
    if HOPPER:
        pytest.skip("this is a Hopper GPU")
    qa, qb, sa, sb = operands(8, 16, 32)
    with kf.backend("triton"), pytest.raises(UnsupportedError, match="sm_90") as info:
        ops.fp8_matmul(qa, qb, sa, sb)
    arch = "cpu" if not ON_GPU else device.arch()
    assert arch in str(info.value)


def test_reason_names_another_gpu_arch(monkeypatch):
    class Fake:
        device = torch.device("cuda", 0)

    monkeypatch.setattr(device, "INTERPRET", False)
    monkeypatch.setattr(device, "capability", lambda index=0: (8, 0))
    reason = fp8_gemm.hopper_reason(Fake())
    assert "sm_80" in reason and "sm_90" in reason
    monkeypatch.setattr(device, "capability", lambda index=0: (9, 0))
    assert fp8_gemm.hopper_reason(Fake()) is None


def test_fallback_runs_the_dequantizing_reference(monkeypatch):
    if HOPPER:
        pytest.skip("this is a Hopper GPU: no fallback")
    from kernforge import config

    allow = dataclasses.replace(config.settings, disable_fallback=False)
    monkeypatch.setattr(config, "settings", allow)
    qa, qb, sa, sb = operands(9, 17, 40)
    bias = torch.randn(17, device=DEVICE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = ops.fp8_matmul(qa, qb, sa, sb, bias)
    assert any(issubclass(w.category, kf.FallbackWarning) for w in caught)
    assert y.dtype == torch.bfloat16
    assert_close(y, dequant_ref(qa, qb, sa, sb, bias), torch.bfloat16, "y")


@pytest.mark.parametrize("rows,cols", [(True, True), (False, False), (True, False)])
def test_torch_reference(rows, cols):
    qa, qb, sa, sb = operands(5, 7, 24, rows, cols)
    with kf.backend("torch"):
        y = ops.fp8_matmul(qa, qb, sa, sb, out_dtype=torch.float32)
    assert rel_err(y, dequant_ref(qa, qb, sa, sb)) < 1e-6


def test_bad_inputs():
    qa, qb, sa, sb = operands(8, 16, 32)
    with pytest.raises(ShapeError, match="K=32"):
        ops.fp8_matmul(qa, qb[:16], sa, sb)
    with pytest.raises(DTypeError, match="float8_e4m3fn"):
        ops.fp8_matmul(qa.float(), qb, sa, sb)
    with pytest.raises(DTypeError, match="float8_e4m3fn"):
        ops.fp8_matmul(qa, qb.to(torch.float8_e5m2), sa, sb)
    with pytest.raises(ShapeError, match="scale_a"):
        ops.fp8_matmul(qa, qb, sa[:3], sb)
    with pytest.raises(ShapeError, match="scale_b"):
        ops.fp8_matmul(qa, qb, sa, sb[None, :, None])
    with pytest.raises(DTypeError, match="float32"):
        ops.fp8_matmul(qa, qb, sa.half(), sb)
    with pytest.raises(ArgumentError, match="out_dtype"):
        ops.fp8_matmul(qa, qb, sa, sb, out_dtype=torch.int8)
    with pytest.raises(ShapeError, match="bias"):
        ops.fp8_matmul(qa, qb, sa, sb, bias=torch.zeros(8, device=DEVICE))
    with pytest.raises(ShapeError, match="2-D"):
        ops.fp8_matmul(qa[None], qb, sa, sb)
    if ON_GPU:
        with pytest.raises(DeviceError):
            ops.fp8_matmul(qa, qb, sa.cpu(), sb)


# ---------------------------------------------------------------- the kernel (interpreter)

#: Small tiles for the interpreter (programs run one after another there).
SMALL = fp8_gemm.Fp8Config(16, 32, 32, group_m=2, num_warps=4, num_stages=1)


@pytest.mark.skipif(not (device.INTERPRET or HOPPER), reason="needs the interpreter or sm_90")
@pytest.mark.parametrize("shape", [(1, 16, 16), (17, 33, 48), (40, 24, 72)], ids=str)
@pytest.mark.parametrize("rows,cols", [(True, True), (False, False), (True, False)])
@pytest.mark.parametrize("subtile", [True, False])
def test_kernel_logic(shape, rows, cols, subtile):
    """The Triton kernel itself at small tiles (in CI through the interpreter): persistent tile
    walk, K padding (K=72), masked stores (N=33: rows not 16-byte aligned), every scaling."""
    qa, qb, sa, sb = operands(*shape, rows, cols)
    bias = torch.randn(shape[1], device=DEVICE) if rows else None
    cfg = dataclasses.replace(SMALL, epilogue_subtile=subtile)
    out_dtype = torch.float16 if subtile else torch.bfloat16
    y = fp8_gemm.fp8_forward(qa, qb, sa, sb, bias, out_dtype, cfg=cfg)
    assert y.dtype == out_dtype
    assert_close(y, dequant_ref(qa, qb, sa, sb, bias), out_dtype, "y")


# ---------------------------------------------------------------- the kernel (Hopper)

SHAPES = [(1, 16, 16), (17, 33, 48), (128, 256, 4096), (1000, 1000, 1000), (300, 1001, 512),
          (4097, 512, 256), (2048, 2048, 2048)]  # fmt: skip


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("rows,cols", [(True, True), (False, False), (False, True)])
def test_kernel_matches_dequantized_reference(shape, rows, cols):
    qa, qb, sa, sb = operands(*shape, rows, cols)
    with kf.backend("triton"):
        y = ops.fp8_matmul(qa, qb, sa, sb)
    assert y.dtype == torch.bfloat16 and y.shape == shape[:2]
    assert_close(y, dequant_ref(qa, qb, sa, sb), torch.bfloat16, "y")


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.float32])
def test_kernel_bias_and_out_dtypes(out_dtype):
    qa, qb, sa, sb = operands(333, 520, 768)
    bias = torch.randn(520, device=DEVICE, dtype=torch.bfloat16)
    with kf.backend("triton"):
        y = ops.fp8_matmul(qa, qb, sa, sb, bias, out_dtype=out_dtype)
    assert y.dtype == out_dtype
    ref = dequant_ref(qa, qb, sa, sb, bias)
    tol = {torch.float16: 2e-3, torch.float32: 2e-3}[out_dtype]  # fast fp8 accumulation
    assert rel_err(y, ref) < tol


@pytest.mark.gpu
@needs_hopper
def test_kernel_other_layouts_are_copied():
    qa, qb, sa, sb = operands(200, 136, 256)
    want = dequant_ref(qa, qb, sa, sb)
    with kf.backend("triton"):
        row_major_b = ops.fp8_matmul(qa, qb.contiguous(), sa, sb)  # b [K, N] row-major
        padded_a = torch.empty(200, 272, dtype=FP8, device=DEVICE)[:, :256]
        padded_a.copy_(qa)
        strided = ops.fp8_matmul(padded_a, qb, sa, sb)
    assert_close(row_major_b, want, torch.bfloat16, "row-major b")
    assert_close(strided, want, torch.bfloat16, "padded a")


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("cfg", fp8_gemm.CONFIGS, ids=str)
def test_every_candidate_config(cfg):
    qa, qb, sa, sb = operands(700, 900, 1024)
    try:
        y = fp8_gemm.fp8_forward(qa, qb, sa, sb, None, torch.bfloat16, cfg=cfg)
    except Exception as exc:  # noqa: BLE001  (the tuner skips configs that do not compile)
        if "out of resource" in str(exc).lower():
            pytest.skip(f"does not fit this GPU: {exc}"[:200])
        raise
    assert_close(y, dequant_ref(qa, qb, sa, sb), torch.bfloat16, str(cfg))


@pytest.mark.gpu
@needs_hopper
def test_cuda_graph_capture():
    qa, qb, sa, sb = operands(512, 512, 512)
    with kf.backend("triton"):
        ops.fp8_matmul(qa, qb, sa, sb)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = ops.fp8_matmul(qa, qb, sa, sb)
        qa2, qb2, sa2, sb2 = operands(512, 512, 512)
        qa.copy_(qa2), qb.copy_(qb2), sa.copy_(sa2), sb.copy_(sb2)
        graph.replay()
        torch.cuda.synchronize()
    assert_close(y, dequant_ref(qa2, qb2, sa2, sb2), torch.bfloat16, "replayed")
