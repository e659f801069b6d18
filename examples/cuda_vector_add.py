"""Compile a CUDA C++ kernel with NVRTC and launch it on torch tensors.

    python examples/cuda_vector_add.py

Everywhere: compiles (NVRTC needs no GPU) and shows the parsed signature and the cache. On a
GPU: launches on random inputs, checks against torch, and measures the host time per launch.
"""

from __future__ import annotations

import time

import torch

from kernforge import cuda as kcuda

SOURCE = r"""
#include <kernforge/types.cuh>
extern "C" __global__ void vadd(const ELEM* __restrict__ x, const ELEM* __restrict__ y,
                                ELEM* __restrict__ out, float alpha, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = kf::from_float<ELEM>(kf::to_float(x[i]) + alpha * kf::to_float(y[i]));
}
"""


def main() -> None:
    k = kcuda.compile(SOURCE, "vadd", options=("-DELEM=__nv_bfloat16",))
    print(f"{k.signature} for {k.arch}: {len(k.cubin)} bytes, from {k.origin}")
    print("params:", [str(p) for p in k.params])
    print("cache:", kcuda.cache_stats())
    reason = kcuda.available()
    if reason:
        print(f"not launching: {reason}")
        return
    n = 1_000_003
    x = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(x)
    k.launch(x, y, out, 0.5, n, grid=kcuda.cdiv(n, 256), block=256)
    ref = (x.float() + 0.5 * y.float()).bfloat16()
    print("max abs error vs torch:", (out.float() - ref.float()).abs().max().item())
    # Host cost of one launch (argument checks + cuLaunchKernel), on a tiny problem.
    small = [t[:1024] for t in (x, y, out)]
    for _ in range(100):
        k.launch(*small, 0.5, 1024, grid=4, block=256)
    torch.cuda.synchronize()
    reps = 2000
    t0 = time.perf_counter()
    for _ in range(reps):
        k.launch(*small, 0.5, 1024, grid=4, block=256)
    host_us = (time.perf_counter() - t0) / reps * 1e6
    torch.cuda.synchronize()
    print(f"host time per launch: {host_us:.1f} us")


if __name__ == "__main__":
    main()
