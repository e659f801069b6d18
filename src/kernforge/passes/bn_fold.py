"""BatchNorm folding: an inference BatchNorm right after a convolution becomes the convolution's
weights and bias (recipes ``fold_bn_weight``/``fold_bn_bias``); any other BatchNorm becomes
``x * scale + shift`` with per-channel weights (recipes ``bn_scale``/``bn_shift``), which the
elementwise fusion or the conv epilogue absorbs. A pure ``Graph -> Graph``."""

from __future__ import annotations

from ..compiler.weights import strip_cast, wrap_cast
from ..ir import Graph, Node, Value
from .simplify import dce, rebuild


def _weight_source(v: Value) -> tuple | None:
    """(inner recipe or source name, cast dtype) of a weight node's value, else None."""
    if v.node is None or v.node.op != "weight":
        return None
    return strip_cast(v.node.attrs["recipe"], v.node.attrs["name"])


def _foldable(conv: Node, bn: Node, users: dict[int, list[Node]]) -> bool:
    if conv.op != "conv2d" or conv.attrs.get("activation") or conv.attrs.get("has_residual"):
        return False
    if len(users.get(id(conv.output), [])) != 1:
        return False
    params = [*conv.inputs[1 : 2 + bool(conv.attrs.get("has_bias"))], *bn.inputs[1:]]
    return all(_weight_source(p) is not None for p in params)


def fold_batch_norm(graph: Graph) -> Graph:
    """Fold BatchNorms into the convolutions before them (see the module docs)."""
    users = graph.users()
    pairs: dict[int, Node] = {}  # id(conv node) -> its BatchNorm
    for node in graph.nodes:
        if node.op == "batch_norm" and node.inputs[0].node is not None:
            conv = node.inputs[0].node
            if _foldable(conv, node, users):
                pairs[id(conv)] = node
    replaced: dict[int, Value] = {}  # id(bn output) -> the folded conv's output

    def rewrite(node: Node, ins: list[Value], g: Graph) -> Value | None:
        if id(node) in pairs:
            bn = pairs[id(node)]
            eps = bn.attrs["eps"]
            (w, wdt) = _weight_source(node.inputs[1])
            b = _weight_source(node.inputs[2])[0] if node.attrs.get("has_bias") else None
            bn_src = [_weight_source(p)[0] for p in bn.inputs[1:]]
            wname = node.inputs[1].node.attrs["name"]
            wv = node.inputs[1]
            fw = g.add(
                "weight", (), shape=wv.shape, dtype=wv.dtype, name=f"{wname}+bn",
                recipe=wrap_cast(("fold_bn_weight", w, *bn_src, eps), wdt),
            )  # fmt: skip
            fb = g.add(
                "weight", (), shape=(wv.shape[0],), dtype=wv.dtype, name=f"{wname}+bn.bias",
                recipe=wrap_cast(("fold_bn_bias", b, *bn_src, eps), wdt),
            )  # fmt: skip
            attrs = dict(node.attrs, has_bias=True)
            out = g.add("conv2d", [ins[0], fw, fb], node.loc, **attrs)
            replaced[id(bn.output)] = out
            return out
        if id(node.output) in replaced:
            return replaced[id(node.output)]
        if node.op == "batch_norm":
            return _affine(node, ins, g)
        return None

    return dce(rebuild(graph, rewrite))


def _affine(bn: Node, ins: list[Value], g: Graph) -> Value | None:
    """A lone BatchNorm as ``x * scale + shift`` (scale and shift shaped to broadcast)."""
    srcs = [_weight_source(p) for p in bn.inputs[1:]]
    if any(s is None for s in srcs):
        return None
    x = ins[0]
    c = x.shape[1]
    shape = (c,) + (1,) * (x.ndim - 2)
    (gw, dt), (gb, _), (mean, _), (var, _) = srcs
    eps = bn.attrs["eps"]
    base = bn.inputs[1].node.attrs["name"]
    scale = g.add(
        "weight", (), shape=shape, dtype=x.dtype, name=f"{base}.scale",
        recipe=wrap_cast(("reshape", ("bn_scale", gw, var, eps), shape), dt),
    )  # fmt: skip
    shift = g.add(
        "weight", (), shape=shape, dtype=x.dtype, name=f"{base}.shift",
        recipe=wrap_cast(("reshape", ("bn_shift", gw, gb, mean, var, eps), shape), dt),
    )  # fmt: skip
    return g.add("add", [g.add("mul", [x, scale], bn.loc), shift], bn.loc)
