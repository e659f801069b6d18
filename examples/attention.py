"""Flash attention with kernforge: dense (causal, GQA, sliding window, softcap) and packed
variable-length batches, forward and backward, checked against the torch reference.

    python examples/attention.py

On a GPU this runs the Triton kernels in bf16; without one, the same kernels run through
Triton's CPU interpreter on small shapes.
"""

from __future__ import annotations

import torch

import kernforge
from kernforge import ops

gpu = torch.cuda.is_available()
dev, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float16)
b, s, hq, hk, d = (2, 1024, 16, 4, 128) if gpu else (2, 40, 4, 2, 64)


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).norm() / ref.float().norm()).item()


# Dense, [batch, seq, heads, head_dim] (the FlashAttention layout); 4 q heads share each kv head.
q = torch.randn(b, s, hq, d, device=dev, dtype=dtype, requires_grad=True)
k = torch.randn(b, s, hk, d, device=dev, dtype=dtype, requires_grad=True)
v = torch.randn(b, s, hk, d, device=dev, dtype=dtype, requires_grad=True)
for kw in ({"causal": True}, {"causal": True, "window": 16}, {"softcap": 30.0}):
    out, lse = ops.fmha(q, k, v, return_lse=True, **kw)
    g = torch.randn_like(out)  # a random upstream gradient
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
    with kernforge.backend("torch"):  # the fp32 math reference
        ref = ops.fmha(q, k, v, **kw)
        rq, rk, rv = torch.autograd.grad(ref, (q, k, v), g)
    print(
        f"fmha {kw}: out {tuple(out.shape)} lse {tuple(lse.shape)}; rel err out "
        f"{rel(out, ref):.1e} dq {rel(dq, rq):.1e} dk {rel(dk, rk):.1e} dv {rel(dv, rv):.1e}"
    )

# [batch, heads, seq, head_dim] works the same (layout="bhsd"), e.g. straight from SDPA code.
out = ops.fmha(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
               layout="bhsd")  # fmt: skip
print(f"fmha bhsd: out {tuple(out.shape)}")

# Packed sequences of different lengths (an empty one too): no padding.
lens = [s // 2, 1, 0, s]
cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=dev)
qp = torch.randn(sum(lens), hq, d, device=dev, dtype=dtype, requires_grad=True)
kp = torch.randn(sum(lens), hk, d, device=dev, dtype=dtype)
vp = torch.randn(sum(lens), hk, d, device=dev, dtype=dtype)
out = ops.fmha_varlen(qp, kp, vp, cu, cu, max(lens), max(lens), causal=True)
out.float().square().sum().backward()
with kernforge.backend("torch"):
    ref = ops.fmha_varlen(qp, kp, vp, cu, cu, max(lens), max(lens), causal=True)
print(
    f"fmha_varlen lengths {lens}: out {tuple(out.shape)}, rel err {rel(out, ref):.1e}, "
    f"dq {tuple(qp.grad.shape)}"
)
