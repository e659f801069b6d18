"""Compile a ResNet-style network with kernforge.compile_model, inspect it, save it, load it
and run it (GPU when there is one, else Triton's interpreter on the CPU).

    PYTHONPATH=src python examples/compile_resnet.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

import kernforge


def block(cin: int, cout: int, stride: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
        nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
    )  # fmt: skip


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.MaxPool2d(2), block(16, 32, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(32, 10),
    ).eval()  # fmt: skip
    gpu = torch.cuda.is_available() and not kernforge.device.INTERPRET
    dev = "cuda" if gpu else "cpu"
    model = model.to(dev)
    x = torch.randn(4, 3, 16, 16, device=dev)

    prog = kernforge.compile_model(model, (x,), dtype=torch.bfloat16)
    print(prog.describe())
    out = prog(x)  # gpu: CUDA graph captured on this first call, replayed after
    with torch.no_grad():
        ref = model(x)
    print("max |compiled - eager| =", (out.float() - ref).abs().max().item())
    print("same top-1:", bool((out.float().argmax(-1) == ref.argmax(-1)).all()))

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "net.kf"
        prog.save(path)
        back = kernforge.load(path)
        print("reloaded program agrees:", torch.equal(back(x), out))
    for row in prog.profile(x, iters=3)["partitions"]:
        print(f"partition {row['partition']} ({row['kind']}): {row['ms']:.3f} ms")


if __name__ == "__main__":
    main()
