"""A tiled matmul in CUDA C++ with typed dimensions, compiled by NVRTC from Python.

``C[I, J] = A[I, K] @ B[K, J]``: the tensor types come from a Python spec
(:mod:`kernforge.cuda.dims`), so the kernel indexes by dimension: ``A[i][k]`` compiles,
``A[k][i]`` does not. Shared-memory tiles are ``kf::Buffer`` types from the same spec.

    python examples/cuda_typed_tiled.py

Compiles for sm_80 and sm_90 everywhere (NVRTC needs no GPU); on a GPU it also runs the
kernel on random odd-sized inputs (fp32, fp16, bf16, a transposed B) and checks it against
torch.
"""

from __future__ import annotations

import torch

from kernforge import cuda as kcuda
from kernforge.cuda.dims import Dim, Tensor, header

TILE = 16
I, J, K = Dim("I"), Dim("J"), Dim("K")

KERNEL = r"""
#include <kernforge/types.cuh>
#include "matmul_dims.cuh"

// One TILE x TILE block of C per thread block; thread (y, x) owns C[i][j].
extern "C" __global__ void tiled_matmul(elem* a, elem* b, float* c, int m, int n, int k,
                                        long long sam, long long sak, long long sbk,
                                        long long sbn) {
  A_t A(a, {m, k}, {sam, sak});
  B_t B(b, {k, n}, {sbk, sbn});
  C_t C(c, {m, n});
  __shared__ As_buf As;  // [I:TILE, K:TILE]
  __shared__ Bs_buf Bs;  // [K:TILE, J:TILE]
  const I ti(threadIdx.y);
  const J tj(threadIdx.x);
  const I i = I(blockIdx.y * TILE) + ti;
  const J j = J(blockIdx.x * TILE) + tj;
  const elem zero = kf::from_float<elem>(0.f);
  float acc = 0.f;
  for (int k0 = 0; k0 < k; k0 += TILE) {
    // Which K each thread loads is spelled out: threadIdx.x walks K in A's tile, y in B's.
    const K ka(k0 + threadIdx.x), kb(k0 + threadIdx.y);
    As[ti][K(threadIdx.x)] = A.contains(i, ka) ? A[i][ka] : zero;
    Bs[K(threadIdx.y)][tj] = B.contains(kb, j) ? B[kb][j] : zero;
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < TILE; ++kk) {
      acc += kf::to_float(As[ti][K(kk)]) * kf::to_float(Bs[K(kk)][tj]);
    }
    __syncthreads();
  }
  if (C.contains(i, j)) C[i][j] = acc;
}
"""


def dims_header(dtype: torch.dtype) -> str:
    """The typed-dimension header of the kernel for one input dtype."""
    decls = [
        Tensor((I, K), dtype, strides=(None, None), name="A"),  # any strides (views too)
        Tensor((K, J), dtype, strides=(None, None), name="B"),
        Tensor((I, J), torch.float32, name="C"),  # packed row-major output
        Tensor((I(TILE), K(TILE)), dtype, name="As"),
        Tensor((K(TILE), J(TILE)), dtype, name="Bs"),
    ]
    elem = {torch.float32: "float", torch.float16: "__half", torch.bfloat16: "__nv_bfloat16"}
    return header(*decls) + f"using elem = {elem[dtype]};\n"


def compile_matmul(dtype: torch.dtype, arch: str | None = None) -> kcuda.Kernel:
    """Compile the kernel for ``dtype`` inputs (``arch`` None: this GPU, or sm_90a)."""
    return kcuda.compile(
        KERNEL,
        "tiled_matmul",
        arch=arch,
        options=(f"-DTILE={TILE}",),
        headers={"matmul_dims.cuh": dims_header(dtype)},
    )


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` in float32 through the typed kernel (a, b: CUDA tensors of one dtype)."""
    m, k = a.shape
    k2, n = b.shape
    assert k == k2, (a.shape, b.shape)
    c = torch.full((m, n), float("nan"), device=a.device, dtype=torch.float32)
    kernel = compile_matmul(a.dtype)
    kernel.launch(
        a, b, c, m, n, k, *a.stride(), *b.stride(),
        grid=(kcuda.cdiv(n, TILE), kcuda.cdiv(m, TILE)), block=(TILE, TILE),
    )  # fmt: skip
    return c


def main() -> None:
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for arch in ("sm_80", "sm_90"):
            k = compile_matmul(dtype, arch)
            print(f"compiled {k.signature} for {arch} ({dtype}): {len(k.cubin)} bytes")
    reason = kcuda.available()
    if reason:
        print(f"not launching: {reason}")
        return
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for m, n, k in [(1, 1, 1), (37, 53, 29), (128, 96, 200)]:
            a = torch.randn(m, k, device="cuda").to(dtype)
            b = torch.randn(n, k, device="cuda").to(dtype).t()  # a transposed view: strides
            c = matmul(a, b)
            ref = a.double() @ b.double()
            err = ((c.double() - ref).norm() / ref.norm().clamp_min(1e-6)).item()
            print(f"{dtype} {m}x{k} @ {k}x{n}: rel err {err:.2e}")
            assert err < 1e-5, err


if __name__ == "__main__":
    main()
