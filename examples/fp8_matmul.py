"""fp8 (e4m3) GEMM: quantize with per-row / per-column scales, multiply on Hopper, compare with
bf16 and with fp32 math on the dequantized values.

    python examples/fp8_matmul.py

``ops.quantize_fp8(x, axis)`` returns ``(x_fp8, scale)`` with ``x ≈ x_fp8 * scale``;
``ops.fp8_matmul(a, b, scale_a, scale_b)`` computes ``(a * scale_a) @ (b * scale_b)`` with fp32
accumulation and a bf16 result. b is [K, N] given as ``w.t()`` of an [N, K] fp8 weight (the
layout Hopper's fp8 tensor cores read in place). On a Hopper GPU the Triton kernel runs; on
other GPUs and on the CPU the op falls back to the dequantizing torch reference (with a
warning), so the script still runs.
"""

from __future__ import annotations

import warnings

import torch

from kernforge import ops

on_gpu = torch.cuda.is_available()
dev = "cuda" if on_gpu else "cpu"
M, N, K = (4096, 4096, 4096) if on_gpu else (64, 48, 96)

x = torch.randn(M, K, device=dev)  # activations
w = torch.randn(N, K, device=dev) / K**0.5  # an nn.Linear weight [out, in]
bias = torch.randn(N, device=dev, dtype=torch.bfloat16)

qx, sx = ops.quantize_fp8(x, axis=1)  # one scale per row of x: [M]
qw, sw = ops.quantize_fp8(w.t(), axis=0)  # b = w.t() [K, N], one scale per column: [N]
print(f"x: {tuple(qx.shape)} {qx.dtype}, scale {tuple(sx.shape)}; "
      f"b: {tuple(qw.shape)} strides {qw.stride()}, scale {tuple(sw.shape)}")  # fmt: skip

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # off Hopper: the torch fallback warns once
    y = ops.fp8_matmul(qx, qw, sx, sw, bias)  # bf16 [M, N]

deq = (qx.float() * sx[:, None]) @ (qw.float() * sw[None, :]) + bias.float()
exact = x @ w.t() + bias.float()
err_kernel = float((y.float() - deq).norm() / deq.norm())
err_quant = float((y.float() - exact).norm() / exact.norm())
print(
    f"y {tuple(y.shape)} {y.dtype}: error vs fp32 on the fp8 values {err_kernel:.1e}, "
    f"vs the unquantized product {err_quant:.1e} (fp8 rounding)"
)

# One scale per tensor works the same way (0-d scales).
qx1, sx1 = ops.quantize_fp8(x)
qw1, sw1 = ops.quantize_fp8(w.t())
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    y1 = ops.fp8_matmul(qx1, qw1, sx1, sw1, out_dtype=torch.float16)
print(f"per-tensor scales: {y1.dtype}, scales {sx1.item():.3g} and {sw1.item():.3g}")
