"""Language-model losses: ops.cross_entropy on logits, and ops.fused_linear_cross_entropy
straight from the last hidden states (the [tokens, vocab] logits are never held), with
ignore_index padding, label smoothing and z-loss; checked against torch.

    python examples/losses.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernforge import ops
from kernforge.nn import CrossEntropyLoss, FusedLinearCrossEntropy

dev = "cuda" if torch.cuda.is_available() else "cpu"
# bf16 on the GPU; the CPU interpreter runs the same kernels at small sizes (fp32 here).
dtype = torch.bfloat16 if dev == "cuda" else torch.float32
batch, seq, hidden, vocab = (4, 2048, 2048, 128256) if dev == "cuda" else (2, 16, 64, 5003)

torch.manual_seed(0)
h = torch.randn(batch, seq, hidden, device=dev, dtype=dtype, requires_grad=True)
lm_head = torch.nn.Linear(hidden, vocab, bias=False, device=dev, dtype=dtype)
labels = torch.randint(0, vocab, (batch, seq), device=dev)
labels[0, seq // 2 :] = -100  # padding: ignored

# Next-token prediction: position i predicts labels[i + 1].
h_shift = h[:, :-1].reshape(-1, hidden)
y_shift = labels[:, 1:].reshape(-1)

# 1. Unfused: logits, then kernforge's cross-entropy (no fp32 copy of the logits is made).
logits = lm_head(h_shift)
loss = ops.cross_entropy(logits, y_shift)  # fp32, mean over the non-ignored targets
want = F.cross_entropy(logits.float(), y_shift)
print(f"cross_entropy {loss.item():.6f}  torch {want.item():.6f}")

# Options: label smoothing, PaLM z-loss (z * logsumexp**2 per token), reductions.
per_token = ops.cross_entropy(logits, y_shift, label_smoothing=0.1, z_loss=1e-4,
                              reduction="none")  # fmt: skip
print(f"per-token losses {tuple(per_token.shape)}, ignored rows are 0: "
      f"{bool((per_token[y_shift == -100] == 0).all())}")  # fmt: skip

# 2. Fused: the lm_head GEMM and the loss together, chunk by chunk; gradients for the hidden
# states and the lm_head weight are computed during the forward.
fused = FusedLinearCrossEntropy()  # or ops.fused_linear_cross_entropy(h, w, y, ...)
loss_fused = fused(h_shift, lm_head.weight, y_shift)
loss_fused.backward()
print(
    f"fused_linear_cross_entropy {loss_fused.item():.6f}; "
    f"|dh| {h.grad.norm().item():.4g}, |dW| {lm_head.weight.grad.norm().item():.4g}"
)

# The same gradients through the unfused path.
gh, gw = torch.autograd.grad(F.cross_entropy(lm_head(h_shift).float(), y_shift),
                             [h, lm_head.weight])  # fmt: skip
for name, got, ref in (("dh", h.grad, gh), ("dW", lm_head.weight.grad, gw)):
    err = ((got.double() - ref.double()).norm() / ref.double().norm()).item()
    print(f"{name}: relative difference to the unfused path {err:.1e}")

# The loss module with the classes last (no transpose for [batch, seq, vocab] logits).
ce = CrossEntropyLoss(ignore_index=-100, z_loss=1e-4)
print(f"CrossEntropyLoss on [B, S, V]: {ce(lm_head(h[:, :-1]), labels[:, 1:]).item():.6f}")
