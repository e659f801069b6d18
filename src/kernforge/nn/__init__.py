"""``torch.nn`` layers built on kernforge's catalog ops.

- :class:`MoE`: a Mixtral / Qwen-MoE style mixture-of-experts MLP (router, top-k routing,
  grouped expert GEMMs), its parameters named as Hugging Face transformers 5.x names them.
- :class:`RMSNorm`, :class:`LayerNorm`: Hugging Face's ``LlamaRMSNorm`` and
  ``torch.nn.LayerNorm`` (same attributes and state dicts) on ``ops.rms_norm``/``layer_norm``.
- :class:`RotaryEmbedding`, :func:`apply_rotary_pos_emb`: Hugging Face's rotary cos/sin tables
  and its ``apply_rotary_pos_emb`` on ``ops.rope``.
- :class:`SwiGLUMLP`, :class:`GeGLUMLP`: ``LlamaMLP`` as one autograd function that saves x,
  gate and up and recomputes the activation in the backward.
- :class:`Attention`: GQA self-attention (optional qk-norm) on ``ops.rope`` and ``ops.fmha``.
- :class:`CrossEntropyLoss`, :class:`FusedLinearCrossEntropy`: losses on ``ops.cross_entropy``
  and ``ops.fused_linear_cross_entropy`` (docs/losses.md).
See docs/nn.md.
"""

from .attention import Attention
from .losses import CrossEntropyLoss, FusedLinearCrossEntropy
from .mlp import GatedMLPFunction, GeGLUMLP, SwiGLUMLP, gated_mlp
from .moe import MoE, MoEExperts, experts_forward, torch_loop_moe
from .norms import LayerNorm, RMSNorm
from .rotary import RotaryEmbedding, apply_rotary_pos_emb

__all__ = ["MoE", "MoEExperts", "experts_forward", "torch_loop_moe"]
__all__ += [
    "Attention", "GatedMLPFunction", "GeGLUMLP", "LayerNorm", "RMSNorm", "RotaryEmbedding",
    "SwiGLUMLP", "apply_rotary_pos_emb", "gated_mlp",
]  # fmt: skip
__all__ += ["CrossEntropyLoss", "FusedLinearCrossEntropy"]
