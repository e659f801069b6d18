"""Small hand-built models for the compiler tests (no torchvision on the CPU machines)."""

from __future__ import annotations

import torch
from torch import nn


def randomize_bn(model: nn.Module) -> nn.Module:
    """Give every BatchNorm random statistics and affine parameters (never the identity)."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.2)
    return model


class Basic(nn.Module):
    """ResNet's basic block, with a 1x1 strided projection when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        idt = x if self.down is None else self.down(x)
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + idt)


class TinyResNet(nn.Module):
    """conv/bn/relu/maxpool stem, two basic blocks (one strided with a projection), global
    average pool, dropout, linear: every op of a torchvision ResNet at 8x8 and 8-16 channels."""

    def __init__(self, classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = Basic(width, width)
        self.layer2 = Basic(width, 2 * width, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(self.drop(torch.flatten(self.avgpool(x), 1)))


def tiny_resnet(seed: int = 0, classes: int = 10) -> TinyResNet:
    torch.manual_seed(seed)
    return randomize_bn(TinyResNet(classes)).eval()


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def top5_agree(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Each row's top-1 is in the other's top-5 (ties in low precision may swap ranks)."""
    ta, tb = a.float().topk(5, -1).indices, b.float().topk(5, -1).indices
    return bool((ta[:, :1] == tb).any(-1).all() and (tb[:, :1] == ta).any(-1).all())


def modes(*names: str) -> list:
    """Run modes as pytest params: interpret only where Triton interprets (CPU machines), gpu
    only with a CUDA GPU (marked ``gpu``)."""
    import pytest

    from kernforge import device

    out = []
    for m in names:
        if m == "interpret":
            why = "Triton compiles for the GPU in this process"
            out.append(pytest.param(m, marks=pytest.mark.skipif(not device.INTERPRET, reason=why)))
        elif m == "gpu":
            out.append(pytest.param(m, marks=pytest.mark.gpu))
        else:
            out.append(m)
    return out


def on(mode: str, *xs: torch.Tensor):
    """``xs`` on the device ``mode`` runs on."""
    dev = "cuda" if mode == "gpu" else "cpu"
    return tuple(x.to(dev) for x in xs)
