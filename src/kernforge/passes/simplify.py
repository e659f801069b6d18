"""Graph clean-up passes: dead code elimination, common subexpression elimination, constant
folding. Each is a pure function ``Graph -> Graph`` (a new graph; the input is not changed)."""

from __future__ import annotations

from collections.abc import Callable

from ..ir import Graph, Node, Value, dtypes

Rewrite = Callable[[Node, list[Value], Graph], Value | None]


def rebuild(graph: Graph, rewrite: Rewrite | None = None, keep: set[int] | None = None) -> Graph:
    """Copy ``graph`` node by node. ``rewrite(node, new_inputs, new_graph)`` may return a value
    of the new graph to stand for the node's output (None: copy the node). ``keep``, when
    given, is the set of ``id(node)`` to copy; others are dropped."""
    g = Graph(graph.name)
    new: dict[int, Value] = {}
    for v in graph.inputs:
        new[id(v)] = g.input(v.shape, v.dtype, v.name)
    for node in graph.nodes:
        if keep is not None and id(node) not in keep:
            continue
        ins = [new[id(v)] for v in node.inputs]
        out = rewrite(node, ins, g) if rewrite else None
        if out is None:
            out = g.add(node.op, ins, node.loc, **node.attrs)
        new[id(node.output)] = out
    g.set_outputs(new[id(v)] for v in graph.outputs)
    return g


def dce(graph: Graph) -> Graph:
    """Drop nodes whose outputs no graph output depends on."""
    live: set[int] = {id(v) for v in graph.outputs}
    keep: set[int] = set()
    for node in reversed(graph.nodes):
        if id(node.output) in live:
            keep.add(id(node))
            live.update(id(v) for v in node.inputs)
    return rebuild(graph, keep=keep)


def cse(graph: Graph) -> Graph:
    """Merge nodes that apply the same op with the same attributes to the same inputs."""
    seen: dict[tuple, Value] = {}

    def rewrite(node: Node, ins: list[Value], g: Graph) -> Value | None:
        key = (node.op, tuple(id(v) for v in ins), tuple(sorted(node.attrs.items())))
        if key in seen:
            return seen[key]
        seen[key] = out = g.add(node.op, ins, node.loc, **node.attrs)
        return out

    return rebuild(graph, rewrite)


def _is_full(v: Value) -> bool:
    return v.node is not None and v.node.op == "full"


def _full_value(v: Value) -> float | int | bool:
    assert v.node is not None
    return v.node.attrs["value"]


def fold(graph: Graph) -> Graph:
    """Constant folding and identities.

    - an elementwise op whose inputs are all ``full`` becomes one ``full`` (the value is
      computed by the NumPy evaluator, so dtype rounding is NumPy's);
    - casts to the same dtype, reshapes/broadcasts to the same shape and identity transposes
      disappear; a view of a view becomes one view where that is exact;
    - ``x * 1``, ``x + 0``, ``x - 0``, ``x / 1`` become ``x`` when that keeps shape and dtype;
    - float ``x ** n`` for a whole ``n`` with ``|n| <= 4`` becomes multiplications (and one
      division for negative ``n``): special functions cost more than the memory traffic;
    - float ``a / sqrt(b)`` becomes ``a * rsqrt(b)``: one special function and no division.
    """
    from ..runtime import simulate  # the evaluator defines what each op computes

    def rewrite(node: Node, ins: list[Value], g: Graph) -> Value | None:
        out = node.output
        if node.kind == "elementwise" and ins and all(_is_full(v) for v in ins):
            mini = Graph("fold")
            vals = [
                mini.add("full", (), shape=(), value=_full_value(v), dtype=v.dtype) for v in ins
            ]
            mini.set_outputs([mini.add(node.op, vals, **node.attrs)])
            (result,) = simulate.run(mini, [])
            return g.add(
                "full", (), node.loc, shape=out.shape, value=result.item(), dtype=out.dtype
            )
        src = ins[0] if ins else None
        same = src is not None and src.shape == out.shape and src.dtype == out.dtype
        if node.op == "cast" and same:
            return src
        if node.op in ("reshape", "broadcast_to") and same:
            return src
        if node.op == "transpose" and node.attrs["perm"] == tuple(range(len(out.shape))):
            return src
        if node.op == "reshape" and src.node is not None and src.node.op == "reshape":
            return g.add("reshape", [src.node.inputs[0]], node.loc, **node.attrs)
        if node.op == "transpose" and src.node is not None and src.node.op == "transpose":
            inner, outer = src.node.attrs["perm"], node.attrs["perm"]
            perm = tuple(inner[p] for p in outer)
            if perm == tuple(range(len(perm))):
                return src.node.inputs[0]
            return g.add("transpose", [src.node.inputs[0]], node.loc, perm=perm)
        if node.op == "pow" and _is_full(ins[1]) and dtypes.is_float(out.dtype):
            n = _full_value(ins[1])
            if float(n).is_integer() and 1 <= abs(n) <= 4 and ins[0].shape == out.shape:
                x = ins[0]
                acc = x
                for _ in range(int(abs(n)) - 1):
                    acc = g.add("mul", [acc, x], node.loc)
                if n < 0:
                    one = g.add("full", (), node.loc, shape=(), value=1.0, dtype=out.dtype)
                    acc = g.add("div", [one, acc], node.loc)
                return acc
        den = ins[1].node if node.op == "div" else None
        if den is not None and den.op == "sqrt" and dtypes.is_float(out.dtype):
            return g.add("mul", [ins[0], g.add("rsqrt", [den.inputs[0]], node.loc)], node.loc)
        if node.op in ("mul", "div", "add", "sub") and len(ins) == 2:
            x, c = ins
            unit = 1 if node.op in ("mul", "div") else 0
            if _is_full(c) and _full_value(c) == unit and x.shape == out.shape:
                return x
            commutes = node.op in ("mul", "add")
            if commutes and _is_full(x) and _full_value(x) == unit and c.shape == out.shape:
                return c
        return None

    return rebuild(graph, rewrite)


def simplify(graph: Graph) -> Graph:
    """The clean-up pipeline every front end's graph goes through: fold, CSE, DCE."""
    return dce(cse(fold(graph)))
