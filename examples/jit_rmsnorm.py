"""RMS norm with a SiLU gate, written in NumPy and traced by kf.jit: one fused kernel that
reads x, w and g once. Shows the traced IR and every mode agreeing on bf16 inputs."""

import numpy as np
import torch

import kernforge as kf


def rmsnorm_gate(x, w, g):
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6) * w
    return y * (g / (1 + np.exp(-g)))


def main() -> None:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(32, 512, device=dev, dtype=torch.bfloat16)
    w = 1 + 0.1 * torch.randn(512, device=dev, dtype=torch.bfloat16)
    g = torch.randn(32, 512, device=dev, dtype=torch.bfloat16)
    ref = kf.jit(rmsnorm_gate, mode="numpy")(x, w, g).double()
    # interpret mode needs the whole process in Triton's interpreter (the default without a
    # GPU, or KERNFORGE_INTERPRET=1), so a GPU machine checks simulate and gpu here.
    modes = ["simulate", "gpu" if dev == "cuda" else "interpret"]
    for mode in modes:
        out = kf.jit(rmsnorm_gate, mode=mode)(x, w, g)
        err = float((out.double().cpu() - ref.cpu()).norm() / ref.norm())
        print(f"{mode:>9}: {out.dtype} rel err vs NumPy {err:.2e}")
    print(kf.jit(rmsnorm_gate).trace(x, w, g).graph)


if __name__ == "__main__":
    main()
