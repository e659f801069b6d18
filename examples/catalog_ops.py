"""Run every catalog op forward and backward, on the GPU if there is one, else on the CPU
through Triton's interpreter, and compare each with its torch reference.

    python examples/catalog_ops.py
"""

from __future__ import annotations

import torch

import kernforge
from kernforge import ops

dev = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if dev == "cuda" else torch.float32
x = torch.randn(4, 16, 256, device=dev, dtype=dtype, requires_grad=True)
w = torch.rand(256, device=dev, dtype=dtype, requires_grad=True)
q = torch.randn(2, 16, 4, 64, device=dev, dtype=dtype, requires_grad=True)
k = torch.randn(2, 16, 2, 64, device=dev, dtype=dtype, requires_grad=True)  # GQA: 2 KV heads
angle = torch.outer(torch.arange(16.0, device=dev), torch.rand(32, device=dev))
cos, sin = torch.cat([angle, angle], -1).cos(), torch.cat([angle, angle], -1).sin()

calls = {
    "rms_norm": lambda: ops.rms_norm(x, w),
    "rms_norm+residual": lambda: ops.rms_norm(x, w, residual=x * 0.5)[0],
    "layer_norm": lambda: ops.layer_norm(x, w, w),
    "softmax": lambda: ops.softmax(x),
    "log_softmax": lambda: ops.log_softmax(x, dim=1),
    "silu_and_mul": lambda: ops.silu_and_mul(x),
    "swiglu": lambda: ops.swiglu(x, x.flip(-1)),
    "geglu": lambda: ops.geglu(x, x.flip(-1), approximate="none"),
    "rope": lambda: torch.cat([t.flatten() for t in ops.rope(q, k, cos, sin)]),
}
print(f"device: {dev}, dtype: {dtype}, backend: {kernforge.get_backend()}")
for name, call in calls.items():
    out = call()
    g = torch.randn_like(out)  # a random upstream gradient (a plain sum can give a zero one)
    (gx,) = torch.autograd.grad(out, [q if name == "rope" else x], g)
    with kernforge.backend("torch"):
        ref = call()
        (rx,) = torch.autograd.grad(ref, [q if name == "rope" else x], g)
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    gerr = ((gx.float() - rx.float()).norm() / rx.float().norm().clamp_min(1e-12)).item()
    print(f"{name:18s} out {tuple(out.shape)}  rel err fwd {err:.1e}  bwd {gerr:.1e}")
