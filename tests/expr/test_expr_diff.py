"""Symbolic derivatives against central finite differences: in float64 through the torch
evaluator, and through the generated Triton backward kernels under the interpreter."""

from __future__ import annotations

import pytest
import torch

import kernforge as kf
from kernforge.expr import derivative, elementwise, parse, reference
from kernforge.expr.evaluate import evaluate
from kernforge.expr.snippets import FUNCTIONS, MACROS
from kernforge.expr.tree import Num, Op, Var, names
from tests.helpers import DEVICE

#: Functions that need a positive argument.
POSITIVE = {"log", "sqrt", "rsqrt"}

#: One expression per library entry (binary ones with a second input y), and composites.
UNARY = [f for f in FUNCTIONS if FUNCTIONS[f].arity == 1] + [
    m for m in MACROS if len(MACROS[m].params) == 1
]
EXPRESSIONS = [f"{f}(x)" for f in UNARY] + [
    "pow(x, y)", "pow(x, 3)", "pow(x, -1.5)", "max(x, y)", "min(x, y)", "leaky_relu(x, y)",
    "clamp(x, -0.5, y)", "silu(x) * y", "x / y + y / x", "sqrt(x * x + y * y)",
    "x > y ? exp(x) * y : log(x) / y", "tanh(gelu_tanh(x) * softplus(y))",
    "x * rsqrt(x * x + y * y + 1e-3)", "log1p(exp(x * y)) - expm1(-x)", "sin(x) * cos(y)",
    "pow(sigmoid(x), y) + x * (x > 0.5)",
]  # fmt: skip


def _inputs(expr: str, n: int = 64, dtype=torch.float64) -> dict[str, torch.Tensor]:
    tree = parse(expr)
    out = {}
    for name in names(tree):
        # Positive, away from 0 and from the integers (floor/ceil/relu/abs kinks): the domain
        # of every function here, and where finite differences are well defined.
        v = torch.rand(n, dtype=torch.float64) * 1.6 + 0.2
        v = torch.where((v - v.round()).abs() < 0.05, v + 0.1, v)
        if not any(f in expr for f in POSITIVE | {"pow"}) and name == "x":
            v = v * torch.where(torch.rand(n) < 0.5, -1.0, 1.0).double()  # both signs
        out[name] = v.to(dtype)
    return out


def _finite_difference(tree, env, name, h=1e-6):
    plus = dict(env, **{name: env[name] + h})
    minus = dict(env, **{name: env[name] - h})
    return (evaluate(tree, plus, torch.float64) - evaluate(tree, minus, torch.float64)) / (2 * h)


@pytest.mark.parametrize("expr", EXPRESSIONS)
def test_derivative_matches_finite_differences(expr):
    tree = parse(expr)
    env = _inputs(expr)
    for name in names(tree):
        got = evaluate(derivative(tree, name), env, torch.float64).expand(64)
        want = _finite_difference(tree, env, name)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=f"d/d{name} of {expr}")


@pytest.mark.parametrize("expr", EXPRESSIONS)
def test_derivative_matches_torch_autograd(expr):
    tree = parse(expr)
    env = {k: v.requires_grad_() for k, v in _inputs(expr).items()}
    out = evaluate(tree, env, torch.float64)
    want = torch.autograd.grad(out.sum(), list(env.values()), allow_unused=True)
    for (name, _), w in zip(env.items(), want, strict=True):
        got = evaluate(derivative(tree, name), env, torch.float64).expand(64)
        w = torch.zeros(64, dtype=torch.float64) if w is None else w
        torch.testing.assert_close(got, w, rtol=1e-9, atol=1e-9, msg=f"d/d{name} of {expr}")


def test_derivatives_simplify():
    x, y = Var("x"), Var("y")
    assert derivative(parse("x * y"), "x") == y
    assert derivative(parse("x + y"), "x") == Num(1.0)
    assert derivative(parse("3 * x - y"), "x") == Num(3.0)
    assert derivative(parse("y * y"), "x") == Num(0.0)
    assert derivative(parse("exp(x)"), "x") == Op("exp", (x,))
    assert derivative(parse("x > 0 ? x : 0.1 * x"), "x") == parse("x > 0 ? 1 : 0.1")
    assert derivative(parse("floor(x) + sign(x) + (x > y)"), "x") == Num(0.0)
    assert derivative(parse("pow(x, 3)"), "x") == parse("3 * pow(x, 2)")


def test_shared_subtrees_are_differentiated_once():
    # Nested tanh(tanh(...)) 12 deep: the derivative stays linear in size (memoized, CSE'd).
    text = "x"
    for _ in range(12):
        text = f"tanh({text} * y)"
    from kernforge.expr.tree import size

    assert size(derivative(parse(text), "x")) < 200


@pytest.mark.parametrize("expr", EXPRESSIONS)
def test_triton_backward_matches_finite_differences(expr):
    """The generated Triton backward (fp32, interpreter) against float64 central differences
    of the reference forward."""
    op = elementwise(expr)
    env = {k: v.to(DEVICE) for k, v in _inputs(expr, n=37).items()}
    tensors = [env[x].float().requires_grad_() for x in op.inputs]
    with kf.backend("triton"):
        out = op(*tensors)
        dy = torch.randn_like(out)
        got = torch.autograd.grad(out, tensors, dy)
    ref = {x: env[x] for x in op.inputs}
    for name, g in zip(op.inputs, got, strict=True):
        h = 1e-6
        plus = [ref[x] + (h if x == name else 0.0) for x in op.inputs]
        minus = [ref[x] - (h if x == name else 0.0) for x in op.inputs]
        fd = (reference(op, *plus) - reference(op, *minus)) / (2 * h) * dy.double()
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), fd, rtol=2e-4, atol=2e-5,
                                   msg=f"d/d{name} of {expr} (triton)")  # fmt: skip
