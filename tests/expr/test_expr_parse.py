"""Expression parsing: precedence, unary operators, calls, snippets, and clear errors."""

from __future__ import annotations

import math

import pytest
import torch

from kernforge.errors import ArgumentError
from kernforge.expr import ExpressionError, parse
from kernforge.expr.evaluate import evaluate
from kernforge.expr.parse import free_names
from kernforge.expr.tree import Num, Op, Var, to_text

X, Y, Z = 1.7, -0.6, 2.5
ENV = {"x": X, "y": Y, "z": Z}


def value(text: str) -> float:
    return float(evaluate(parse(text), ENV, torch.float64))


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("x + y * z", X + Y * Z),
        ("(x + y) * z", (X + Y) * Z),
        ("x - y - z", X - Y - Z),  # left-associative
        ("x / y / z", X / Y / Z),
        ("x - y + z", X - Y + Z),
        ("-x * y", -X * Y),
        ("-x - -y", -X + Y),
        ("--x", X),
        ("+x", X),
        ("x * -y", X * -Y),
        ("2 * x + 1 / 2", 2 * X + 0.5),  # numbers are floats: 1 / 2 is 0.5
        ("1e-1 + .5 + 2.f + 3.0F + 1E2", 0.1 + 0.5 + 2 + 3 + 100),
        ("x > y ? x : y", max(X, Y)),
        ("x < y ? x : y", min(X, Y)),
        ("x > 0 ? y > 0 ? 1 : 2 : 3", 2.0),  # the ternary nests to the right
        ("x < 0 ? 1 : z > 2 ? 5 : 6", 5.0),
        ("x > y && y > z", 0.0),  # a boolean used as a number is 1 or 0
        ("x > y || y > z", 1.0),
        ("!(x > y) + 2", 2.0),
        ("(x > y) * 3 + (x == x) + (x != x)", 4.0),
        ("x + y > z - 3 == 1", 1.0),  # arithmetic binds tighter than comparisons
        ("where(x > 2, 1, -1)", -1.0),
        ("x ? 4 : 5", 4.0),  # a float condition is true when non-zero, as in C
        ("max(x, y) - min(x, z) + pow(x, 2)", X - X + X * X),
        ("exp(log(x)) + sqrt(x * x) + rsqrt(4)", X + X + 0.5),
        ("sigmoid(0) + tanh(0) + abs(y)", 0.5 + abs(Y)),
        ("silu(x)", X / (1 + math.exp(-X))),
        ("gelu(x)", 0.5 * X * (1 + math.erf(X / math.sqrt(2)))),
        ("clamp(z, -1, 1) + leaky_relu(y, 0.1)", 1 + 0.1 * Y),
        ("pi + 0 * inf * 0 + 1", math.pi + 1),  # 0 * anything simplifies to 0
    ],
)
def test_precedence_and_values(text, want):
    assert value(text) == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_tree_shapes():
    assert parse("x + y * z") == Op("add", (Var("x"), Op("mul", (Var("y"), Var("z")))))
    assert parse("-x") == Op("neg", (Var("x"),))
    assert parse("2 * 3 + 1") == Num(7.0)  # constants fold
    assert parse("x * 1 + 0") == Var("x")
    assert parse("x * 0") == Num(0.0)
    assert parse("x - x") == Num(0.0)
    # Snippets expand into primitives.
    assert parse("silu(x)") == Op("mul", (Var("x"), Op("sigmoid", (Var("x"),))))


@pytest.mark.parametrize(
    "text",
    ["x - (y - z)", "x / (y * z)", "-(x + y)", "x > 0 ? y : -z", "pow(x, -2.5) + 1e-06",
     "x < y && !(z >= 1) || x == y", "(x > 0) * y", "gelu_tanh(x) / (1 + exp(-y))"],
)  # fmt: skip
def test_text_round_trip(text):
    tree = parse(text)
    again = parse(to_text(tree))
    assert again == tree
    assert value(to_text(tree)) == pytest.approx(value(text), rel=1e-12)


def test_free_names_in_order():
    assert free_names("silu(y) * x + y * alpha") == ["y", "x", "alpha"]
    assert free_names("x * pi + inf") == ["x"]
    assert free_names("x * rsqrt(rowmean(x * x) + eps) * w", rows=True) == ["x", "eps", "w"]


def _error(text, **kw) -> str:
    with pytest.raises(ExpressionError) as info:
        parse(text, **kw)
    assert isinstance(info.value, ArgumentError)  # catchable as kernforge's argument error
    return str(info.value)


@pytest.mark.parametrize(
    ("text", "column", "words"),
    [
        ("x +", 4, "expected an operand"),
        ("silu(x *) y", 9, "found ')'"),
        ("x y", 3, "unexpected 'y' after a complete expression"),
        ("(x + y", 7, "expected ')' to close the '(' at column 1"),
        ("x ? y", 6, "expected ':'"),
        ("x % 2", 3, "no % operator"),
        ("x ^ 2", 3, "pow(a, b)"),
        ("x = y", 3, "unexpected character '='"),
        ("x & y", 3, "&&"),
        ("", 1, "empty"),
        ("x + ()", 6, "empty parentheses"),
        ("max(x,)", 7, "expected an operand"),
        ("sigmoid + 1", 1, "'sigmoid' is a function"),
        ("x $ y", 3, "unexpected character '$'"),
    ],
)
def test_syntax_errors_name_position_and_token(text, column, words):
    msg = _error(text)
    assert f"column {column}:" in msg
    assert words in msg
    assert text in msg  # the expression is quoted, with a caret under the column
    caret_line = msg.splitlines()[2]
    assert caret_line.index("^") - 2 == column - 1


def test_unknown_function():
    msg = _error("x * sigmod(y)")
    assert "unknown function 'sigmod'" in msg and "column 5" in msg
    assert "did you mean 'sigmoid'" in msg
    assert "available:" in msg and "gelu_tanh" in msg


def test_wrong_arity():
    assert "max() takes 2 arguments, got 1" in _error("max(x)")
    assert "silu() takes 1 argument, got 2" in _error("silu(x, y)")
    assert "where() takes 3 arguments, got 2" in _error("where(x, y)")


def test_unknown_variable():
    msg = _error("x + alpah * y", variables={"x", "y", "alpha"})
    assert "unknown variable 'alpah'" in msg and "column 5" in msg
    assert "did you mean 'alpha'" in msg
    assert "known names: alpha, x, y" in msg


def test_row_reductions_only_in_rowwise():
    assert "only available in rowwise" in _error("x / rowsum(x)")


def test_not_a_string():
    with pytest.raises(ExpressionError, match="must be a string"):
        parse(3.0)  # type: ignore[arg-type]
