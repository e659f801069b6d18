"""CUDA C++ kernels launched on the GPU against torch (``gpu`` marker: skipped without one)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from kernforge import cuda as kcuda
from kernforge.errors import ArgumentError

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CTYPE = {torch.float32: "float", torch.float16: "__half", torch.bfloat16: "__nv_bfloat16"}
TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}

AXPBY = r"""
#include <kernforge/types.cuh>
extern "C" __global__ void axpby(const ELEM* __restrict__ x, const ELEM* __restrict__ y,
                                 ELEM* __restrict__ out, float a, ELEM b, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) {
    out[i] = kf::from_float<ELEM>(a * kf::to_float(x[i]) + kf::to_float(b) * kf::to_float(y[i]));
  }
}
"""


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-3)).item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 1000, 4097, 1 << 20])
def test_axpby(dtype, n):
    k = kcuda.compile(AXPBY, "axpby", options=(f"-DELEM={CTYPE[dtype]}",))
    assert k.arch == kcuda.default_arch()
    x = torch.randn(n, device="cuda").to(dtype)
    y = torch.randn(n, device="cuda").to(dtype)
    out = torch.full_like(x, float("nan"))
    a, b = 0.75, np.float32(-1.25)
    k.launch(x, y, out, a, b, n, grid=kcuda.cdiv(n, 256), block=256)
    ref = a * x.double() + float(b) * y.double()
    assert rel_err(out, ref) < TOL[dtype]


def test_launch_checks_arguments_on_gpu():
    k = kcuda.compile(AXPBY, "axpby", options=("-DELEM=float",))
    x = torch.randn(10, device="cuda")
    with pytest.raises(ArgumentError, match="parameter 'y'.*CUDA device"):
        k.launch(x, x.cpu(), x, 1.0, 1.0, 10, grid=1, block=32)
    with pytest.raises(ArgumentError, match="parameter 'out'.*float16"):
        k.launch(x, x, x.half(), 1.0, 1.0, 10, grid=1, block=32)
    with pytest.raises(ArgumentError, match="at most 1024"):
        k.launch(x, x, x, 1.0, 1.0, 10, grid=1, block=2048)


def test_side_stream_and_cuda_graph():
    k = kcuda.compile(AXPBY, "axpby", options=("-DELEM=float",))
    n = 1 << 16
    x, y = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")
    out = torch.full_like(x, float("nan"))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # torch's current stream is s: the launch goes there
        k.launch(x, y, out, 2.0, 1.0, n, grid=kcuda.cdiv(n, 256), block=256)
    torch.cuda.current_stream().wait_stream(s)
    torch.testing.assert_close(out, 2 * x + y)
    out2 = torch.full_like(x, float("nan"))
    k.launch(x, y, out2, 3.0, 1.0, n, grid=kcuda.cdiv(n, 256), block=256, stream=s)
    s.synchronize()
    torch.testing.assert_close(out2, 3 * x + y)
    # Captured into a CUDA graph and replayed with new inputs.
    g = torch.cuda.CUDAGraph()
    out3 = torch.full_like(x, float("nan"))
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.graph(g):
        k.launch(x, y, out3, -1.0, 1.0, n, grid=kcuda.cdiv(n, 256), block=256)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out3, -x + y)


BIG_SMEM = r"""
extern "C" __global__ void reverse_blocks(const float* x, float* out, int n) {
  extern __shared__ float buf[];
  const int per = blockDim.x * 32;  // 32 elements per thread through shared memory
  const int base = blockIdx.x * per;
  for (int j = threadIdx.x; j < per; j += blockDim.x)
    buf[j] = base + j < n ? x[base + j] : 0.f;
  __syncthreads();
  for (int j = threadIdx.x; j < per; j += blockDim.x)
    if (base + j < n) out[base + j] = buf[per - 1 - j];
}
"""


def test_dynamic_shared_memory_over_48k():
    k = kcuda.compile(BIG_SMEM, "reverse_blocks")
    block, per = 640, 640 * 32  # 80 KiB of shared memory per block
    n = 3 * per - 77
    x = torch.randn(n, device="cuda")
    out = torch.full_like(x, float("nan"))
    k.launch(x, out, n, grid=kcuda.cdiv(n, per), block=block, shared_mem=per * 4)
    xp = torch.cat([x, torch.zeros(3 * per - n, device="cuda")]).view(3, per).flip(1).flatten()
    torch.testing.assert_close(out, xp[:n])
    assert k.attributes()["num_regs"] > 0


TRANSPOSE = r"""
/*@kf
dim R, C                        # rows and columns of the input: run-time extents
tensor X[R, C] ELEM strides(?, ?)
tensor Y[C, R] ELEM             # packed output
tensor S[C:32, R:32] ELEM strides(33, 1)   # padded shared tile: no bank conflicts
@kf*/
extern "C" __global__ void transpose(ELEM* x, ELEM* y, int rows, int cols, long long sr,
                                     long long sc) {
  X_t X(x, {rows, cols}, {sr, sc});
  Y_t Y(y, {cols, rows});
  __shared__ S_buf tile;
  const R r0(blockIdx.y * 32);
  const C c0(blockIdx.x * 32);
  for (int dy = threadIdx.y; dy < 32; dy += blockDim.y) {
    const R r = r0 + dy;
    const C c = c0 + int(threadIdx.x);
    if (X.contains(r, c)) tile[C(threadIdx.x)][R(dy)] = X[r][c];
  }
  __syncthreads();
  for (int dy = threadIdx.y; dy < 32; dy += blockDim.y) {
    const C c = c0 + dy;
    const R r = r0 + int(threadIdx.x);
    if (Y.contains(c, r)) Y(r, c) = tile(R(threadIdx.x), C(dy));  // position-free
  }
}
"""


def transpose_source(dtype: torch.dtype) -> str:
    """The typed transpose for ``dtype`` (the @kf block names its dtype)."""
    elem = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bf16"}[dtype]
    return TRANSPOSE.replace("] ELEM", f"] {elem}").replace("ELEM*", f"{CTYPE[dtype]}*")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (33, 65), (300, 17), (1024, 513)])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_typed_transpose(dtype, shape, layout):
    k = kcuda.compile(transpose_source(dtype), "transpose")
    rows, cols = shape
    if layout == "contiguous":
        x = torch.randn(rows, cols, device="cuda").to(dtype)
    else:
        x = torch.randn(cols, rows, device="cuda").to(dtype).t()
    y = torch.full((cols, rows), float("nan"), device="cuda", dtype=dtype)
    k.launch(x, y, rows, cols, *x.stride(), grid=(kcuda.cdiv(cols, 32), kcuda.cdiv(rows, 32)),
             block=(32, 8))  # fmt: skip
    assert torch.equal(y, x.t())


LAYOUT_PROBE = r"""
/*@kf
dim I, K
tensor A[I, K] float32 strides(?, ?)
tensor O[I, K] float32
@kf*/
// Every element through three access paths: A[i][k], A(k, i) and a 4 x 8 tile.
extern "C" __global__ void probe(float* a, float* o1, float* o2, float* o3, int m, int n,
                                 long long s0, long long s1) {
  A_t A(a, {m, n}, {s0, s1});
  O_t O1(o1, {m, n}), O2(o2, {m, n}), O3(o3, {m, n});
  const I i(blockIdx.y * blockDim.y + threadIdx.y);
  const K k(blockIdx.x * blockDim.x + threadIdx.x);
  if (!A.contains(i, k)) return;
  O1[i][k] = A[i][k];
  O2(k, i) = A(k, i);
  auto t = A.tile<4, 8>(I(i.v / 4), K(k.v / 8));
  auto u = O3.tile<4, 8>(I(i.v / 4), K(k.v / 8));
  u[i % 4][k % 8] = t(k % 8, i % 4);
}
"""


@pytest.mark.parametrize("shape", [(1, 1), (13, 21), (64, 40)])
def test_view_access_paths_agree(shape):
    k = kcuda.compile(LAYOUT_PROBE, "probe")
    m, n = shape
    a = torch.randn(n + 3, m, device="cuda")[:n].t()  # padded, transposed: strides (1, m)
    outs = [torch.full((m, n), float("nan"), device="cuda") for _ in range(3)]
    k.launch(a, *outs, m, n, *a.stride(), grid=(kcuda.cdiv(n, 16), kcuda.cdiv(m, 16)),
             block=(16, 16))  # fmt: skip
    for o in outs:
        assert torch.equal(o, a)


def load_example():
    spec = importlib.util.spec_from_file_location(
        "cuda_typed_tiled", ROOT / "examples" / "cuda_typed_tiled.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mnk", [(1, 1, 1), (37, 53, 29), (128, 96, 200), (255, 17, 64)])
def test_typed_matmul_example(dtype, mnk):
    ex = load_example()
    m, n, kk = mnk
    a = torch.randn(m, kk, device="cuda").to(dtype)
    b = torch.randn(n, kk, device="cuda").to(dtype).t()  # non-contiguous B
    c = ex.matmul(a, b)
    ref = a.double() @ b.double()
    assert rel_err(c, ref) < 1e-5
