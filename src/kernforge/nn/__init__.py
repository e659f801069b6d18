"""``torch.nn`` layers built on kernforge's catalog ops.

- :class:`MoE`: a Mixtral / Qwen-MoE style mixture-of-experts MLP (router, top-k routing,
  grouped expert GEMMs), its parameters named as Hugging Face transformers 5.x names them.
"""

from .moe import MoE, MoEExperts, experts_forward, torch_loop_moe

__all__ = ["MoE", "MoEExperts", "experts_forward", "torch_loop_moe"]
