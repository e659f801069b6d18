"""Partitioning a model graph into what runs it.

:func:`schedule` reorders the nodes (a valid topological order) so that elementwise work sits
together: list scheduling that keeps emitting nodes of the class it emitted last. Then
:func:`partition` cuts the node list into *partitions*: maximal runs of nodes kernforge runs
(``kernel`` partitions) and runs of ``fallback`` nodes (torch, on the same device). Inside a
kernel partition each catalog node is one step, and each maximal run of elementwise, reduction,
view, index and matmul nodes is one ``fused`` step (kf.jit's fusion and codegen turn it into
generated Triton kernels), or a ``view`` step when it only reshapes (torch views, no kernel).
Both are pure functions of the graph, so a loaded program partitions exactly as it compiled.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from ..ir import Graph, Node, Value

FUSIBLE_KINDS = ("elementwise", "reduce", "view", "index", "create", "matmul")


def node_class(node: Node) -> str:
    """``weight`` | ``fused`` | ``catalog`` | ``fallback``."""
    k = node.kind
    if k == "weight":
        return "weight"
    if k in FUSIBLE_KINDS:
        return "fused"
    return k


def _free(node: Node) -> bool:
    """Nodes with no inputs that are placed lazily (weights first, constants by their use)."""
    return node.kind in ("weight", "create")


def schedule(graph: Graph) -> list[Node]:
    """The graph's nodes in an order that clusters fusible nodes (see the module docs)."""
    index = {id(n): i for i, n in enumerate(graph.nodes)}
    deps: dict[int, int] = {}
    users: dict[int, list[Node]] = {}
    for n in graph.nodes:
        if _free(n):
            continue
        preds = {id(v.node) for v in n.inputs if v.node is not None and not _free(v.node)}
        deps[id(n)] = len(preds)
        for p in preds:
            users.setdefault(p, []).append(n)
    ready: dict[str, list[tuple[int, int]]] = {}
    by_id = {id(n): n for n in graph.nodes}

    def push(n: Node) -> None:
        heapq.heappush(ready.setdefault(node_class(n), []), (index[id(n)], id(n)))

    for n in graph.nodes:
        if not _free(n) and deps[id(n)] == 0:
            push(n)
    order: list[Node] = [n for n in graph.nodes if n.kind == "weight"]
    placed: set[int] = {id(n) for n in order}
    last = "fused"
    while any(ready.values()):
        heap = ready.get(last) or min((h for h in ready.values() if h), key=lambda h: h[0])
        _, nid = heapq.heappop(heap)
        n = by_id[nid]
        for v in n.inputs:  # constants go right before their first reader
            if v.node is not None and id(v.node) not in placed and _free(v.node):
                order.append(v.node)
                placed.add(id(v.node))
        order.append(n)
        placed.add(nid)
        last = node_class(n)
        for u in users.get(nid, []):
            deps[id(u)] -= 1
            if deps[id(u)] == 0:
                push(u)
    for n in graph.nodes:  # constants no node reads (graph outputs)
        if id(n) not in placed:
            order.append(n)
    return order


@dataclass
class Step:
    """One unit of execution: ``catalog`` (one node), ``fused`` (generated kernels),
    ``view`` (torch reshapes) or ``fallback`` (one torch op)."""

    kind: str
    nodes: list[Node]
    inputs: list[Value] = field(default_factory=list)  # values it reads from other steps
    outputs: list[Value] = field(default_factory=list)  # values other steps or the caller read

    @property
    def label(self) -> str:
        if self.kind in ("catalog", "fallback"):
            n = self.nodes[0]
            return n.attrs["target"] if n.op == "fallback" else n.op
        return f"{self.kind}[{len(self.nodes)} ops]"


@dataclass
class Partition:
    kind: str  # kernel | fallback
    steps: list[Step]


def partition(graph: Graph) -> list[Partition]:
    """Cut ``graph`` into partitions of steps (see the module docs)."""
    order = schedule(graph)
    runs: list[tuple[str, list[Node]]] = []
    for n in order:
        cls = node_class(n)
        if cls == "weight":
            continue
        if cls in ("catalog", "fallback") or not runs or runs[-1][0] != "fused":
            runs.append((cls, [n]))
        else:
            runs[-1][1].append(n)
    # Which values each run must hand on: read by a later run or returned.
    reader_runs: dict[int, set[int]] = {}
    for ri, (_, nodes) in enumerate(runs):
        for n in nodes:
            for v in n.inputs:
                reader_runs.setdefault(id(v), set()).add(ri)
    outs = {id(v) for v in graph.outputs}
    parts: list[Partition] = []
    for ri, (cls, nodes) in enumerate(runs):
        mine = {id(n.output) for n in nodes}
        # Constants (full, iota) are recomputed by each fused step that reads them.
        step_nodes = list(nodes)
        if cls == "fused":
            extra = [
                v.node
                for n in nodes
                for v in n.inputs
                if id(v) not in mine and v.node is not None and v.node.kind == "create"
            ]
            seen: set[int] = set()
            extra = [c for c in extra if not (id(c) in seen or seen.add(id(c)))]
            step_nodes = extra + step_nodes
            mine |= {id(c.output) for c in extra}
        inputs: list[Value] = []
        seen_in: set[int] = set()
        for n in step_nodes:
            for v in n.inputs:
                if id(v) not in mine and id(v) not in seen_in:
                    seen_in.add(id(v))
                    inputs.append(v)
        outputs = [
            n.output
            for n in nodes
            if id(n.output) in outs or reader_runs.get(id(n.output), set()) - {ri}
        ]
        kind = cls
        if cls == "fused" and all(n.op in ("reshape", "alias") for n in nodes):
            kind = "view"
        step = Step(kind, step_nodes, inputs, outputs)
        pkind = "fallback" if cls == "fallback" else "kernel"
        if parts and parts[-1].kind == pkind:
            parts[-1].steps.append(step)
        else:
            parts.append(Partition(pkind, [step]))
    return parts


def subgraph(step: Step, name: str) -> Graph:
    """A fused step as a graph of its own: its inputs, its nodes, its outputs."""
    g = Graph(name)
    new: dict[int, Value] = {}
    for v in step.inputs:
        new[id(v)] = g.input(v.shape, v.dtype, f"in{len(new)}")
    for n in step.nodes:
        new[id(n.output)] = g.add(n.op, [new[id(v)] for v in n.inputs], n.loc, **n.attrs)
    g.set_outputs(new[id(v)] for v in step.outputs)
    return g
