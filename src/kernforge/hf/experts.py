"""kernforge's grouped-GEMM experts as a transformers 5.x experts implementation.

transformers' MoE blocks (Mixtral, Qwen2-MoE, Qwen3-MoE) route tokens with their own router,
then call ``experts(hidden_states, top_k_index, top_k_weights)``; the experts module
dispatches that call through ``transformers.integrations.moe.ExpertsInterface`` by
``config._experts_implementation``. :func:`register` adds ``"kernforge"`` there, running
:func:`kernforge.nn.experts_forward` (permute, two grouped GEMMs with the fused gated
activation, weighted unpermute). The router, its logits (for the load-balancing loss) and
Qwen2-MoE's shared expert stay transformers' own, so routing is exactly transformers'.
"""

from __future__ import annotations

import inspect

import torch

from ..checks import trusted_indices
from ..nn.moe import ACTIVATIONS, experts_forward

#: The name under which kernforge registers with transformers' experts interface.
NAME = "kernforge"


def activation_of(config) -> str | None:
    """kernforge's activation name for a config's ``hidden_act`` (None: not supported)."""
    act = getattr(config, "hidden_act", "silu")
    act = "silu" if act == "swish" else act
    return act if act in ACTIVATIONS else None


def supports(experts: torch.nn.Module) -> bool:
    """Whether :func:`kernforge_experts_forward` computes what this experts module computes:
    concatenated [gate; up] weights in ``nn.Linear`` layout, a gated activation kernforge has."""
    return (
        getattr(experts, "has_gate", True)
        and not getattr(experts, "is_transposed", False)
        and getattr(experts, "is_concatenated", True)
        and isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor)
        and isinstance(getattr(experts, "down_proj", None), torch.Tensor)
        and activation_of(getattr(experts, "config", None)) is not None
    )


def kernforge_experts_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """transformers' experts signature on :func:`kernforge.nn.experts_forward`: tokens
    hidden_states [T, H], the router's choices top_k_index [T, k] and weights [T, k] ->
    [T, H] in hidden_states' dtype. Differentiable in hidden_states, the expert weights and
    top_k_weights (so the router trains). Layouts kernforge does not take run transformers'
    eager loop."""
    if not supports(self):
        eager = inspect.unwrap(type(self).forward)
        return eager(self, hidden_states, top_k_index, top_k_weights)
    bias = getattr(self, "has_bias", False)
    # The router's top-k ids are in range by construction: skip the bounds check (a sync).
    with trusted_indices():
        return experts_forward(
            hidden_states,
            top_k_weights,
            top_k_index,
            self.gate_up_proj,
            self.down_proj,
            activation_of(self.config),
            getattr(self, "gate_up_proj_bias", None) if bias else None,
            getattr(self, "down_proj_bias", None) if bias else None,
        )


def register() -> None:
    """Register ``"kernforge"`` with transformers' experts interface (idempotent)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(NAME, kernforge_experts_forward)
