"""Softmax written in NumPy, traced by kf.jit into one fused Triton kernel.

Runs on the GPU when there is one, else through Triton's CPU interpreter; checks the result
against NumPy and prints the kernel plan and the generated source.
"""

import numpy as np
import torch

import kernforge as kf


@kf.jit
def softmax(x):
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


def main() -> None:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(64, 1000, device=dev)
    y = softmax(x)
    ref = kf.jit(softmax.fn, mode="numpy")(x.double())
    print("max abs error vs NumPy:", float((y.double() - ref).abs().max()))
    print(softmax.lower(x).plan.describe())  # one kernel: max, exp, sum and divide fused
    print(softmax.source(x))


if __name__ == "__main__":
    main()
