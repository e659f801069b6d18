"""The function library usable inside expressions.

Two kinds of entries:

- :data:`FUNCTIONS`, primitives: each has a derivative rule, a torch implementation (the
  reference), and a Triton and a CUDA C++ spelling.
- :data:`MACROS`, snippets written in the expression language itself over the primitives
  (``silu(x) = x * sigmoid(x)``); calls expand when parsed, so derivatives and code come from
  the primitives.

All math is in fp32 in the kernels (fp64 on the torch backend for fp64 inputs).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .tree import ONE, ZERO, Node, Num, div, mul, neg, op, sub, where

#: ``partials(args, self) -> (d self / d arg_i for each arg)``; ``self`` is the call's node,
#: so a rule can reuse the value (exp' = exp).
Partials = Callable[[tuple[Node, ...], Node], tuple[Node, ...]]


@dataclass(frozen=True)
class Function:
    """A primitive function of the expression language."""

    name: str
    arity: int
    doc: str
    partials: Partials
    torch: Callable[..., torch.Tensor]
    triton: str  # format string over the argument spellings {0}, {1}
    cuda: str
    fold: Callable[..., float | None]  # the value on constant arguments (None: do not fold)


def _f(a: float) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float64)


def _fold_torch(fn: Callable[..., torch.Tensor]) -> Callable[..., float | None]:
    def fold(*vals: float) -> float | None:
        return float(fn(*(_f(v) for v in vals)))

    return fold


def _call(name: str) -> Callable[..., Node]:
    return lambda *args: op(name, *args)


def _gt0(x: Node) -> Node:
    return op("gt", x, ZERO)


_SQRT_2_OVER_PI = 0.7978845608028654
_TWO_OVER_SQRT_PI = 1.1283791670955126

_PRIMITIVES: list[Function] = []


def _prim(name, arity, doc, partials, torch_fn, triton, cuda, fold=None) -> None:
    _PRIMITIVES.append(
        Function(name, arity, doc, partials, torch_fn, triton, cuda, fold or _fold_torch(torch_fn))
    )


# (name, arity, doc, partials, torch, triton, cuda)
_prim("exp", 1, "e to the x", lambda a, s: (s,), torch.exp, "tl.exp({0})", "expf({0})")
_prim("log", 1, "natural logarithm", lambda a, s: (div(ONE, a[0]),), torch.log,
      "tl.log({0})", "logf({0})")  # fmt: skip
_prim("log1p", 1, "log(1 + x), exact for small x", lambda a, s: (div(ONE, op("add", ONE, a[0])),),
      torch.log1p, "_kf_log1p({0})", "log1pf({0})")  # fmt: skip
_prim("expm1", 1, "exp(x) - 1, exact for small x", lambda a, s: (op("exp", a[0]),),
      torch.expm1, "_kf_expm1({0})", "expm1f({0})")  # fmt: skip
_prim("sqrt", 1, "square root", lambda a, s: (div(Num(0.5), s),), torch.sqrt,
      "tl.sqrt({0})", "sqrtf({0})")  # fmt: skip
_prim("rsqrt", 1, "1 / sqrt(x)", lambda a, s: (mul(Num(-0.5), div(s, a[0])),), torch.rsqrt,
      "tl.rsqrt({0})", "rsqrtf({0})")  # fmt: skip
_prim("tanh", 1, "hyperbolic tangent", lambda a, s: (sub(ONE, mul(s, s)),), torch.tanh,
      "_kf_tanh({0})", "tanhf({0})")  # fmt: skip
_prim("sigmoid", 1, "1 / (1 + exp(-x))", lambda a, s: (mul(s, sub(ONE, s)),), torch.sigmoid,
      "tl.sigmoid({0})", "kf_sigmoid({0})")  # fmt: skip
_prim("erf", 1, "error function",
      lambda a, s: (mul(Num(_TWO_OVER_SQRT_PI), op("exp", neg(mul(a[0], a[0])))),),
      torch.erf, "tl.erf({0})", "erff({0})")  # fmt: skip
_prim("softplus", 1, "log(1 + exp(x)), overflow-free", lambda a, s: (op("sigmoid", a[0]),),
      F.softplus, "_kf_softplus({0})", "kf_softplus({0})")  # fmt: skip
_prim("relu", 1, "max(x, 0); derivative 0 at 0", lambda a, s: (op("float", _gt0(a[0])),),
      torch.relu, "tl.where({0} > 0, {0}, 0.0)", "kf_relu({0})")  # fmt: skip
_prim("abs", 1, "absolute value; derivative sign(x)", lambda a, s: (op("sign", a[0]),),
      torch.abs, "tl.abs({0})", "fabsf({0})")  # fmt: skip
_prim("sign", 1, "-1, 0 or 1", lambda a, s: (ZERO,), torch.sign,
      "tl.where({0} > 0, 1.0, tl.where({0} < 0, -1.0, 0.0))", "kf_sign({0})")  # fmt: skip
_prim("floor", 1, "round down", lambda a, s: (ZERO,), torch.floor, "tl.floor({0})",
      "floorf({0})")  # fmt: skip
_prim("ceil", 1, "round up", lambda a, s: (ZERO,), torch.ceil, "tl.ceil({0})", "ceilf({0})")
_prim("sin", 1, "sine", lambda a, s: (op("cos", a[0]),), torch.sin, "tl.sin({0})", "sinf({0})")
_prim("cos", 1, "cosine", lambda a, s: (neg(op("sin", a[0])),), torch.cos, "tl.cos({0})",
      "cosf({0})")  # fmt: skip
_prim("min", 2, "the smaller of a and b; the gradient goes to a on ties",
      lambda a, s: (op("float", op("le", a[0], a[1])), op("float", op("gt", a[0], a[1]))),
      torch.minimum, "tl.minimum({0}, {1})", "fminf({0}, {1})")  # fmt: skip
_prim("max", 2, "the larger of a and b; the gradient goes to a on ties",
      lambda a, s: (op("float", op("ge", a[0], a[1])), op("float", op("lt", a[0], a[1]))),
      torch.maximum, "tl.maximum({0}, {1})", "fmaxf({0}, {1})")  # fmt: skip


def _pow_partials(a: tuple[Node, ...], s: Node) -> tuple[Node, ...]:
    base, expo = a
    if isinstance(expo, Num):
        d_base = mul(expo, op("pow", base, Num(expo.value - 1.0)))
        return d_base, ZERO
    # d/db a^b = a^b log(a); where a^b is 0 (a = 0, b > 0) the term is 0, not 0 * -inf.
    d_expo = where(op("eq", s, ZERO), ZERO, mul(s, op("log", base)))
    return mul(expo, op("pow", base, sub(expo, ONE))), d_expo


_prim("pow", 2, "a to the power b (small integer constant powers become products)",
      _pow_partials, torch.pow, "_kf_pow({0}, {1})", "powf({0}, {1})")  # fmt: skip

#: Primitive functions by name.
FUNCTIONS: dict[str, Function] = {f.name: f for f in _PRIMITIVES}


@dataclass(frozen=True)
class Macro:
    """A snippet defined in the expression language: ``name(params) = body``."""

    name: str
    params: tuple[str, ...]
    body: str
    doc: str


#: Snippets over the primitives, expanded where called.
MACROS: dict[str, Macro] = {
    m.name: m
    for m in [
        Macro("silu", ("x",), "x * sigmoid(x)", "x * sigmoid(x) (swish)"),
        Macro("gelu_tanh", ("x",),
              f"0.5 * x * (1 + tanh({_SQRT_2_OVER_PI} * (x + 0.044715 * x * x * x)))",
              "GELU, tanh approximation (F.gelu(x, approximate='tanh'))"),
        Macro("gelu", ("x",), "0.5 * x * (1 + erf(x * 0.7071067811865476))",
              "GELU, exact (erf)"),
        Macro("mish", ("x",), "x * tanh(softplus(x))", "x * tanh(softplus(x))"),
        Macro("elu", ("x",), "x > 0 ? x : expm1(x)", "ELU with alpha 1"),
        Macro("leaky_relu", ("x", "slope"), "x > 0 ? x : slope * x",
              "x for x > 0, else slope * x"),
        Macro("clamp", ("x", "lo", "hi"), "min(max(x, lo), hi)", "x limited to [lo, hi]"),
        Macro("square", ("x",), "x * x", "x squared"),
        Macro("hardsigmoid", ("x",), "min(max(x / 6 + 0.5, 0), 1)", "piecewise-linear sigmoid"),
        Macro("hardswish", ("x",), "x * min(max(x / 6 + 0.5, 0), 1)", "x * hardsigmoid(x)"),
    ]
}  # fmt: skip

#: Constants usable by name.
CONSTANTS: dict[str, float] = {"pi": math.pi, "inf": math.inf}


def describe() -> str:
    """A Markdown table of every function and snippet (for the docs)."""
    rows = ["| function | meaning |", "| --- | --- |"]
    for f in FUNCTIONS.values():
        args = "a, b" if f.arity == 2 else "x"
        rows.append(f"| `{f.name}({args})` | {f.doc} |")
    for m in MACROS.values():
        rows.append(f"| `{m.name}({', '.join(m.params)})` | {m.doc}: `{m.body}` |")
    return "\n".join(rows)
