"""An attention score block in NumPy: scaled Q @ K^T (einsum), a causal mask, softmax, and
@ V. kf.jit fuses the scaling into the score matmul's epilogue, the mask and the softmax into
one rows kernel, and runs P @ V as a batched matmul."""

import math

import numpy as np
import torch

import kernforge as kf


@kf.jit
def attention(q, k, v):
    s = np.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(q.shape[-1])
    n, m = s.shape[-2:]
    causal = np.arange(m)[None, :] <= np.arange(n)[:, None]
    s = np.where(causal, s, -np.inf)
    p = np.exp(s - np.max(s, axis=-1, keepdims=True))
    p = p / np.sum(p, axis=-1, keepdims=True)
    return p @ v


def main() -> None:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = (torch.randn(2, 4, 37, 32, device=dev) for _ in range(3))
    out = attention(q, k, v)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    print("max abs error vs torch SDPA:", float((out - ref).abs().max()))
    print(attention.lower(q, k, v).plan.describe())


if __name__ == "__main__":
    main()
