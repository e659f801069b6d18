"""``kernforge.nn.MoE``: a mixture-of-experts MLP (Mixtral, Qwen-MoE) on kernforge's ops.

Forward, for tokens x [T, H]::

    logits = x @ gate.weight.T                           # router, [T, E]
    weights, ids = ops.moe_route(logits, top_k, ...)     # [T, k] fp32, [T, k] int32
    xs, group_sizes, order = ops.moe_permute(x, ids, E)  # rows sorted by expert, [T*k, H]
    h = ops.grouped_gemm(xs, experts.gate_up_proj, group_sizes)  # [T*k, 2I]: gate | up
    a = ops.silu_and_mul(h)                              # silu(gate) * up, [T*k, I]
    o = ops.grouped_gemm(a, experts.down_proj, group_sizes)  # [T*k, H]
    y = ops.moe_unpermute(o, order, weights)             # sum_j w[t, j] * o[row of (t, j)]

Every step is differentiable, so the layer trains (router weight included, through the
routing weights). Parameter names and layouts are those of Hugging Face transformers 5.x
(``MixtralSparseMoeBlock`` / ``Qwen2MoeSparseMoeBlock``; see :class:`MoE`), so their state
dicts load as they are.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..checks import trusted_indices
from ..errors import ArgumentError, ShapeError

#: Activations of the expert MLP: name -> (op, geglu's ``approximate`` or None for silu).
#: "gelu" is exact (erf) as in Hugging Face's ACT2FN; "gelu_pytorch_tanh" is its tanh name.
ACTIVATIONS: dict[str, str | None] = {
    "silu": None,
    "gelu": "none",
    "gelu_tanh": "tanh",
    "gelu_pytorch_tanh": "tanh",
}


def _activate(h: torch.Tensor, activation: str) -> torch.Tensor:
    """``act(gate) * up`` of the fused [rows, 2I] gate|up projection."""
    approximate = ACTIVATIONS[activation]
    if approximate is None:
        return ops.silu_and_mul(h)
    d = h.shape[-1] // 2
    return ops.geglu(h[:, :d], h[:, d:], approximate=approximate)


def experts_forward(
    x: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    activation: str = "silu",
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The routed expert MLPs of tokens x [T, H] (permute, two grouped GEMMs with the gated
    activation between, weighted unpermute) -> y [T, H] in x's dtype.

    weights [T, k] and ids [T, k] as :func:`kernforge.ops.moe_route` returns them (any ids in
    [0, E) work: the same contract as Hugging Face's ``experts(hidden_states, top_k_index,
    top_k_weights)``); gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I].
    """
    if activation not in ACTIVATIONS:
        raise ArgumentError(
            f"experts_forward: activation={activation!r}; use one of {', '.join(ACTIVATIONS)}"
        )
    e = gate_up_proj.shape[0]
    xs, group_sizes, order = ops.moe_permute(x, ids, e)
    h = ops.grouped_gemm(xs, gate_up_proj, group_sizes, gate_up_bias)
    o = ops.grouped_gemm(_activate(h, activation), down_proj, group_sizes, down_bias)
    return ops.moe_unpermute(o, order, weights)


class MoEExperts(nn.Module):
    """The experts' weights, stacked: ``gate_up_proj`` [E, 2I, H] (each expert's gate rows
    then its up rows, ``nn.Linear`` layout) and ``down_proj`` [E, H, I]; with ``bias``, also
    ``gate_up_proj_bias`` [E, 2I] and ``down_proj_bias`` [E, H]."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, bias: bool = False,
                 dtype: torch.dtype | None = None, device=None) -> None:  # fmt: skip
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden, intermediate
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden, **kw))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate, **kw))
        if bias:
            self.gate_up_proj_bias = nn.Parameter(torch.empty(num_experts, 2 * intermediate, **kw))
            self.down_proj_bias = nn.Parameter(torch.empty(num_experts, hidden, **kw))
        else:
            self.register_parameter("gate_up_proj_bias", None)
            self.register_parameter("down_proj_bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s default: uniform in +-1/sqrt(fan_in), per expert."""
        for w, b in ((self.gate_up_proj, self.gate_up_proj_bias),
                     (self.down_proj, self.down_proj_bias)):  # fmt: skip
            bound = 1.0 / math.sqrt(max(w.shape[-1], 1))
            nn.init.uniform_(w, -bound, bound)
            if b is not None:
                nn.init.uniform_(b, -bound, bound)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, hidden={self.hidden_dim}, "
            f"intermediate={self.intermediate_dim}, bias={self.gate_up_proj_bias is not None}"
        )


