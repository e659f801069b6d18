"""Pattern fusion onto catalog ops. Each pass is a pure ``Graph -> Graph``.

- :func:`fuse_conv_epilogue`: ``conv2d`` followed by a residual ``add`` and/or ReLU
  (``maximum(x, 0)``) becomes one conv2d with ``has_residual``/``activation`` attributes (the
  epilogue computes ``act(conv + bias + residual)``, ResNet's order);
- :func:`fuse_linear_epilogue`: ``linear`` followed by a bias add, ReLU / SiLU (``x *
  sigmoid(x)``) / tanh-GELU and then a residual ``add`` becomes one linear with the GEMM
  epilogue (``act(x @ w.T + b) + residual``, ``ops.matmul``'s order);
- :func:`match_rms_norm`: the decomposed RMSNorm of Hugging Face models (``x *
  rsqrt(mean(x*x) + eps) * w``, with its casts) becomes one ``rms_norm``;
- :func:`match_attention`: ``softmax(q @ k^T * scale) @ v`` becomes ``sdpa`` (run by fmha).

A match only fires when every intermediate value has no other reader, so nothing is computed
twice. ``count_patterns`` is what ``describe()`` reports.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from typing import Any

from ..ir import Graph, Node, Value
from .simplify import dce, rebuild


def _single_user(v: Value, users: dict[int, list[Node]], graph: Graph) -> Node | None:
    us = users.get(id(v), [])
    if len(us) != 1 or any(o is v for o in graph.outputs):
        return None
    return us[0]


def _full(v: Value, value: float | None = None) -> bool:
    if v.node is None or v.node.op != "full" or v.shape not in ((), (1,)):
        return False
    return value is None or v.node.attrs["value"] == value


def _is_relu(node: Node, x: Value) -> bool:
    if node.op != "maximum":
        return False
    a, b = node.inputs
    return (a is x and _full(b, 0)) or (b is x and _full(a, 0))


def _other(node: Node, x: Value) -> Value:
    a, b = node.inputs
    return b if a is x else a


def fuse_conv_epilogue(graph: Graph) -> Graph:
    """conv2d [+ residual add] [+ ReLU] -> one conv2d with its epilogue (see module docs)."""
    users = graph.users()
    plans: dict[int, tuple[Value | None, str | None, Value]] = {}  # conv -> (res, act, last)
    for node in graph.nodes:
        if node.op != "conv2d" or node.attrs.get("has_residual") or node.attrs.get("activation"):
            continue
        last, res, act = node.output, None, None
        nxt = _single_user(last, users, graph)
        if nxt is not None and nxt.op == "add":
            r = _other(nxt, last)
            if r.shape == last.shape and r.dtype == last.dtype and r is not last:
                res, last = r, nxt.output
                nxt = _single_user(last, users, graph)
        if nxt is not None and _is_relu(nxt, last):
            act, last = "relu", nxt.output
        if last is not node.output:
            plans[id(node)] = (res, act, last)
    return _apply(graph, plans, "conv2d")


def _gelu_tanh_root(x: Value, users: dict[int, list[Node]], graph: Graph) -> Value | None:
    """The output of the importer's tanh-GELU expansion of ``x`` (see importer.gelu), when
    every intermediate is private to it."""
    us = users.get(id(x), [])
    ops = sorted(n.op for n in us)
    if ops.count("mul") < 2 or not any(n.op == "add" for n in us):
        return None
    half = [n for n in us if n.op == "mul" and any(_full(i, 0.5) for i in n.inputs)]
    if len(half) != 1:
        return None
    final = _single_user(half[0].output, users, graph)
    if final is None or final.op != "mul":
        return None
    t = _other(final, half[0].output)
    if (
        t.node is None
        or t.node.op != "add"
        or not any(i.node is not None and i.node.op == "tanh" for i in t.node.inputs)
    ):
        return None
    return final.output


def fuse_linear_epilogue(graph: Graph) -> Graph:
    """linear [+ bias add] [+ relu/silu/gelu] [+ residual add] -> one linear (GEMM epilogue)."""
    users = graph.users()
    plans: dict[int, tuple[Value | None, str | None, Value]] = {}
    for node in graph.nodes:
        if node.op != "linear" or node.attrs.get("has_residual") or node.attrs.get("activation"):
            continue
        last, res, act = node.output, None, None
        nxt = _single_user(last, users, graph)
        us = users.get(id(last), [])
        if nxt is not None and _is_relu(nxt, last):
            act, last = "relu", nxt.output
        elif len(us) == 2 and {n.op for n in us} == {"mul", "sigmoid"}:
            sig = next(n for n in us if n.op == "sigmoid")
            mul = next(n for n in us if n.op == "mul")
            if sig.output in mul.inputs and _single_user(sig.output, users, graph) is mul:
                act, last = "silu", mul.output
        else:
            g_out = _gelu_tanh_root(last, users, graph)
            if g_out is not None:
                act, last = "gelu", g_out
        nxt = _single_user(last, users, graph)
        if nxt is not None and nxt.op == "add":
            r = _other(nxt, last)
            if r.shape == last.shape and r.dtype == last.dtype and r is not last:
                res, last = r, nxt.output
        if last is not node.output:
            plans[id(node)] = (res, act, last)
    return _apply(graph, plans, "linear")


def _apply(graph: Graph, plans: dict, op: str) -> Graph:
    """Rebuild with each planned node replaced by its fused form, which stands for ``last``.
    The fused node is emitted where ``last`` was (its residual is defined by then)."""
    pending: dict[int, tuple[Node, tuple]] = {}
    for node in graph.nodes:
        if id(node) in plans:
            pending[id(plans[id(node)][2])] = (node, plans[id(node)])

    def make(got: tuple, node: Node, new: Callable[[Value], Value], g: Graph) -> Value:
        base, (res, act, _) = got
        attrs = dict(base.attrs)
        extra = []
        if res is not None:
            attrs["has_residual"] = True
            extra.append(new(res))
        if act is not None:
            attrs["activation"] = act
        return g.add(op, [*map(new, base.inputs), *extra], base.loc, **attrs)

    return _replace(graph, pending, make)


#: ``make(plan, node, new, g)``: the new graph's value that replaces ``node`` (see _replace).
Make = Callable[[Any, Node, Callable[[Value], Value], Graph], Value]


def _replace(graph: Graph, found: dict[int, Any], make: Make) -> Graph:
    """Rebuild ``graph`` with ``make(found[id(v)], node, new, g)`` in place of each ``node``
    whose output ``v`` is a key of ``found`` (other nodes are copied); ``new(v)`` is old value
    ``v``'s value in the new graph. What the replacements leave unused is dropped."""
    lookup: dict[int, Value] = {}  # rebuild() maps old values to new: recorded as it goes

    def recording(node: Node, ins: list[Value], g: Graph) -> Value:
        if not lookup:  # the first call: rebuild() has made the inputs
            lookup.update((id(old), new) for old, new in zip(graph.inputs, g.inputs, strict=True))
        for old, new in zip(node.inputs, ins, strict=True):
            lookup[id(old)] = new
        got = found.get(id(node.output))
        if got is None:
            out = g.add(node.op, ins, node.loc, **node.attrs)
        else:
            out = make(got, node, lambda v: lookup[id(v)], g)
        lookup[id(node.output)] = out
        return out

    return dce(rebuild(graph, recording))


