"""GEMM with a fused epilogue: ``kernforge.ops.matmul(a, b, bias, activation, residual)``.

    python examples/matmul_epilogue.py

Computes ``gelu(x @ w.T + bias) + residual`` in one kernel (the MLP up-projection of a
transformer block, with the residual add), checks it against torch in fp32, runs the backward,
and on a GPU times it against torch eager (cuBLAS, then the bias add and gelu as separate
kernels). Also shows ``ops.bmm`` with a broadcast operand and ``ops.linear`` routing. Without a
GPU the kernels run in Triton's CPU interpreter at small sizes.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

import kernforge as kf
from kernforge import ops

on_gpu = torch.cuda.is_available()
dev = "cuda" if on_gpu else "cpu"
dtype = torch.bfloat16
M, N, K = (4096, 14336, 4096) if on_gpu else (48, 80, 64)

x = torch.randn(M, K, device=dev).to(dtype)
w = (torch.randn(N, K, device=dev) * K**-0.5).to(dtype)  # nn.Linear layout [out, in]
bias = torch.randn(N, device=dev).to(dtype)
res = torch.randn(M, N, device=dev).to(dtype)

# w.t() is a [K, N] view: the kernel reads the weight in place (no transpose copy).
y = ops.matmul(x, w.t(), bias, activation="gelu", residual=res)
ref = F.gelu(x.float() @ w.float().t() + bias.float(), approximate="tanh") + res.float()
err = float((y.float() - ref).norm() / ref.norm())
print(f"gelu(x @ w.T + bias) + res: {tuple(y.shape)} {y.dtype}, rel. error vs fp32 {err:.1e}")

# Backward: gradients for x, w, bias and the residual (the pre-activation is saved by the
# forward kernel, so the backward runs no extra GEMM).
xs = x[:64].clone().requires_grad_()
ws = w[:, :].clone().requires_grad_()
out = ops.matmul(xs, ws.t(), bias, activation="silu")
out.float().square().mean().backward()
print(f"backward: dx {tuple(xs.grad.shape)}, dw {tuple(ws.grad.shape)} (w's own layout: "
      f"contiguous={ws.grad.is_contiguous()})")  # fmt: skip

# Batched, with one matrix shared by every batch (batch stride 0: read once per tile).
a = torch.randn(4, 32, K, device=dev).to(dtype)
shared = (torch.randn(K, 48, device=dev) * K**-0.5).to(dtype)
yb = ops.bmm(a, shared.expand(4, K, 48))
print(f"bmm with a broadcast operand: {tuple(yb.shape)}")

# ops.linear: up to 16 rows run the decode GEMV (on a GPU), more rows cuBLAS under "auto"
# (still faster at most shapes), or this GEMM when the backend "triton" is named.
for rows in (8, 64):
    xr = torch.randn(rows, K, device=dev).to(dtype)
    args = {"x": xr, "weight": w, "bias": None}
    with kf.backend("triton") if rows > 16 else contextlib.nullcontext():
        chosen = kf.dispatch.select("linear", args).backend
    print(f"ops.linear with {rows} rows runs on {chosen!r}")

if on_gpu:
    import triton.testing

    def eager():
        return F.gelu(torch.matmul(x, w.t()) + bias, approximate="tanh") + res

    def fused():
        return ops.matmul(x, w.t(), bias, activation="gelu", residual=res)

    fused()  # the first call of a shape tunes (once; remembered on disk)
    flops = 2 * M * N * K
    for name, fn in (("kernforge fused", fused), ("torch eager", eager)):
        ms = triton.testing.do_bench(fn, return_mode="median")
        print(f"{name:16s} {ms:.3f} ms  {flops / ms / 1e9:.0f} TFLOP/s")
