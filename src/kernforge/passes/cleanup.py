"""Alias and no-op elimination for imported models: ``alias`` nodes (clone, detach, contiguous,
dropout in eval), casts to the same dtype, reshapes to the same shape and identity transposes
disappear; unused weights and nodes are dropped. A pure ``Graph -> Graph``."""

from __future__ import annotations

from ..ir import Graph, Node, Value
from .simplify import dce, rebuild


def eliminate_aliases(graph: Graph) -> Graph:
    """Remove identity nodes (see the module docs), then dead code."""

    def rewrite(node: Node, ins: list[Value], g: Graph) -> Value | None:
        out = node.output
        if node.op == "alias":
            return ins[0]
        same = bool(ins) and ins[0].shape == out.shape and ins[0].dtype == out.dtype
        if node.op in ("cast", "reshape", "broadcast_to") and same:
            return ins[0]
        if node.op == "transpose" and node.attrs["perm"] == tuple(range(out.ndim)):
            return ins[0]
        if node.op == "transpose" and _moves_only_ones(ins[0].shape, node.attrs["perm"]):
            return _reshape(g, ins[0], out.shape, node.loc)  # no data moves
        if node.op == "reshape" and ins[0].node is not None and ins[0].node.op == "reshape":
            return _reshape(g, ins[0], out.shape, node.loc)
        if node.op == "matmul" and ins[0].shape[-1] == 1:
            # An outer product (rope's inv_freq @ positions): a broadcast multiply, which
            # fuses with its neighbours, where a GEMM kernel would waste a whole tile.
            return g.add("mul", ins, node.loc)
        if node.op == "cast" and ins[0].node is not None and ins[0].node.op == "cast":
            inner = ins[0].node.inputs[0]
            if inner.dtype == out.dtype and _widens(inner.dtype, ins[0].dtype):
                return inner  # a round trip through a wider type is exact
        return None

    return dce(rebuild(graph, rewrite))


def _reshape(g: Graph, v: Value, shape: tuple[int, ...], loc) -> Value:
    """``v`` reshaped to ``shape``, looking through reshapes that make ``v``."""
    while v.node is not None and v.node.op == "reshape":
        v = v.node.inputs[0]
    return v if v.shape == shape else g.add("reshape", [v], loc, shape=shape)


def _moves_only_ones(shape: tuple[int, ...], perm: tuple[int, ...]) -> bool:
    """Whether transposing ``shape`` by ``perm`` keeps the order of its axes longer than 1
    (then the transpose is a reshape: no element changes place in memory)."""
    big = [p for p in perm if shape[p] != 1]
    return big == sorted(big)


def _widens(small: str, big: str) -> bool:
    """Whether every ``small`` value is exactly representable in ``big``."""
    if small == big:
        return True
    if small in ("float16", "bfloat16"):
        return big in ("float32", "float64")
    return small == "float32" and big == "float64"