# -- RMSNorm -------------------------------------------------------------------------------


def _through_cast(v: Value) -> Value:
    while v.node is not None and v.node.op == "cast":
        v = v.node.inputs[0]
    return v


def match_rms_norm(graph: Graph) -> Graph:
    """``w * cast(h * rsqrt(mean(h*h, -1) + eps))`` (h = cast(x) to float32) -> rms_norm(x, w).
    The HF form computes in float32 and rounds to x's dtype before the weight multiply: the
    catalog kernel does the same (fp32 math, one rounding) up to that one extra rounding."""
    users = graph.users()
    found: dict[int, tuple[Value, Value | None, float]] = {}  # id(final) -> (x, w, eps)
    for node in graph.nodes:
        if node.op != "rsqrt":
            continue
        add = node.inputs[0].node
        if add is None or add.op != "add":
            continue
        ms, eps_v = add.inputs if not _full(add.inputs[0]) else add.inputs[::-1]
        if not _full(eps_v) or ms.node is None or ms.node.op != "mul":
            continue
        s, inv = ms.node.inputs if not _full(ms.node.inputs[0]) else ms.node.inputs[::-1]
        if not _full(inv) or s.node is None or s.node.op != "sum":
            continue
        sq = s.node.inputs[0].node
        h = s.node.inputs[0]
        if sq is None or sq.op != "mul" or sq.inputs[0] is not sq.inputs[1]:
            continue
        h = sq.inputs[0]
        n = h.shape[-1] if h.shape else 1
        if s.node.attrs["axes"] != (h.ndim - 1,) or not math.isclose(
            inv.node.attrs["value"], 1.0 / n, rel_tol=1e-6
        ):
            continue
        norm = [u for u in users.get(id(node.output), []) if u.op == "mul" and h in u.inputs]
        if len(norm) != 1:
            continue
        y = norm[0].output
        final, w = y, None
        nxt = _single_user(y, users, graph)
        if nxt is not None and nxt.op == "cast":
            final = nxt.output
            nxt = _single_user(final, users, graph)
        x = _through_cast(h)
        if nxt is not None and nxt.op == "mul":
            cand = _other(nxt, final)
            if cand.shape == (h.shape[-1],) and cand.node is not None and cand.node.op == "weight":
                w, final = cand, nxt.output
        if final.dtype != x.dtype or final.shape != x.shape:
            continue
        if w is not None and w.dtype != x.dtype:
            continue
        found[id(final)] = (x, w, float(eps_v.node.attrs["value"]))
    if not found:
        return graph

    def make(got: tuple, node: Node, new: Callable[[Value], Value], g: Graph) -> Value:
        x, w, eps = got
        xs = [new(x)] + ([new(w)] if w is not None else [])
        return g.add("rms_norm", xs, node.loc, eps=eps, has_weight=w is not None)

    return _replace(graph, found, make)


