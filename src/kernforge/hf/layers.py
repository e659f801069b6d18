"""The kernforge layer that transformers' gated MLPs (``LlamaMLP`` and its copies) become.

:class:`GatedMLP` is :class:`kernforge.nn.SwiGLUMLP` whose activation is read from the
transformers MLP's own ``act_fn`` (an architecture's MLP class serves every config, and
``hidden_act`` is per config): silu runs SwiGLU, the gelu variants GeGLU, anything else the
transformers forward unchanged.
"""

from __future__ import annotations

import torch

from ..nn import SwiGLUMLP
from ..nn.mlp import gated_mlp

#: transformers activation class names -> the GLU kernels' activation.
_ACTS = {
    "SiLUActivation": "silu",
    "SiLU": "silu",
    "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "NewGELUActivation": "gelu_tanh",
    "GELUActivation": "gelu_erf",
}


def activation_name(act: object) -> str | None:
    """The GLU kernels' name for an activation module (None: not a gated activation they
    compute)."""
    if isinstance(act, torch.nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu_erf"
    return _ACTS.get(type(act).__name__)


class GatedMLP(SwiGLUMLP):
    """A transformers gated MLP on :func:`kernforge.nn.mlp.gated_mlp` (x, gate and up saved,
    the activation recomputed in the backward); reads ``gate_proj``, ``up_proj``,
    ``down_proj`` and ``act_fn`` only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``down_proj(act_fn(gate_proj(x)) * up_proj(x))``."""
        act = activation_name(getattr(self, "act_fn", None))
        if act is None:
            # Not a gated activation kernforge has: the transformers class's own forward.
            from .patching import original_class

            return original_class(type(self)).forward(self, x)
        return gated_mlp(x, self.gate_proj, self.up_proj, self.down_proj, act)
