"""Gated MLPs (``SwiGLUMLP``, ``GeGLUMLP``): Hugging Face's ``LlamaMLP`` as one autograd
function that keeps less for the backward.

``y = down_proj(act(gate_proj(x)) * up_proj(x))``. Eager torch (and Liger-Kernel) keep the
activation ``act(gate) * up`` alive from the forward to the backward for down_proj's weight
gradient; eager also keeps ``act(gate)``. :class:`GatedMLPFunction` keeps only x, gate and up
(plus the weights) and recomputes ``act(gate) * up`` in the backward with the fused GLU kernel
(``kernforge::glu_fwd``): per layer that is one or two [tokens, intermediate] tensors less held
through the whole forward and backward, for one extra elementwise pass. The backward::

    a = act(gate) * up                  # recomputed, one fused pass
    dW_down = dy^T a ; db_down = sum(dy)
    da = dy W_down
    dgate, dup = glu_bwd(da, gate, up)  # one fused pass (eager: dgate written over da)
    dx = dgate W_gate + dup W_up        # a GEMM, then one accumulating GEMM (addmm)
    dW_gate = dgate^T x ; dW_up = dup^T x

The forward reads only ``gate_proj``, ``up_proj`` and ``down_proj`` (the submodules an HF
``LlamaMLP`` has), so a Hugging Face MLP can be switched over by assigning ``__class__``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import checks
from ..dispatch import select
from ..errors import ArgumentError, ShapeError
from ..kernels import glu as glu_kernels
from ..kernels.common import op_call
from ..kernels.glu import glu_bwd, glu_fwd

#: GeGLU's ``approximate`` -> the activation name of the GLU kernels.
_GELU = {"tanh": "gelu_tanh", "none": "gelu_erf"}
#: The activations of :func:`gated_mlp`.
_ACTIVATIONS = ("silu", "gelu_tanh", "gelu_erf")


class GatedMLPFunction(torch.autograd.Function):
    """``down(act(gate(x)) * up(x))`` for x [T, H] (Linear weights and optional biases), saving
    x, gate and up only; ``act`` is a GLU kernel activation ("silu", "gelu_tanh", "gelu_erf")."""

    @staticmethod
    def forward(ctx, x, w_gate, b_gate, w_up, b_up, w_down, b_down, act):
        gate = F.linear(x, w_gate, b_gate)
        up = F.linear(x, w_up, b_up)
        y = F.linear(op_call(glu_fwd, gate, up, act), w_down, b_down)
        ctx.save_for_backward(x, gate, up, w_gate, w_up, w_down)
        ctx.act = act
        return y

    @staticmethod
    def backward(ctx, dy):
        x, gate, up, w_gate, w_up, w_down = ctx.saved_tensors
        need = ctx.needs_input_grad
        dw_down = db_down = dx = dw_gate = db_gate = dw_up = db_up = None
        if need[5]:
            a = op_call(glu_fwd, gate, up, ctx.act)  # recomputed instead of saved
            dw_down = torch.mm(dy.t(), a)
            del a  # freed before the [T, I] gradients below are allocated
        if need[6]:
            db_down = dy.sum(0)
        if any(need[:5]):
            dgate, dup = _glu_backward(torch.mm(dy, w_down), gate, up, ctx.act)
            # dgate's uses first, so that it is freed before dW_up is allocated.
            if need[1]:
                dw_gate = torch.mm(dgate.t(), x)
            if need[2]:
                db_gate = dgate.sum(0)
            if need[0]:
                dx = torch.mm(dgate, w_gate)
            del dgate
            if need[0]:
                dx.addmm_(dup, w_up)  # accumulate in place: no second [T, H] buffer
            if need[3]:
                dw_up = torch.mm(dup.t(), x)
            if need[4]:
                db_up = dup.sum(0)
        return dx, dw_gate, db_gate, dw_up, db_up, dw_down, db_down, None


def _glu_backward(da, gate, up, act):
    """``(dgate, dup)`` of ``act(gate) * up`` given the product's gradient ``da`` [T, I].

    Eager calls write dgate over da (each element is read before it is written, in the same
    program; da is this backward's own temporary), so the backward holds one [T, I] buffer
    less at its peak. Traced code calls the functional custom op (Inductor plans buffers)."""
    if torch.compiler.is_compiling():
        return glu_bwd(da, gate, up, act)
    dup = torch.empty_like(up)
    if da.numel():
        glu_kernels._bwd(da, gate, up, da, dup, act)
    return da, dup


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype F.linear would compute in: autocast's where it is on, else x's."""
    dev = x.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def gated_mlp(
    x: torch.Tensor,
    gate_proj: nn.Linear,
    up_proj: nn.Linear,
    down_proj: nn.Linear,
    activation: str = "silu",
) -> torch.Tensor:
    """``down_proj(act(gate_proj(x)) * up_proj(x))`` for x [..., hidden], with ``activation``
    "silu" (SwiGLU), "gelu_tanh" or "gelu_erf" (GeGLU).

    Runs :class:`GatedMLPFunction` (x, gate and up saved; the activation recomputed in the
    backward) when dispatch picks the Triton GLU kernels for these inputs, else eager torch
    (the torch backend, float64, a device Triton cannot run on: with dispatch's fallback
    warning). Computes in x's dtype (autocast's under autocast); the output has x's leading
    shape and down_proj's out_features.
    """
    op = "gated_mlp"
    if activation not in _ACTIVATIONS:
        raise ArgumentError(
            f"{op}: activation={activation!r}; use one of {', '.join(_ACTIVATIONS)}"
        )
    checks.tensor(op, "x", x)
    checks.floating(op, "x", x)
    hidden = gate_proj.weight.shape[1]
    if x.shape[-1] != hidden:
        raise ShapeError(
            f"{op}: x has shape {tuple(x.shape)}; its last dimension must be the MLP's hidden "
            f"size {hidden} (gate_proj.weight is {tuple(gate_proj.weight.shape)})"
        )
    inter = gate_proj.weight.shape[0]
    if up_proj.weight.shape != gate_proj.weight.shape or down_proj.weight.shape[1] != inter:
        raise ShapeError(
            f"{op}: gate_proj {tuple(gate_proj.weight.shape)}, up_proj "
            f"{tuple(up_proj.weight.shape)} and down_proj {tuple(down_proj.weight.shape)} do not "
            "form a gated MLP ([I, H], [I, H], [H_out, I] weights)"
        )
    dt = _compute_dtype(x)
    layers = (gate_proj, up_proj, down_proj)
    params = [p if p is None else p.to(dt) for m in layers for p in (m.weight, m.bias)]
    x2 = x.to(dt).reshape(-1, hidden)
    kind = "swiglu" if activation == "silu" else "geglu"
    args = {"gate": x2, "up": x2}  # the kernels' support depends on dtype and device only
    if kind == "geglu":
        args["approximate"] = "tanh" if activation == "gelu_tanh" else "none"
    if select(kind, args).backend == "triton":
        y = GatedMLPFunction.apply(x2, *params, activation)
    else:
        wg, bg, wu, bu, wd, bd = params
        gate, up = F.linear(x2, wg, bg), F.linear(x2, wu, bu)
        if activation == "silu":
            h = F.silu(gate)
        else:
            h = F.gelu(gate, approximate="tanh" if activation == "gelu_tanh" else "none")
        y = F.linear(h * up, wd, bd)
    return y.reshape(*x.shape[:-1], y.shape[-1])


class _GatedMLP(nn.Module):
    """``gate_proj``, ``up_proj`` [intermediate, hidden] and ``down_proj`` [hidden,
    intermediate] ``nn.Linear`` layers, as Hugging Face's ``LlamaMLP``."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False,
                 device=None, dtype=None) -> None:  # fmt: skip
        super().__init__()
        for name, v in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size)):
            if not isinstance(v, int) or v < 1:
                raise ArgumentError(f"{type(self).__name__}: {name}={v!r}; use a positive int")
        kw = {"bias": bias, "device": device, "dtype": dtype}
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, **kw)

    def _activation(self) -> str:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``down_proj(act(gate_proj(x)) * up_proj(x))`` (see :func:`gated_mlp`)."""
        return gated_mlp(x, self.gate_proj, self.up_proj, self.down_proj, self._activation())


class SwiGLUMLP(_GatedMLP):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))``: Hugging Face's ``LlamaMLP`` (Mistral,
    Qwen2, Qwen3 MLPs too) with ``hidden_act="silu"``.

    ``SwiGLUMLP(hidden_size, intermediate_size, bias=False)``; state dict
    ``gate_proj.weight``, ``up_proj.weight``, ``down_proj.weight`` (+ ``.bias`` each with
    ``bias=True``, HF's ``mlp_bias``). Saves x, gate and up for the backward (see the module
    docs). A Hugging Face MLP's own ``act_fn`` is ignored after a class swap: swap only MLPs
    whose activation is silu.
    """

    def _activation(self) -> str:
        return "silu"


class GeGLUMLP(_GatedMLP):
    """``down_proj(gelu(gate_proj(x)) * up_proj(x))`` (Gemma's MLP): ``approximate="tanh"``
    (``gelu_pytorch_tanh``) or ``"none"`` (exact erf, ``gelu``). Same submodules and state
    dict as :class:`SwiGLUMLP`.

    After a class swap of a Hugging Face MLP (which has no ``approximate``), the variant is
    read from its ``act_fn``: ``GELUActivation`` or ``nn.GELU()`` is exact, anything else tanh.
    """

    approximate: str | None = None  # None: read from act_fn (a swapped Hugging Face MLP)

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False,
                 approximate: str = "tanh", device=None, dtype=None) -> None:  # fmt: skip
        if approximate not in _GELU:
            raise ArgumentError(f"GeGLUMLP: approximate={approximate!r}; use 'tanh' or 'none'")
        super().__init__(hidden_size, intermediate_size, bias, device=device, dtype=dtype)
        self.approximate = approximate

    def _activation(self) -> str:
        approx = self.approximate
        if approx is None:
            act = getattr(self, "act_fn", None)
            exact = type(act).__name__ == "GELUActivation" or (
                isinstance(act, nn.GELU) and act.approximate == "none"
            )
            approx = "none" if exact else "tanh"
        return _GELU[approx]

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"
