"""A 2-layer MLP in NumPy: x @ W1.T + b1, tanh-GELU, @ W2.T + b2. kf.jit makes two matmul
kernels, each with its bias and activation fused into the epilogue, reading the transposed
weights in place (no copies)."""

import numpy as np
import torch

import kernforge as kf


def gelu(x):
    return 0.5 * x * (1 + np.tanh(0.7978845608028654 * (x + 0.044715 * x**3)))


@kf.jit
def mlp(x, w1, b1, w2, b2):
    return gelu(x @ w1.T + b1) @ w2.T + b2


def main() -> None:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = torch.float16 if dev == "cuda" else torch.float32
    x = torch.randn(48, 64, device=dev, dtype=dt)
    w1 = torch.randn(256, 64, device=dev, dtype=dt) / 8
    b1 = torch.randn(256, device=dev, dtype=dt) / 10
    w2 = torch.randn(32, 256, device=dev, dtype=dt) / 16
    b2 = torch.randn(32, device=dev, dtype=dt) / 10
    y = mlp(x, w1, b1, w2, b2)
    ref = kf.jit(mlp.fn, mode="numpy")(*(t.double() for t in (x, w1, b1, w2, b2)))
    print("rel err vs NumPy (float64):", float((y.double() - ref).norm() / ref.norm()))
    print(mlp.lower(x, w1, b1, w2, b2).plan.describe())


if __name__ == "__main__":
    main()
