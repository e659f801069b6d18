"""Expressions shared by the expression-kernel tests."""

from __future__ import annotations

import torch

from kernforge.expr.snippets import FUNCTIONS, MACROS

#: Functions that need a positive argument: applied to y in [0.25, 1.75] in EVERYTHING.
POSITIVE = ("log", "sqrt", "rsqrt", "log1p")

#: Every library function and snippet in one expression of x (any real) and y (in
#: [0.25, 1.75]), plus the operators: one kernel covers the whole library.
EVERYTHING = " + ".join(
    [f"{f}(x)" for f in FUNCTIONS if FUNCTIONS[f].arity == 1 and f not in POSITIVE]
    + [f"{f}(y)" for f in POSITIVE]
    + [f"{m}(x)" for m in MACROS if len(MACROS[m].params) == 1]
    + ["pow(y, x)", "pow(x, 3)", "pow(y, -0.5)", "pow(y, 2.5)", "max(x, y)", "min(x, y)",
       "leaky_relu(x, alpha)", "clamp(x, -1, y)", "(x > y && !(y < 0.5) || x == 1 ? x : y)"]
)  # fmt: skip


def everything_inputs(shape, dtype, device, requires_grad=True):
    """x (normal; not clamped, which would put values on hardsigmoid's kinks) and y in
    [0.25, 1.75]."""
    x = torch.randn(shape, device=device)
    y = (torch.rand(shape, device=device) * 1.5 + 0.25).to(dtype).float()
    # Keep x off the kinks (x == y for max/min/clamp; -1, 0, 1 and +-3 for clamp, relu, abs,
    # hardsigmoid, x == 1): in fp16/bf16 exact ties happen, and there the kernels give the
    # whole gradient to the first argument while torch splits it (documented): a different
    # subgradient, not an error.
    kinks = torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0], device=device)
    near = ((x - y).abs() < 0.03) | ((x[..., None] - kinks).abs() < 0.03).any(-1)
    x = torch.where(near, x + 0.1, x).to(dtype)
    return x.requires_grad_(requires_grad), y.to(dtype).requires_grad_(requires_grad)
