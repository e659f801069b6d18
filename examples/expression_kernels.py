"""Expression kernels: fused elementwise and rowwise ops from C-like expressions.

Runs on the CPU (Triton's interpreter) or a GPU (Triton and CUDA C++ backends). With
``--bench`` on a GPU, times a few ops against torch.

    PYTHONPATH=src python examples/expression_kernels.py [--bench]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import kernforge as kf

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# An elementwise op: inputs are the free names (x, y), in order of appearance.
silu_mul = kf.elementwise("silu(x) * y", name="example_silu_mul")

# Scalar parameters are passed per call (not compiled in); the gradient is derived.
leaky = kf.elementwise("x > 0 ? x : slope * x", params={"slope": 0.01}, name="example_leaky")

# A custom gradient: a straight-through rounding (d out / dx = 1).
ste_round = kf.elementwise("floor(x + 0.5)", grad={"x": "dy"}, name="example_ste_round")

# Rowwise ops reduce along the last dimension: RMSNorm in one expression...
rms_norm = kf.rowwise("x * rsqrt(rowmean(x * x) + eps) * w", params={"eps": 1e-6},
                      name="example_rms_norm")  # fmt: skip
# ... or as map / reduce / finalize (``acc`` is the reduced value, ``n`` the row length).
rms_norm_mrf = kf.rowwise(map="x * x", reduce="sum", finalize="x * rsqrt(acc / n + eps) * w",
                          params={"eps": 1e-6}, name="example_rms_norm_mrf")  # fmt: skip
# A per-row result: logsumexp over the last dimension.
logsumexp = kf.rowwise("rowmax(x) + log(rowsum(exp(x - rowmax(x))))", name="example_lse")


def demo() -> None:
    """Run each op once and compare it with torch."""
    x = torch.randn(4, 1000, device=DEVICE, requires_grad=True)
    y = torch.randn(4, 1000, device=DEVICE, requires_grad=True)
    w = torch.randn(1000, device=DEVICE, requires_grad=True)

    out = silu_mul(x, y)
    out.sum().backward()
    print(silu_mul)
    print("  max |error| vs torch:", (out - F.silu(x) * y).abs().max().item())
    print("  derived backward:", silu_mul.expression("backward"))

    print(leaky, "\n  slope=0.2:", leaky(x, slope=0.2)[0, :4].tolist())
    z = ste_round(x * 3)
    print("ste_round:", z[0, :4].tolist(), "grad passes through:", end=" ")
    (g,) = torch.autograd.grad(z.sum(), [x])
    print(g[0, :4].tolist())

    a = rms_norm(x, w)
    b = rms_norm_mrf(x, w)
    ref = F.rms_norm(x, (1000,), w, eps=1e-6)
    print(rms_norm)
    print(
        "  max |error| vs F.rms_norm:", (a - ref).abs().max().item(), (b - ref).abs().max().item()
    )

    lse = logsumexp(x)
    print("logsumexp shape", tuple(lse.shape), "error:",
          (lse - torch.logsumexp(x, -1)).abs().max().item())  # fmt: skip

    for backend in ("torch", "triton", "cuda"):
        try:
            with kf.backend(backend):
                r = rms_norm(x, w)
            print(f"backend {backend}: ok, error {(r - ref).abs().max().item():.2e}")
        except kf.UnsupportedError as exc:
            print(f"backend {backend}: {str(exc).splitlines()[0][:100]}")

    print("\nGenerated Triton (forward of silu_mul), first kernel:")
    src = silu_mul.triton_source()
    start = src.index("def kernel_r0")
    print(src[start : src.index("@triton.jit", start)])


def bench() -> None:
    """Time forward passes on the GPU against torch (median of event-timed runs)."""
    from triton.testing import do_bench

    assert DEVICE == "cuda", "--bench needs a GPU"
    m, n = 32768, 4096
    x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    cases = {
        "silu_mul": (lambda: silu_mul(x, y), lambda: F.silu(x) * y, 3 * m * n * 2),
        "rms_norm": (lambda: rms_norm(x, w), lambda: F.rms_norm(x, (n,), w, 1e-6), 2 * m * n * 2),
    }
    for name, (ours, ref, nbytes) in cases.items():
        t_ref = do_bench(ref)
        print(f"{name} [{m}, {n}] bf16: torch {nbytes / t_ref / 1e9:.2f} TB/s")
        for backend in ("triton", "cuda"):
            with kf.backend(backend):
                t = do_bench(ours)
            print(f"  {backend}: {nbytes / t / 1e9:.2f} TB/s ({t_ref / t:.2f}x torch)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bench", action="store_true", help="time ops on the GPU")
    args = parser.parse_args()
    demo()
    if args.bench:
        bench()
