"""Symbolic differentiation of expression trees.

:func:`derivative` applies the chain rule node by node, memoized so a shared subtree is
differentiated once, and builds the result through the simplifying constructors of
:mod:`~kernforge.expr.tree` (so ``d(x * y)/dx`` is ``y``, not ``1 * y + x * 0``). Comparisons,
``sign``, ``floor`` and ``ceil`` have derivative 0; ``where(c, a, b)`` differentiates to
``where(c, a', b')``, so piecewise functions get the derivative of the branch taken.
"""

from __future__ import annotations

from .snippets import FUNCTIONS
from .tree import (
    COMPARE,
    LOGIC,
    ONE,
    ZERO,
    Node,
    Num,
    Op,
    Var,
    add,
    div,
    mul,
    neg,
    sub,
    walk,
    where,
)


def derivative(node: Node, name: str) -> Node:
    """``d node / d name``, simplified."""
    memo: dict[Node, Node] = {}
    for n in walk(node):
        memo[n] = _rule(n, name, memo)
    return memo[node]


def _rule(n: Node, name: str, memo: dict[Node, Node]) -> Node:
    if isinstance(n, Num):
        return ZERO
    if isinstance(n, Var):
        return ONE if n.name == name else ZERO
    assert isinstance(n, Op)
    args = n.args
    d = [memo[a] for a in args]
    if all(x == ZERO for x in d):
        return ZERO
    if n.op == "add":
        return add(d[0], d[1])
    if n.op == "sub":
        return sub(d[0], d[1])
    if n.op == "mul":
        return add(mul(d[0], args[1]), mul(args[0], d[1]))
    if n.op == "div":
        if d[1] == ZERO:
            return div(d[0], args[1])
        return div(sub(d[0], mul(n, d[1])), args[1])  # (a' - (a/b) b') / b
    if n.op == "neg":
        return neg(d[0])
    if n.op in COMPARE or n.op in LOGIC or n.op == "float":
        return ZERO
    if n.op == "where":
        return where(args[0], d[1], d[2])
    fn = FUNCTIONS.get(n.op)
    if fn is None:
        raise KeyError(f"no derivative rule for {n.op!r}")
    partials = fn.partials(args, n)
    total: Node = ZERO
    for p, da in zip(partials, d, strict=True):
        if da != ZERO:
            total = add(total, mul(p, da))
    return total


def vjp(node: Node, name: str, dy: Node) -> Node:
    """The vector-Jacobian product ``dy * d node / d name`` of an elementwise expression."""
    return mul(dy, derivative(node, name))
