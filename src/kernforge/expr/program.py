"""Kernel programs: what one generated kernel computes, and how backward programs are derived.

A :class:`Program` runs over a [rows, cols] grid of elements. It loads *element operands*
(one value per element) and *row operands* (one value per row), takes scalar *params*, computes
*reductions* along each row in order (each may use earlier ones), and writes *outputs*: one
value per element, or one per row when an output uses no element operand. An elementwise
kernel is a program without reductions.

:func:`backward` derives the backward program of a one-output program by reverse-mode
differentiation through its reductions: each reduction's adjoint (a per-row scalar) is itself a
row sum, computed last reduction first.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .diff import derivative
from .tree import ONE, ZERO, Node, Op, Var, add, div, mul, names, op, walk

#: Name of the incoming gradient in backward programs and explicit gradient expressions.
DY = "dy"
#: Name of the row length in rowwise programs.
N = "n"


@dataclass(frozen=True)
class Reduction:
    """``name = kind over the row of expr`` (kind: sum, mean, max or min)."""

    name: str
    kind: str
    expr: Node


@dataclass
class ReductionSet:
    """Row reductions met while parsing, deduplicated: ``rowmax(x)`` twice is one reduction."""

    items: list[Reduction] = field(default_factory=list)
    prefix: str = "$r"

    def add(self, kind: str, expr: Node) -> Var:
        """The variable holding ``kind(expr)`` over the row (added if new)."""
        for r in self.items:
            if r.kind == kind and r.expr == expr:
                return Var(r.name)
        name = f"{self.prefix}{len(self.items)}"
        self.items.append(Reduction(name, kind, expr))
        return Var(name)


@dataclass(frozen=True)
class Program:
    """One kernel's computation (see the module docs)."""

    operands: tuple[str, ...]  # element operands, in kernel argument order
    row_operands: tuple[str, ...]
    params: tuple[str, ...]  # float scalars, in kernel argument order
    reductions: tuple[Reduction, ...]
    outputs: tuple[Node, ...]
    #: Outputs that use no element operand are written one per row (forward rowwise
    #: programs); False writes every output per element (gradients of [..., n] inputs).
    row_outputs: bool = True

    def element_level(self, node: Node) -> bool:
        """True if ``node`` varies along the row (uses an element operand)."""
        return _uses(node, set(self.operands))

    def row_level(self, node: Node) -> bool:
        """True if ``node`` is per-row: uses a reduction or row operand, no element operand."""
        if self.element_level(node):
            return False
        return _uses(node, {r.name for r in self.reductions} | set(self.row_operands))

    def output_per_row(self, i: int) -> bool:
        """True if output ``i`` is one value per row."""
        return (
            self.row_outputs and bool(self.reductions) and not self.element_level(self.outputs[i])
        )


def _uses(node: Node, vars_: set[str]) -> bool:
    return any(isinstance(n, Var) and n.name in vars_ for n in walk(node))


def prune(p: Program) -> Program:
    """``p`` without reductions, operands and row operands that no output needs."""
    by_name = {r.name: r for r in p.reductions}
    needed: set[str] = set()
    todo = list(p.outputs)
    while todo:
        for name in names(todo.pop()):
            if name not in needed:
                needed.add(name)
                if name in by_name:
                    todo.append(by_name[name].expr)
    return replace(
        p,
        operands=tuple(x for x in p.operands if x in needed),
        row_operands=tuple(x for x in p.row_operands if x in needed),
        reductions=tuple(r for r in p.reductions if r.name in needed),
    )


def _weight(r: Reduction, extra: list[Reduction]) -> Node:
    """d r / d (its summand at one element): 1 for sum, 1/n for mean, and for max/min an
    indicator of the elements that attain it, shared evenly among ties (as torch.amax)."""
    if r.kind == "sum":
        return ONE
    if r.kind == "mean":
        return div(ONE, Var(N))
    hit = op("float", op("eq", r.expr, Var(r.name)))
    count = Reduction(f"{r.name}#ties", "sum", hit)
    extra.append(count)
    return div(hit, Var(count.name))


def backward(fwd: Program, wrt: tuple[str, ...]) -> Program:
    """The backward program of one-output ``fwd``: outputs are the gradients of the operands
    in ``wrt``, given the output gradient ``dy`` (an element operand, or a row operand when the
    output is one value per row). Forward reductions are recomputed, not saved."""
    (f,) = fwd.outputs
    dy = Var(DY)
    dy_per_row = fwd.output_per_row(0)
    reds = list(fwd.reductions)
    extra: list[Reduction] = []
    weights = [_weight(r, extra) for r in reds]
    adjoint: list[Node] = [ZERO] * len(reds)
    element_vars = set(fwd.operands) | (set() if dy_per_row else {DY})
    for k in reversed(range(len(reds))):
        a_k = reds[k].name
        df = derivative(f, a_k)
        direct = mul(dy, df) if dy_per_row else ZERO
        summand = ZERO if dy_per_row else mul(dy, df)
        for l_ in range(k + 1, len(reds)):
            if adjoint[l_] != ZERO:
                dg = derivative(reds[l_].expr, a_k)
                summand = add(summand, mul(adjoint[l_], mul(weights[l_], dg)))
        if summand == ZERO:
            adjoint[k] = direct
        elif not _uses(summand, element_vars):
            adjoint[k] = add(direct, mul(Var(N), summand))  # a sum of a per-row value
        else:
            r = Reduction(f"$adj{k}", "sum", summand)
            extra.append(r)
            adjoint[k] = add(direct, Var(r.name))
    outputs = []
    for x in wrt:
        g = mul(dy, derivative(f, x))
        for k, r in enumerate(reds):
            if adjoint[k] != ZERO:
                g = add(g, mul(adjoint[k], mul(weights[k], derivative(r.expr, x))))
        outputs.append(g)
    ops_, rows_ = fwd.operands, fwd.row_operands
    if dy_per_row:
        rows_ = (*rows_, DY)
    else:
        ops_ = (*ops_, DY)
    bwd = Program(ops_, rows_, fwd.params, (*reds, *_ordered(extra)), tuple(outputs), False)
    return prune(bwd)


def _ordered(extra: list[Reduction]) -> list[Reduction]:
    """Tie counts first (adjoints use them), then adjoints in the order they were made (each
    uses only adjoints made before it)."""
    return [r for r in extra if r.name.endswith("#ties")] + [
        r for r in extra if not r.name.endswith("#ties")
    ]


def depends_on(node: Node, name: str) -> bool:
    """True if ``node`` uses variable ``name``."""
    return _uses(node, {name})


def is_op(node: Node, name: str) -> bool:
    """True if ``node`` is an operation ``name``."""
    return isinstance(node, Op) and node.op == name
