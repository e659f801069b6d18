"""Expression trees: numbers, names and operations, built through simplifying constructors.

Trees are immutable and hashable, so equal subtrees compare equal and code generators can
emit each distinct subtree once (common-subexpression elimination by dictionary lookup).
Every value is a float except the results of comparisons and logical operators, which are
booleans; :func:`as_float` and :func:`as_bool` convert between the two where C would.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

#: Operators written infix (or prefix) in the expression language, by tree op name.
ARITH = ("add", "sub", "mul", "div", "neg")
COMPARE = ("lt", "le", "gt", "ge", "eq", "ne")
LOGIC = ("and", "or", "not")
#: Internal ops: ``where(c, a, b)`` (C's ternary) and ``float(b)`` (a boolean as 1.0 or 0.0).
SELECT = ("where", "float")


class Node:
    """Base of the tree node types (:class:`Num`, :class:`Var`, :class:`Op`)."""

    __slots__ = ()


@dataclass(frozen=True, eq=True)
class Num(Node):
    """A floating-point constant."""

    value: float

    def __hash__(self) -> int:
        return hash(("num", self.value))

    def __str__(self) -> str:
        return to_text(self)


@dataclass(frozen=True, eq=True)
class Var(Node):
    """A named value: an input tensor, a scalar parameter, or a per-row accumulator."""

    name: str

    def __hash__(self) -> int:
        return hash(("var", self.name))

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, eq=True)
class Op(Node):
    """An operation (arithmetic, comparison, logic, where, or a library function) on args."""

    op: str
    args: tuple[Node, ...]

    def __post_init__(self) -> None:
        # Trees are hashed often (CSE, memoized derivatives): hash once, not per lookup.
        object.__setattr__(self, "_hash", hash((self.op, self.args)))

    def __hash__(self) -> int:
        return self._hash  # type: ignore[attr-defined]

    def __str__(self) -> str:
        return to_text(self)


ZERO = Num(0.0)
ONE = Num(1.0)


def is_num(node: Node, value: float | None = None) -> bool:
    """True if ``node`` is a constant (equal to ``value`` when given)."""
    return isinstance(node, Num) and (value is None or node.value == value)


def is_bool(node: Node) -> bool:
    """True if ``node`` yields a boolean (a comparison or logical operator)."""
    return isinstance(node, Op) and (node.op in COMPARE or node.op in LOGIC)


def as_float(node: Node) -> Node:
    """``node`` as a float: booleans become 1.0 or 0.0, as C converts them."""
    return op("float", node) if is_bool(node) else node


def as_bool(node: Node) -> Node:
    """``node`` as a boolean: a float is true when non-zero, as in C."""
    return node if is_bool(node) else op("ne", node, ZERO)


def _fold(name: str, args: tuple[Num, ...]) -> Node | None:
    """The constant value of ``name`` on constant ``args``, or None to keep the operation."""
    from .snippets import FUNCTIONS  # a cycle at import time: snippets builds trees

    vals = [a.value for a in args]
    try:
        if name == "add":
            return Num(vals[0] + vals[1])
        if name == "sub":
            return Num(vals[0] - vals[1])
        if name == "mul":
            return Num(vals[0] * vals[1])
        if name == "div":
            return Num(vals[0] / vals[1]) if vals[1] != 0 else None
        if name == "neg":
            return Num(-vals[0])
        if name in FUNCTIONS:
            value = FUNCTIONS[name].fold(*vals)
            return None if value is None or math.isnan(value) else Num(float(value))
    except (OverflowError, ValueError, ZeroDivisionError):
        return None
    return None


_CMP: dict[str, Callable[[float, float], bool]] = {
    "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b,
    "gt": lambda a, b: a > b,
    "ge": lambda a, b: a >= b,
    "eq": lambda a, b: a == b,
    "ne": lambda a, b: a != b,
}


def op(name: str, *args: Node) -> Node:
    """Build ``name(*args)``, simplified.

    Constants fold; ``x + 0``, ``x * 1``, ``x * 0``, ``x / 1``, ``--x`` and ``where`` with a
    constant condition or equal branches reduce. ``x * 0`` becomes 0 even where x could be
    inf or NaN: derivatives would otherwise carry ``0 * inf`` terms that are zero in exact
    arithmetic.
    """
    if all(isinstance(a, Num) for a in args) and name not in COMPARE + LOGIC + SELECT:
        folded = _fold(name, args)  # type: ignore[arg-type]
        if folded is not None and not math.isnan(folded.value):  # type: ignore[attr-defined]
            return folded
    if name == "add":
        a, b = args
        if is_num(a, 0.0):
            return b
        if is_num(b, 0.0):
            return a
        if isinstance(b, Op) and b.op == "neg":
            return op("sub", a, b.args[0])
        if isinstance(a, Op) and a.op == "neg":
            return op("sub", b, a.args[0])
    elif name == "sub":
        a, b = args
        if is_num(b, 0.0):
            return a
        if is_num(a, 0.0):
            return op("neg", b)
        if a == b:
            return ZERO
        if isinstance(b, Op) and b.op == "neg":
            return op("add", a, b.args[0])
    elif name == "mul":
        a, b = args
        if is_num(a, 0.0) or is_num(b, 0.0):
            return ZERO
        if is_num(a, 1.0):
            return b
        if is_num(b, 1.0):
            return a
        if is_num(a, -1.0):
            return op("neg", b)
        if is_num(b, -1.0):
            return op("neg", a)
        if isinstance(b, Num) and not isinstance(a, Num):
            return op("mul", b, a)  # constants first: c1 * (c2 * x) folds below
        if isinstance(a, Num) and isinstance(b, Op) and b.op == "mul" and is_num(b.args[0]):
            return op("mul", Num(a.value * b.args[0].value), b.args[1])  # type: ignore[attr-defined]
        if isinstance(a, Op) and a.op == "neg":
            return op("neg", op("mul", a.args[0], b))
        if isinstance(b, Op) and b.op == "neg":
            return op("neg", op("mul", a, b.args[0]))
    elif name == "div":
        a, b = args
        if is_num(a, 0.0) and not is_num(b, 0.0):
            return ZERO
        if is_num(b, 1.0):
            return a
        if is_num(b, -1.0):
            return op("neg", a)
        if isinstance(b, Num) and b.value != 0 and not isinstance(a, Num):
            inv = 1.0 / b.value
            if math.frexp(inv)[0] == 0.5:  # a power of two: multiplying is exact
                return op("mul", Num(inv), a)
        if isinstance(a, Op) and a.op == "neg":
            return op("neg", op("div", a.args[0], b))
    elif name == "neg":
        (a,) = args
        if isinstance(a, Op) and a.op == "neg":
            return a.args[0]
        if isinstance(a, Op) and a.op == "sub":
            return op("sub", a.args[1], a.args[0])
    elif name in COMPARE:
        a, b = args
        if isinstance(a, Num) and isinstance(b, Num):
            return ONE if _CMP[name](a.value, b.value) else ZERO  # folded to a float
    elif name == "where":
        c, a, b = args
        if isinstance(c, Num):
            return a if c.value != 0 else b
        if a == b:
            return a
    elif name == "float":
        (a,) = args
        if isinstance(a, Num):
            return a
    elif name == "not":
        (a,) = args
        if isinstance(a, Num):
            return ONE if a.value == 0 else ZERO
    return Op(name, tuple(args))


def add(a: Node, b: Node) -> Node:
    """``a + b``, simplified."""
    return op("add", a, b)


def sub(a: Node, b: Node) -> Node:
    """``a - b``, simplified."""
    return op("sub", a, b)


def mul(a: Node, b: Node) -> Node:
    """``a * b``, simplified."""
    return op("mul", a, b)


def div(a: Node, b: Node) -> Node:
    """``a / b``, simplified."""
    return op("div", a, b)


def neg(a: Node) -> Node:
    """``-a``, simplified."""
    return op("neg", a)


def where(c: Node, a: Node, b: Node) -> Node:
    """``c ? a : b``, simplified (``c`` converted to a boolean)."""
    if isinstance(c, Num):
        return a if c.value != 0 else b
    return op("where", as_bool(c), a, b)


def walk(node: Node) -> Iterator[Node]:
    """Every distinct subtree of ``node``, children before parents (a topological order)."""
    seen: set[Node] = set()
    stack: list[tuple[Node, bool]] = [(node, False)]
    while stack:
        n, expanded = stack.pop()
        if n in seen:
            continue
        if expanded or not isinstance(n, Op):
            seen.add(n)
            yield n
            continue
        stack.append((n, True))
        stack.extend((a, False) for a in reversed(n.args) if a not in seen)


def names(*nodes: Node) -> list[str]:
    """The variable names used in ``nodes``, in order of first appearance (left to right)."""
    out: list[str] = []

    def visit(n: Node) -> None:
        if isinstance(n, Var):
            if n.name not in out:
                out.append(n.name)
        elif isinstance(n, Op):
            for a in n.args:
                visit(a)

    for n in nodes:
        visit(n)
    return out


def substitute(node: Node, mapping: dict[str, Node]) -> Node:
    """``node`` with each variable named in ``mapping`` replaced (and the result simplified)."""
    memo: dict[Node, Node] = {}
    for n in walk(node):
        if isinstance(n, Var):
            memo[n] = mapping.get(n.name, n)
        elif isinstance(n, Op):
            memo[n] = op(n.op, *(memo[a] for a in n.args))
        else:
            memo[n] = n
    return memo[node]


def size(node: Node) -> int:
    """Distinct subtrees of ``node`` (the number of values code generation emits)."""
    return sum(1 for _ in walk(node))


_INFIX = {"add": "+", "sub": "-", "mul": "*", "div": "/", "lt": "<", "le": "<=", "gt": ">",
          "ge": ">=", "eq": "==", "ne": "!=", "and": "&&", "or": "||"}  # fmt: skip
_PREC = {"or": 1, "and": 2, "eq": 3, "ne": 3, "lt": 4, "le": 4, "gt": 4, "ge": 4,
         "add": 5, "sub": 5, "mul": 6, "div": 6}  # fmt: skip


def _num_text(v: float) -> str:
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if v == int(v) and abs(v) < 1e15:
        return str(int(v))
    return repr(v)


def to_text(node: Node) -> str:
    """``node`` in the expression language (parsing the text gives back an equal tree)."""

    def go(n: Node, parent: int) -> str:
        if isinstance(n, Num):
            text = _num_text(n.value)
            return f"({text})" if n.value < 0 and parent > 0 else text
        if isinstance(n, Var):
            return n.name
        assert isinstance(n, Op)
        if n.op in _INFIX:
            p = _PREC[n.op]
            # Left-associative: the right operand of an equal-precedence op needs parentheses.
            text = f"{go(n.args[0], p)} {_INFIX[n.op]} {go(n.args[1], p + 1)}"
            return f"({text})" if p < parent else text
        if n.op == "neg":
            return f"-{go(n.args[0], 7)}"
        if n.op == "not":
            return f"!{go(n.args[0], 7)}"
        if n.op == "float":
            return go(n.args[0], parent)
        if n.op == "where":
            text = f"{go(n.args[0], 1)} ? {go(n.args[1], 0)} : {go(n.args[2], 0)}"
            return f"({text})" if parent > 0 else text
        return f"{n.op}({', '.join(go(a, 0) for a in n.args)})"

    return go(node, 0)
