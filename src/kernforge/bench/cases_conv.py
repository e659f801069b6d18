"""Benchmark cases of the convolution family: every convolution of ResNet-50 and ResNet-18
(torchvision layout, v1.5: the stride sits in the 3x3 conv) at batch 64, 224x224 input, bf16,
channels-last, each with the epilogue it has in the network once BatchNorm is folded:

- ``bias_relu``: conv -> bn -> relu (the stem, conv1 and conv2 of a block);
- ``bias_res_relu``: conv -> bn -> + identity -> relu (a block's last conv);
- ``bias``: conv -> bn (the downsample projection).

Implementations raced in the same run: kernforge (``ops.conv2d`` with the epilogue fused),
``torch`` (cuDNN ``F.conv2d`` with the bias, then the residual add and relu as eager torch runs
them), ``cudnn`` (the convolution alone, bias included: the lower bound of any unfused
schedule) and ``cudnn.benchmark`` (the same with cuDNN's algorithm search on). TFLOP/s count
2*M*O*C*KH*KW. The family bar (issue 9): the sum of kernforge's times
over the 53 ResNet-50 convolutions (each shape counted as often as the network runs it) against
the same sum for cuDNN; reported per shape and summed. Without a GPU: tiny shapes through the
interpreter (correctness only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import ops
from ..dispatch import backend
from .harness import Bar, Case, Result

FAMILY = "conv"
BATCH = 64
#: Written after measuring (H100, one run; benchmarks/results/conv.md).
NOTES = (
    "Sum over the 53 ResNet-50 convolutions (each with its folded-BN epilogue, counted as "
    "often as the network runs it): kernforge 2.92 ms, cuDNN conv alone 4.06 ms (1.39x; "
    "cuDNN's benchmark mode: the same), cuDNN + eager epilogue 5.55 ms (1.90x). ResNet-18's "
    "20: 1.27 ms against 1.57 (1.23x) and 1.83 (1.44x). Routes (kernels/conv.py ROUTES, "
    "measured in benchmarks/conv_sweep.py): four 1x1 stride-1 shapes without a residual run "
    "the TMA GEMM of kernels/matmul (12-20% faster than the implicit-GEMM kernel there); five "
    "3x3 shapes with 7x7 or 14x14 outputs at 256-512 channels run on cuDNN (conv + bias, then "
    "eager add/relu), which the implicit-GEMM kernel trails by 5-24% (few output tiles over a "
    "long K; it has no split-K): in the table they show ~0.91-0.94x cuDNN's conv alone and "
    "~1.0x torch. Other shapes under cuDNN's conv alone (but above cuDNN + epilogue): the 3x3 "
    "convolutions with a fused residual of ResNet-18 (0.82-0.93x: the residual tile is loaded "
    "after the K loop, not prefetched) and 512->2048 1x1 at 7x7 with the residual (0.98x). "
    "The stem (C = 3, 7x7, stride 2) runs at 40 TFLOP/s (1.6x cuDNN), bound by its gathers "
    "of 6-byte pixels, far from the GPU's peak."
)


@dataclass(frozen=True)
class ConvShape:
    """One convolution of a network: input [N, C, H, W], O filters of k x k, its epilogue and
    how many times the network runs it."""

    net: str
    c: int
    o: int
    k: int
    stride: int
    h: int
    epilogue: str  # "bias" | "bias_relu" | "bias_res_relu"
    count: int = 1

    @property
    def pad(self) -> int:
        return self.k // 2

    @property
    def out_hw(self) -> int:
        return (self.h + 2 * self.pad - self.k) // self.stride + 1

    def flops(self, n: int) -> int:
        return 2 * n * self.out_hw**2 * self.o * self.c * self.k * self.k

    @property
    def label(self) -> str:
        return f"{self.net} {self.c}->{self.o} k{self.k}s{self.stride} @{self.h} {self.epilogue}"


def _merge(shapes: list[ConvShape]) -> list[ConvShape]:
    """Identical convolutions merged into one entry with their count, first-seen order."""
    seen: dict[tuple, ConvShape] = {}
    for s in shapes:
        key = (s.c, s.o, s.k, s.stride, s.h, s.epilogue)
        if key in seen:
            old = seen[key]
            seen[key] = ConvShape(old.net, old.c, old.o, old.k, old.stride, old.h, old.epilogue,
                                  old.count + s.count)  # fmt: skip
        else:
            seen[key] = s
    return list(seen.values())


def resnet50_convs() -> list[ConvShape]:
    """The 53 convolutions of ResNet-50 (merged by shape, with counts)."""
    out = [ConvShape("rn50", 3, 64, 7, 2, 224, "bias_relu")]
    c_in, h = 64, 56
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        c_out = 4 * width
        for b in range(blocks):
            s = stride if b == 0 else 1
            out.append(ConvShape("rn50", c_in, width, 1, 1, h, "bias_relu"))
            out.append(ConvShape("rn50", width, width, 3, s, h, "bias_relu"))
            h_out = (h + 2 - 3) // s + 1
            out.append(ConvShape("rn50", width, c_out, 1, 1, h_out, "bias_res_relu"))
            if b == 0:
                out.append(ConvShape("rn50", c_in, c_out, 1, s, h, "bias"))
            c_in, h = c_out, h_out
    assert len(out) == 53
    return _merge(out)


def resnet18_convs() -> list[ConvShape]:
    """The 20 convolutions of ResNet-18 (merged by shape, with counts)."""
    out = [ConvShape("rn18", 3, 64, 7, 2, 224, "bias_relu")]
    c_in, h = 64, 56
    for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for b in range(2):
            s = stride if b == 0 else 1
            h_out = (h + 2 - 3) // s + 1
            out.append(ConvShape("rn18", c_in, width, 3, s, h, "bias_relu"))
            out.append(ConvShape("rn18", width, width, 3, 1, h_out, "bias_res_relu"))
            if b == 0 and (s != 1 or c_in != width):
                out.append(ConvShape("rn18", c_in, width, 1, s, h, "bias"))
            c_in, h = width, h_out
    assert len(out) == 20
    return _merge(out)


#: Tiny shapes for the CPU smoke run (interpreter).
CPU_SHAPES = [
    ConvShape("cpu", 16, 24, 3, 1, 7, "bias_res_relu"),
    ConvShape("cpu", 3, 16, 7, 2, 13, "bias_relu"),
    ConvShape("cpu", 32, 16, 1, 2, 9, "bias"),
]


def make_inputs(s: ConvShape, n: int, dev, dtype=torch.bfloat16):
    """Random channels-last (x, weight, bias, residual or None) for ``s`` at batch ``n``."""
    x = torch.randn(n, s.c, s.h, s.h, device=dev).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(s.o, s.c, s.k, s.k, device=dev) * (s.c * s.k * s.k) ** -0.5).to(dtype)
    w = w.contiguous(memory_format=torch.channels_last)  # packed: read in place
    bias = torch.randn(s.o, device=dev).to(dtype)
    res = None
    if s.epilogue == "bias_res_relu":
        res = torch.randn(n, s.o, s.out_hw, s.out_hw, device=dev).to(dtype)
        res = res.contiguous(memory_format=torch.channels_last)
    return x, w, bias, res


def torch_epilogue(s: ConvShape, x, w, bias, res):
    """The convolution and its epilogue as eager torch runs them (cuDNN, then elementwise)."""
    z = F.conv2d(x, w, bias, s.stride, s.pad)
    if res is not None:
        z = z + res
    return F.relu(z) if s.epilogue != "bias" else z


def _cudnn_benchmark(s: ConvShape, x, w, bias):
    """cuDNN's conv with ``torch.backends.cudnn.benchmark`` on: it times its algorithms on the
    first call of a shape (the harness's warm-up) and keeps the fastest."""
    prev = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        return F.conv2d(x, w, bias, s.stride, s.pad)
    finally:
        torch.backends.cudnn.benchmark = prev


def _case(s: ConvShape, n: int, on_gpu: bool) -> Case:
    dev = "cuda" if on_gpu else "cpu"
    dtype = torch.bfloat16 if on_gpu else torch.float16

    def make():
        x, w, bias, res = make_inputs(s, n, dev, dtype)
        act = None if s.epilogue == "bias" else "relu"

        def kernforge():
            with backend("triton"):
                return ops.conv2d(x, w, bias, s.stride, s.pad, activation=act, residual=res)

        impls = {
            "kernforge": kernforge,
            "torch": lambda: torch_epilogue(s, x, w, bias, res),
            "cudnn": lambda: F.conv2d(x, w, bias, s.stride, s.pad),
        }
        if on_gpu:
            impls["cudnn.benchmark"] = lambda: _cudnn_benchmark(s, x, w, bias)

        def check():
            ref = torch_epilogue(s, x.float(), w.float(), bias.float(),
                                 None if res is None else res.float())  # fmt: skip
            out = kernforge().float()
            return float((out - ref).norm() / ref.norm().clamp_min(1e-12))

        return impls, check

    outs = 2 if s.epilogue == "bias_res_relu" else 1  # the residual is read too
    nbytes = 2 * (n * s.c * s.h * s.h + s.o * s.c * s.k * s.k + n * s.o * s.out_hw**2 * outs)
    op = f"conv_{s.net}_x{s.count}_{s.epilogue}"
    shape = (n, s.c, s.h, s.h, s.o, s.k, s.stride)
    return Case(FAMILY, op, "fwd", shape, dtype, nbytes, make, flops=s.flops(n))


def cases(on_gpu: bool, quick: bool = False) -> list[Case]:
    """ResNet-50 then ResNet-18 convolutions at batch 64 (GPU), tiny shapes (CPU)."""
    if not on_gpu:
        return [_case(s, 2, False) for s in CPU_SHAPES]
    shapes = resnet50_convs()
    if quick:
        return [_case(s, BATCH, True) for s in shapes[:2]]
    return [_case(s, BATCH, True) for s in shapes + resnet18_convs()]


def _count(r: Result) -> int:
    return int(r.op.split("_x")[1].split("_")[0])


def bars(results: list[Result]) -> list[Bar]:
    """Sum over each network's convolutions (shape times count): cuDNN conv alone / ours, and
    (conv + eager epilogue) / ours."""
    out = []
    for net, name in (("rn50", "ResNet-50"), ("rn18", "ResNet-18")):
        rs = [r for r in results if r.op.startswith(f"conv_{net}_") and "kernforge" in r.ms]
        if not rs:
            continue
        ours = sum(r.ms["kernforge"] * _count(r) for r in rs)
        for ref, what in (("cudnn", "cuDNN conv alone"),
                          ("cudnn.benchmark", "cuDNN conv alone, benchmark mode"),
                          ("torch", "cuDNN conv + eager epilogue")):  # fmt: skip
            if all(ref in r.ms for r in rs):
                theirs = sum(r.ms[ref] * _count(r) for r in rs)
                label = (f"{name} conv list at batch 64: sum of times, {what} / ours "
                         f"({theirs:.3f} ms / {ours:.3f} ms)")  # fmt: skip
                out.append(Bar(label, theirs / ours, 1.0))
    return out
