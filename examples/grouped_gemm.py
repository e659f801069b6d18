"""Grouped GEMM: every expert's projection of a mixture-of-experts layer in one kernel launch,
forward and backward, against a Python loop of matmuls.

    python examples/grouped_gemm.py

``ops.grouped_gemm(x, weight, group_sizes, bias)``: x [T, K] holds the rows of all groups one
after another (tokens sorted by expert), ``group_sizes`` [G] how many rows each group has (on
the device: no host sync; groups may be empty), weight [G, N, K]. On a GPU the Triton kernel
runs (bf16/fp16); without one it runs through Triton's CPU interpreter at small sizes.
"""

from __future__ import annotations

import torch

from kernforge import ops

on_gpu = torch.cuda.is_available()
dev = "cuda" if on_gpu else "cpu"
dtype = torch.bfloat16
# Experts, hidden size, expert width, routed rows (tokens x top-k).
E, H, I, T = (8, 4096, 14336, 16384) if on_gpu else (4, 64, 96, 50)

# Route T rows to experts (random, uneven), and sort them by expert.
expert = torch.randint(0, E, (T,), device=dev)
order = torch.argsort(expert, stable=True)
group_sizes = torch.bincount(expert, minlength=E).to(torch.int32)
x = torch.randn(T, H, device=dev, dtype=dtype)[order].requires_grad_()

w_up = (torch.randn(E, I, H, device=dev) / H**0.5).to(dtype).requires_grad_()  # [E, N, K]
# A weight stored [E, K, N] (in, out) is passed as a transposed view: read in place.
w_down_in_out = (torch.randn(E, I, H, device=dev) / I**0.5).to(dtype).requires_grad_()

h = ops.grouped_gemm(x, w_up, group_sizes)  # [T, I]
y = ops.grouped_gemm(torch.relu(h), w_down_in_out.transpose(1, 2), group_sizes)  # [T, H]
y.float().square().mean().backward()
print(
    f"groups {group_sizes.tolist()}: y {tuple(y.shape)} {y.dtype}; "
    f"grads x {tuple(x.grad.shape)}, w_up {tuple(w_up.grad.shape)}, "
    f"w_down {tuple(w_down_in_out.grad.shape)}"
)

# The same computation as a loop over the experts, in fp32.
with torch.no_grad():
    ref, start = [], 0
    for e, n in enumerate(group_sizes.tolist()):
        xe = x[start : start + n].float()
        he = torch.relu(xe @ w_up[e].float().t())
        ref.append(he @ w_down_in_out[e].float())
        start += n
    ref = torch.cat(ref)
    print(f"relative error vs the fp32 loop: {float((y.float() - ref).norm() / ref.norm()):.1e}")
