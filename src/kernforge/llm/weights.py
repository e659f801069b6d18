"""The decoder's weights in the layout the runtime reads (:class:`DecoderWeights`).

Projections that read the same input are stored concatenated so one GEMV/GEMM reads them:
``qkv`` is ``[q; k; v]`` rows ([q_size + 2 * kv_size, hidden]) and ``gate_up`` holds the gate
and up rows interleaved ([2 * intermediate, hidden]: gate row j is row 2j, up row j is row
2j + 1), the layout ``ops.fused_linear(..., swiglu=True)`` takes: its decode GEMV lane that
computes gate j also computes up j and applies SwiGLU in the epilogue. Every matrix is
``nn.Linear``'s [out_features, in_features].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerWeights:
    """One decoder layer."""

    attn_norm: torch.Tensor  # [hidden]
    qkv: torch.Tensor  # [q_size + 2 * kv_size, hidden]
    qkv_bias: torch.Tensor | None  # [q_size + 2 * kv_size] (Qwen2) or None
    q_norm: torch.Tensor | None  # [head_dim] (Qwen3) or None
    k_norm: torch.Tensor | None  # [head_dim] (Qwen3) or None
    o: torch.Tensor  # [hidden, q_size]
    mlp_norm: torch.Tensor  # [hidden]
    gate_up: torch.Tensor  # [2 * intermediate, hidden], gate and up rows interleaved
    down: torch.Tensor  # [hidden, intermediate]


@dataclass
class DecoderWeights:
    """The whole model; ``lm_head`` is ``embed`` itself when the embeddings are tied."""

    embed: torch.Tensor  # [vocab, hidden]
    layers: list[LayerWeights]
    final_norm: torch.Tensor  # [hidden]
    lm_head: torch.Tensor  # [vocab, hidden]

    def nbytes(self) -> int:
        """Bytes of distinct weight storage (a tied head counted once)."""
        seen: set[int] = set()
        total = 0
        tensors = [self.embed, self.final_norm, self.lm_head]
        for layer in self.layers:
            tensors += [t for t in vars(layer).values() if t is not None]
        for t in tensors:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total
