"""Constant folding of weight-only subgraphs into weight recipes: a ``cast``, ``transpose`` or
``reshape`` of a weight becomes a weight whose recipe does it once, when the program's weights
are built (so ``matmul(x, transpose(w))`` reads a pre-transposed weight). A pure
``Graph -> Graph``."""

from __future__ import annotations

from ..ir import Graph, Node, Value
from .simplify import dce, rebuild

FOLDABLE = ("cast", "transpose", "reshape")


def fold_weights(graph: Graph) -> Graph:
    """Fold casts, transposes and reshapes of weights into recipes (chains fold whole)."""

    def rewrite(node: Node, ins: list[Value], g: Graph) -> Value | None:
        if node.op not in FOLDABLE or ins[0].node is None or ins[0].node.op != "weight":
            return None
        w = ins[0].node.attrs
        src = w["name"] if w["recipe"] is None else w["recipe"]
        if node.op == "cast":
            recipe, tag = ("cast", src, node.attrs["dtype"]), node.attrs["dtype"]
        elif node.op == "transpose":
            recipe, tag = (
                ("transpose", src, node.attrs["perm"]),
                "T" + "".join(map(str, node.attrs["perm"])),
            )
        else:
            recipe, tag = (
                ("reshape", src, node.attrs["shape"]),
                "r" + "x".join(map(str, node.attrs["shape"])),
            )
        out = node.output
        return g.add(
            "weight", (), node.loc, shape=out.shape, dtype=out.dtype,
            name=f"{w['name']}.{tag}", recipe=recipe,
        )  # fmt: skip

    return dce(rebuild(graph, rewrite))
