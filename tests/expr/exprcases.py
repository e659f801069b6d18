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
    x = torch.randn(shape, device=device).to(dtype)
    y = (torch.rand(shape, device=device) * 1.5 + 0.25).to(dtype)
    return x.requires_grad_(requires_grad), y.requires_grad_(requires_grad)
