"""Channels-last layout for convolutions and pools: a pure ``Graph -> Graph``.

Every ``nchw`` conv2d / max_pool2d / adaptive_avg_pool2d becomes its ``nhwc`` form between two
transposes (conv weights get a ``("transpose", w, (0, 2, 3, 1))`` recipe, so they are permuted
once, when the program is built). Then transposes are pushed through elementwise nodes
(``ew(T(a), T(b)) -> T(ew(a, b))``, scalars passing through) and back-to-back transposes cancel,
so a chain of convolutions runs NHWC throughout and the input is permuted once at the entry.
"""

from __future__ import annotations

from ..ir import Graph, Node, Value
from .simplify import dce, rebuild

TO_NHWC = (0, 2, 3, 1)
TO_NCHW = (0, 3, 1, 2)
SPATIAL = ("conv2d", "max_pool2d", "adaptive_avg_pool2d")


def _t(g: Graph, v: Value, perm: tuple[int, ...], loc=None) -> Value:
    return g.add("transpose", [v], loc, perm=perm)


def _inner_transpose(v: Value, perm: tuple[int, ...]) -> Value | None:
    """``a`` when ``v`` is ``transpose(a, perm)``."""
    if v.node is not None and v.node.op == "transpose" and v.node.attrs["perm"] == perm:
        return v.node.inputs[0]
    return None


def to_channels_last(graph: Graph) -> Graph:
    """Rewrite convolutions and pools to NHWC (see the module docs)."""

    def rewrite(node: Node, ins: list[Value], g: Graph) -> Value | None:
        if node.op not in SPATIAL or node.attrs.get("layout", "nchw") != "nchw":
            return None
        x = ins[0]
        inner = _inner_transpose(x, TO_NCHW)
        xh = inner if inner is not None else _t(g, x, TO_NHWC, node.loc)
        rest = []
        if node.op == "conv2d":
            w = node.inputs[1]
            wn = w.node
            if wn is None or wn.op != "weight":
                return None  # activations as weights: keep NCHW
            recipe = wn.attrs["recipe"]
            src = wn.attrs["name"] if recipe is None else recipe
            wh = g.add(
                "weight", (), shape=tuple(w.shape[p] for p in TO_NHWC), dtype=w.dtype,
                name=f"{wn.attrs['name']}.nhwc", recipe=("transpose", src, TO_NHWC),
            )  # fmt: skip
            rest.append(wh)
            k = 2
            if node.attrs.get("has_bias"):
                rest.append(ins[k])
                k += 1
            if node.attrs.get("has_residual"):
                r = ins[k]
                ri = _inner_transpose(r, TO_NCHW)
                rest.append(ri if ri is not None else _t(g, r, TO_NHWC, node.loc))
        y = g.add(node.op, [xh, *rest], node.loc, **dict(node.attrs, layout="nhwc"))
        return _t(g, y, TO_NCHW, node.loc)

    return sink_transposes(rebuild(graph, rewrite))


def sink_transposes(graph: Graph) -> Graph:
    """Push transposes below elementwise nodes whose tensor inputs are all the same transpose
    (or scalars), and cancel transpose pairs; then drop dead nodes."""

    def rewrite(node: Node, ins: list[Value], g: Graph) -> Value | None:
        if node.op == "transpose":
            src = ins[0]
            if src.node is not None and src.node.op == "transpose":
                inner, outer = src.node.attrs["perm"], node.attrs["perm"]
                perm = tuple(inner[p] for p in outer)
                if perm == tuple(range(len(perm))):
                    return src.node.inputs[0]
                return g.add("transpose", [src.node.inputs[0]], node.loc, perm=perm)
            return None
        if node.kind != "elementwise" or not ins:
            return None
        perm = None
        for v in ins:
            if v.ndim == 0:
                continue
            if v.node is None or v.node.op != "transpose":
                return None
            if perm is not None and v.node.attrs["perm"] != perm:
                return None
            perm = v.node.attrs["perm"]
        if perm is None:
            return None
        new_ins = [v if v.ndim == 0 else v.node.inputs[0] for v in ins]
        y = g.add(node.op, new_ins, node.loc, **node.attrs)
        return g.add("transpose", [y], node.loc, perm=perm)

    return dce(rebuild(graph, rewrite))