# -- attention -----------------------------------------------------------------------------


def match_attention(graph: Graph) -> Graph:
    """``matmul(softmax(matmul(q, transpose(k)) * scale), v)`` over [B, H, S, D] -> sdpa."""
    users = graph.users()
    found: dict[int, tuple] = {}
    for node in graph.nodes:
        if node.op != "matmul" or node.output.ndim != 4:
            continue
        p, v = node.inputs
        sm = p.node
        if sm is None or sm.op != "softmax" or sm.attrs["axis"] != 3:
            continue
        if _single_user(p, users, graph) is not node:
            continue
        s = sm.inputs[0]
        scale = 1.0
        if s.node is not None and s.node.op == "mul" and any(_full(i) for i in s.node.inputs):
            c = next(i for i in s.node.inputs if _full(i))
            scale, s = float(c.node.attrs["value"]), _other(s.node, c)
        qk = s.node
        if qk is None or qk.op != "matmul":
            continue
        q, kt = qk.inputs
        if kt.node is None or kt.node.op != "transpose" or kt.node.attrs["perm"] != (0, 1, 3, 2):
            continue
        k = kt.node.inputs[0]
        if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
            continue
        found[id(node.output)] = (q, k, v, scale)
    if not found:
        return graph

    def make(got: tuple, node: Node, new: Callable[[Value], Value], g: Graph) -> Value:
        q, k, v, scale = got
        return g.add("sdpa", [new(q), new(k), new(v)], node.loc, causal=False, scale=scale,
                     has_mask=False)  # fmt: skip

    return _replace(graph, found, make)


def count_patterns(graph: Graph) -> dict[str, int]:
    """How many fused epilogues and matched catalog patterns ``graph`` holds."""
    c: Counter[str] = Counter()
    for n in graph.nodes:
        if n.op in ("conv2d", "linear"):
            parts = []
            if n.attrs.get("has_bias"):
                parts.append("bias")
            if n.attrs.get("has_residual"):
                parts.append("residual")
            if n.attrs.get("activation"):
                parts.append(n.attrs["activation"])
            c["+".join([n.op, *parts])] += 1
        elif n.op in ("rms_norm", "sdpa", "layer_norm", "softmax"):
            c[n.op] += 1
    return dict(sorted(c.items()))
