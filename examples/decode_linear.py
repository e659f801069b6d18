"""The decode GEMV: ``kernforge.ops.linear`` for a few rows of x (LLM decoding), against
``torch.nn.functional.linear`` (cuBLAS).

    python examples/decode_linear.py

On a GPU, ops.linear runs kernforge's CUDA C++ GEMV for up to 16 rows (bf16/fp16), reading the
weight once at the memory roofline; with more rows it calls torch's matmul. Without a GPU it
runs torch's matmul (the torch backend), so the script still checks the results.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import kernforge as kf
from kernforge import ops

on_gpu = torch.cuda.is_available()
dev = "cuda" if on_gpu else "cpu"
dtype = torch.bfloat16
N, K = (14336, 4096) if on_gpu else (1000, 512)  # an MLP up-projection of an 8B model
backend = "auto" if on_gpu else "torch"

w = (torch.randn(N, K, device=dev) / K**0.5).to(dtype)  # nn.Linear layout: [out, in]
b = torch.randn(N, device=dev).to(dtype)
for rows in (1, 4, 16):
    x = torch.randn(rows, K, device=dev).to(dtype)
    with kf.backend(backend):
        y = ops.linear(x, w, b)
    ref = F.linear(x.float(), w.float(), b.float())
    err = float((y.float() - ref).norm() / ref.norm())
    print(f"M={rows:2d}: y {tuple(y.shape)} {y.dtype}, relative error vs fp32 {err:.2e}")

# Leading dimensions are flattened ([batch, seq, K] -> rows), and autograd works.
x = torch.randn(2, 3, K, device=dev, dtype=dtype, requires_grad=True)
with kf.backend(backend):
    y = ops.linear(x, w)
y.float().sum().backward()
print(f"[2, 3, K] -> {tuple(y.shape)}; dx {tuple(x.grad.shape)}")

# ops.fused_linear: a decoder layer's pre-norm MLP up-projection in one call (one GEMV launch for
# up to 16 rows on the GPU): RMSNorm of x, the projection, SwiGLU of the interleaved gate/up
# rows (gate j at row 2j, up j at row 2j + 1), then a residual add.
gate, up = w[: N // 2], w[N // 2 :]  # any two [I, K] projections
gate_up = torch.stack([gate, up], 1).flatten(0, 1)  # interleave their rows
norm_w = (1 + 0.1 * torch.randn(K, device=dev)).to(dtype)
x = torch.randn(1, K, device=dev).to(dtype)
res = torch.randn(1, N // 2, device=dev).to(dtype)
with kf.backend(backend):
    y = ops.fused_linear(x, gate_up, None, norm_w, 1e-6, swiglu=True, residual=res)
xn = F.rms_norm(x.float(), (K,), norm_w.float(), 1e-6)
ref = F.silu(F.linear(xn, gate.float())) * F.linear(xn, up.float()) + res.float()
err = float((y.float() - ref).norm() / ref.norm())
print(f"fused_linear: y {tuple(y.shape)}, relative error vs fp32 {err:.2e}")

if on_gpu:
    # Time one GEMV by CUDA-graph replay over 8 weight copies (so W comes from HBM, not L2).
    import triton.testing

    ws = [w.clone() for _ in range(8)]
    x1 = torch.randn(1, K, device=dev, dtype=dtype)

    def graph_of(fn):
        fn()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return g

    kf_graph = graph_of(lambda: [ops.linear(x1, wi) for wi in ws])
    torch_graph = graph_of(lambda: [F.linear(x1, wi) for wi in ws])
    for name, g in (("kernforge", kf_graph), ("cuBLAS", torch_graph)):
        ms = triton.testing.do_bench(g.replay, return_mode="median") / len(ws)
        print(f"{name:9s} 1x{N}x{K}: {ms * 1e3:6.1f} us, {N * K * 2 / ms / 1e9:.2f} TB/s of W")