class MoE(nn.Module):
    """A mixture-of-experts MLP: router, top-k routing, ``num_experts`` gated MLPs.

    ``MoE(hidden, intermediate, num_experts, top_k, scoring="softmax" | "sigmoid",
    renormalize=True, activation="silu" | "gelu" | "gelu_tanh", bias=False)``.
    ``forward(x [..., hidden], return_router_logits=False)`` returns y of x's shape and dtype,
    and with ``return_router_logits`` also the router logits [tokens, E] (for auxiliary
    load-balancing losses).

    Parameters, as Hugging Face transformers 5.x names them in ``MixtralSparseMoeBlock`` and
    ``Qwen2MoeSparseMoeBlock`` (so ``load_state_dict(hf_block.state_dict())`` works; Qwen2-MoE's
    shared expert is not part of this layer, load with ``strict=False``):

    - ``gate.weight`` [E, hidden]: the router (``nn.Linear``, no bias).
    - ``experts.gate_up_proj`` [E, 2*intermediate, hidden]: per expert, gate then up rows.
    - ``experts.down_proj`` [E, hidden, intermediate].
    - with ``bias=True``: ``experts.gate_up_proj_bias`` [E, 2*intermediate] and
      ``experts.down_proj_bias`` [E, hidden] (GPT-OSS's names).

    Mixtral's config maps to ``scoring="softmax", renormalize=True``; Qwen2-MoE's to
    ``renormalize=config.norm_topk_prob``; ``hidden_act`` to ``activation``.
    """

    def __init__(
        self,
        hidden: int,
        intermediate: int,
        num_experts: int,
        top_k: int,
        scoring: str = "softmax",
        renormalize: bool = True,
        activation: str = "silu",
        bias: bool = False,
        dtype: torch.dtype | None = None,
        device=None,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ArgumentError(f"MoE: top_k={top_k} must be in [1, num_experts={num_experts}]")
        if scoring not in ("softmax", "sigmoid"):
            raise ArgumentError(f"MoE: scoring={scoring!r}; use 'softmax' or 'sigmoid'")
        if activation not in ACTIVATIONS:
            raise ArgumentError(
                f"MoE: activation={activation!r}; use one of {', '.join(ACTIVATIONS)}"
            )
        self.hidden, self.intermediate = hidden, intermediate
        self.num_experts, self.top_k = num_experts, top_k
        self.scoring, self.renormalize, self.activation = scoring, renormalize, activation
        self.gate = nn.Linear(hidden, num_experts, bias=False, dtype=dtype, device=device)
        self.experts = MoEExperts(num_experts, hidden, intermediate, bias, dtype, device)

    def forward(
        self, x: torch.Tensor, return_router_logits: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """y = the routed expert MLPs of x [..., hidden]; optionally also the router logits."""
        if x.shape[-1] != self.hidden:
            raise ShapeError(
                f"MoE: x has {x.shape[-1]} features in its last dimension, expected "
                f"hidden={self.hidden} (x shape {tuple(x.shape)})"
            )
        x2 = x.reshape(-1, self.hidden)
        logits = self.gate(x2)
        weights, ids = ops.moe_route(logits, self.top_k, self.scoring, self.renormalize)
        # ids and order come from moe_route and moe_permute: in range by construction, so the
        # KERNFORGE_CHECK_INDICES check (a device sync, no CUDA graphs) is skipped.
        with trusted_indices():
            e = self.experts
            y = experts_forward(x2, weights, ids, e.gate_up_proj, e.down_proj, self.activation,
                                e.gate_up_proj_bias, e.down_proj_bias)  # fmt: skip
        y = y.reshape(x.shape)
        return (y, logits) if return_router_logits else y

    def extra_repr(self) -> str:
        return (
            f"hidden={self.hidden}, intermediate={self.intermediate}, "
            f"num_experts={self.num_experts}, top_k={self.top_k}, scoring={self.scoring!r}, "
            f"renormalize={self.renormalize}, activation={self.activation!r}"
        )


def torch_loop_moe(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    top_k: int,
    scoring: str = "softmax",
    renormalize: bool = True,
    activation: str = "silu",
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """The naive reference: Hugging Face's eager MoE (``MixtralExperts.forward``): for each
    expert that got tokens, gather them (``torch.where``), run its MLP, weight, ``index_add_``
    into the output. Used by the tests and as the benchmark's ``torch_loop``.

    Routing is in fp32 as Hugging Face's; the top k are taken by a stable sort (ties to the
    lower expert index, as :func:`kernforge.ops.moe_route`) where HF calls ``torch.topk``,
    which differs only at exact ties. ``logits`` [T, E], when given, replaces the router's
    ``x @ gate_weight.T`` (a float32 reference can then route exactly as a bf16 layer did).
    """
    x2 = x.reshape(-1, x.shape[-1])
    if logits is None:
        logits = F.linear(x2, gate_weight)
    lf = logits.double() if logits.dtype == torch.float64 else logits.float()
    scores = torch.sigmoid(lf) if scoring == "sigmoid" else torch.softmax(lf, dim=-1)
    ids = torch.sort(scores.detach(), dim=-1, descending=True, stable=True).indices[:, :top_k]
    w = scores.gather(1, ids)
    if renormalize:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    approximate = ACTIVATIONS[activation]
    out = torch.zeros_like(x2)
    num_experts = gate_up_proj.shape[0]
    with torch.no_grad():
        mask = F.one_hot(ids, num_classes=num_experts).permute(2, 1, 0)  # [E, k, T]
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    for e in hit:
        e = int(e[0])
        pos, tok = torch.where(mask[e])
        b1 = None if gate_up_bias is None else gate_up_bias[e]
        gate, up = F.linear(x2[tok], gate_up_proj[e], b1).chunk(2, dim=-1)
        act = F.silu(gate) if approximate is None else F.gelu(gate, approximate=approximate)
        b2 = None if down_bias is None else down_bias[e]
        h = F.linear(act * up, down_proj[e], b2)
        h = h * w[tok, pos, None]
        out.index_add_(0, tok, h.to(out.dtype))
    return out.reshape(x.shape)
