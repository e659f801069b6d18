"""A Mixtral-style mixture-of-experts layer with kernforge.nn.MoE: forward, a load-balancing
auxiliary loss from the router logits, backward, and a check against the naive torch loop
(Hugging Face's eager experts). Then the building blocks one by one.

    python examples/moe_layer.py
"""

from __future__ import annotations

import torch

import kernforge
from kernforge import ops
from kernforge.nn import MoE, torch_loop_moe

dev = "cuda" if torch.cuda.is_available() else "cpu"
# bf16 on the GPU; the CPU interpreter runs the same kernels at small sizes.
dtype = torch.bfloat16 if dev == "cuda" else torch.float16
hidden, inter, experts, top_k = (1024, 2816, 8, 2) if dev == "cuda" else (64, 96, 8, 2)

torch.manual_seed(0)
moe = MoE(hidden, inter, experts, top_k, dtype=dtype, device=dev)
x = torch.randn(2, 16, hidden, device=dev, dtype=dtype, requires_grad=True)

y, logits = moe(x, return_router_logits=True)  # y: [2, 16, hidden]; logits: [32, experts]

# Switch-Transformer load balancing: fraction of tokens per expert x mean router probability.
probs = torch.softmax(logits.float(), -1)
_, ids = ops.moe_route(logits, top_k)
load = torch.zeros(experts, device=dev).index_add_(0, ids.flatten().long(),
                                                   torch.ones(ids.numel(), device=dev))  # fmt: skip
aux = experts * (load / ids.numel() * probs.mean(0)).sum()
loss = y.float().pow(2).mean() + 0.01 * aux
loss.backward()
print(f"device {dev}, dtype {dtype}: y {tuple(y.shape)}, aux loss {aux.item():.3f}, "
      f"|d gate_up| {moe.experts.gate_up_proj.grad.norm().item():.3g}")  # fmt: skip

# The same computation as Hugging Face's eager loop over experts, in float64.
e = moe.experts
ref = torch_loop_moe(x.double(), moe.gate.weight.double(), e.gate_up_proj.double(),
                     e.down_proj.double(), top_k)  # fmt: skip
err = ((y.double() - ref).norm() / ref.norm()).item()
print(f"kernforge.nn.MoE vs torch loop (float64): relative error {err:.1e}")

# The building blocks: route, sort rows by expert, (experts), weighted scatter back.
x2 = x.detach().reshape(-1, hidden)
weights, ids = ops.moe_route(logits.detach(), top_k)  # [T, k] fp32, [T, k] int32
x_sorted, group_sizes, order = ops.moe_permute(x2, ids, experts)
print(f"tokens per expert: {group_sizes.tolist()}")
back = ops.moe_unpermute(x_sorted, order, weights)  # identity experts: weights sum to 1
print(f"unpermute(permute(x)) == x: {torch.allclose(back.float(), x2.float(), atol=1e-2)}")
print(f"backend: {kernforge.get_backend()}; the layer's parameters: {list(moe.state_dict())}")
