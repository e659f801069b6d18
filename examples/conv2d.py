"""Convolution with a fused epilogue, and the pools: ``kernforge.ops.conv2d``,
``ops.max_pool2d``, ``ops.adaptive_avg_pool2d``.

    python examples/conv2d.py

Runs a ResNet bottleneck's last step, ``relu(bn(conv1x1(x)) + identity)``, as one kernel: the
BatchNorm is folded into the conv's weight and bias (as the model compiler does), the weight is
packed once into the layout the kernel reads in place, and the residual add and relu run in
the conv's epilogue (residual first, then the activation). Then a 3x3 conv, the stem's max pool
and the global average pool. Each result is checked against torch in fp32; on a GPU the fused
conv is timed (CUDA-graph replays) against cuDNN followed by eager add and relu. Without a GPU
the kernels run in Triton's CPU interpreter at small sizes (fp16 there; bf16 on the GPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernforge import ops
from kernforge.kernels.conv import pack_conv_weight

on_gpu = torch.cuda.is_available()
dev = "cuda" if on_gpu else "cpu"
dtype = torch.bfloat16 if on_gpu else torch.float16
N, C, O, H = (64, 256, 1024, 14) if on_gpu else (2, 32, 48, 7)


def cl(t: torch.Tensor) -> torch.Tensor:
    """NCHW-shaped tensor stored channels-last (NHWC): the kernels' fast layout."""
    return t.contiguous(memory_format=torch.channels_last)


x = cl(torch.randn(N, C, H, H, device=dev).to(dtype))
identity = cl(torch.randn(N, O, H, H, device=dev).to(dtype))
conv = torch.nn.Conv2d(C, O, 1, bias=False).to(dev)
bn = torch.nn.BatchNorm2d(O).to(dev).eval()
bn.running_mean.uniform_(-0.5, 0.5)
bn.running_var.uniform_(0.5, 2.0)

# Fold the inference BatchNorm: w' = w * gamma / sqrt(var + eps), b' = beta - mean * that scale.
scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
w_folded = pack_conv_weight((conv.weight * scale[:, None, None, None]).detach().to(dtype))
b_folded = (bn.bias - bn.running_mean * scale).detach().to(dtype)

with torch.no_grad():
    y = ops.conv2d(x, w_folded, b_folded, activation="relu", residual=identity)
    ref = F.relu(bn(conv(x.float())) + identity.float())
err = float((y.float() - ref).norm() / ref.norm())
nhwc = y.is_contiguous(memory_format=torch.channels_last)
print(f"relu(bn(conv1x1(x)) + identity): {tuple(y.shape)} {y.dtype}, channels-last {nhwc}, "
      f"rel. error vs fp32 {err:.1e}")  # fmt: skip

# A strided 3x3 conv with padding and silu; the stem's max pool; the global average pool.
w3 = pack_conv_weight((torch.randn(O, O, 3, 3, device=dev) * (9 * O) ** -0.5).to(dtype))
y3 = ops.conv2d(y, w3, stride=2, padding=1, activation="silu")
ref3 = F.silu(F.conv2d(y.float(), w3.float(), stride=2, padding=1))
print(f"silu(conv3x3 stride 2): {tuple(y3.shape)}, rel. error "
      f"{float((y3.float() - ref3).norm() / ref3.norm()):.1e}")  # fmt: skip
p = ops.max_pool2d(y, 3, 2, 1)
print(f"max_pool2d(3, 2, 1): {tuple(p.shape)}, max abs error "
      f"{float((p.float() - F.max_pool2d(y.float(), 3, 2, 1)).abs().max()):.1e}")  # fmt: skip
g = ops.adaptive_avg_pool2d(y, 1)
print(f"adaptive_avg_pool2d(1): {tuple(g.shape)}, max abs error "
      f"{float((g.float() - F.adaptive_avg_pool2d(y.float(), 1)).abs().max()):.1e}")  # fmt: skip

if on_gpu:
    from kernforge.bench.harness import time_graph

    # Timed as CUDA-graph replays (as a compiled model runs them): an eager call of either
    # costs more host time than this convolution takes on the GPU.
    stream = torch.cuda.Stream()

    def ours():
        return ops.conv2d(x, w_folded, b_folded, activation="relu", residual=identity)

    def eager():
        return F.relu(F.conv2d(x, w_folded, b_folded) + identity)

    flops = 2 * N * H * H * O * C
    for name, fn in (("kernforge (fused)", ours), ("cuDNN + eager add/relu", eager)):
        ms = time_graph(fn, stream)
        print(f"{name:24s} {ms * 1e3:7.1f} us  {flops / ms / 1e9:6.1f} TFLOP/s")
