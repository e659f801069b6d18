"""Fusion: partition a graph into kernels.

Every value that must live in memory is *materialized*: graph inputs, captured constants,
graph outputs, and values the planner or the code generator decides to store (see
:class:`Materialize`). Every other value is computed inside the kernel that needs it.

Each materialized value (a *root*) gets a kernel of one of four kinds, by what its
expression tree contains:

- ``pointwise``: only elementwise, view and index ops: one thread per output element;
- ``rows``: reductions over one (shape, axes) domain: the softmax / norm pattern, where the
  elementwise producers, the reductions and the elementwise consumers run in one kernel;
- ``matmul``: a matrix product with its elementwise epilogue (bias, activation, residual);
- ``torch``: a matrix product the generated kernels do not cover (int, float64), run by torch.

Roots of the same domain join one kernel when the order of kernels allows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..ir import Graph, Node, Value
from ..ir.ops import VIEWS


class Materialize(Exception):  # noqa: N818  (control flow, never escapes the planner)
    """Raised while planning or generating code: ``value`` must be stored in memory."""

    def __init__(self, value: Value, why: str) -> None:
        super().__init__(why)
        self.value = value


@dataclass
class KernelGroup:
    """One kernel: the roots it stores and the domain it iterates over."""

    kind: str  # pointwise | rows | matmul | torch
    roots: list[Value]
    shape: tuple[int, ...]  # pointwise/matmul/torch: the output shape; rows: the reduced input's
    axes: tuple[int, ...] = ()  # rows: the reduced axes
    node: Node | None = None  # matmul / torch: the matmul node
    reductions: list[Node] = field(default_factory=list)  # rows: in dependency order

    @property
    def domain(self) -> tuple:
        return (self.kind, self.shape, self.axes)


@dataclass
class Plan:
    """A graph partitioned into kernels, in execution order."""

    graph: Graph
    groups: list[KernelGroup]
    materialized: set[int]  # id(value) of every value held in memory
    #: the stored values kernels read from memory; other stored values (results) are also
    #: recomputed inline by kernels that need them, so results do not split kernels
    barrier: set[int]

    def kernel_count(self) -> int:
        return len(self.groups)

    def describe(self) -> str:
        lines = []
        for i, g in enumerate(self.groups):
            roots = ", ".join(f"%{v.id}" for v in g.roots)
            where = f" axes={g.axes}" if g.kind == "rows" else ""
            lines.append(f"kernel {i}: {g.kind} over {list(g.shape)}{where} -> {roots}")
        return "\n".join(lines)


def _tree(root: Value, stop: set[int]) -> list[Node]:
    """The nodes computed inline for ``root`` (not crossing materialized values), in graph
    order."""
    seen: dict[int, Node] = {}
    todo = [root]
    while todo:
        v = todo.pop()
        node = v.node
        if node is None or id(node) in seen:
            continue
        seen[id(node)] = node
        todo.extend(u for u in node.inputs if id(u) not in stop)
    return list(seen.values())


def _matmul_operand_ok(v: Value, materialized: set[int]) -> bool:
    """Matmul operands are read through views and casts of stored values only: anything else
    would be recomputed once per output tile."""
    while id(v) not in materialized:
        if v.node is None or v.node.op not in (*VIEWS, "cast"):
            return False
        v = v.node.inputs[0]
    return True


def _generated_matmul(node: Node) -> bool:
    """Whether the generated matmul kernel covers this node (else torch runs it)."""
    return node.output.dtype in ("float16", "bfloat16", "float32")


def plan(graph: Graph, forced: set[int] = frozenset()) -> Plan:
    """Partition ``graph`` into kernels; ``forced`` names more values to materialize. Raises
    :class:`Materialize` when a value must be added to ``forced`` (callers loop, see
    :func:`kernforge.codegen.lower`)."""
    order = {id(n.output): i for i, n in enumerate(graph.nodes)}
    mat = {id(v) for v in graph.inputs} | set(forced)
    mat |= {id(n.output) for n in graph.nodes if n.op == "constant"}
    for node in graph.nodes:
        if node.op == "matmul":
            if not _generated_matmul(node):
                mat.add(id(node.output))
            for operand in node.inputs:
                if not _matmul_operand_ok(operand, mat) or not _generated_matmul(node):
                    mat.add(id(operand))
    barrier = set(mat)
    mat |= {id(v) for v in graph.outputs}
    roots = sorted(
        (v for n in graph.nodes for v in [n.output] if id(v) in mat and n.op != "constant"),
        key=lambda v: order[id(v)],
    )
    groups: list[KernelGroup] = []
    producer: dict[int, int] = {}  # id(value) -> index of the group that stores it
    claimed: dict[int, int] = {}  # id(reduction/matmul node) -> group index computing it
    for root in roots:
        group = _group_for(root, barrier)
        # Join an existing group of the same domain when every stored value the root reads
        # comes from before that group (or from it).
        reads = [
            id(u)
            for n in _tree(root, barrier - {id(root)})
            for u in n.inputs
            if id(u) in barrier and id(u) != id(root)
        ]
        same = [gi for gi, g in enumerate(groups) if g.domain == group.domain]
        target = None
        mergeable = same and group.kind in ("pointwise", "rows")
        if mergeable and all(producer.get(r, -1) <= same[-1] for r in reads):
            target = same[-1]
        if target is None:
            groups.append(group)
            target = len(groups) - 1
        else:
            groups[target].roots.append(root)
            known = {id(n) for n in groups[target].reductions}
            groups[target].reductions += [n for n in group.reductions if id(n) not in known]
        producer[id(root)] = target
        for n in _tree(root, barrier - {id(root)}):
            if n.kind in ("reduce", "matmul") and claimed.setdefault(id(n), target) != target:
                raise Materialize(n.output, f"{n.op} is read by two kernels")
    for g in groups:
        g.reductions.sort(key=lambda n: order[id(n.output)])
    return Plan(graph, groups, mat, barrier)


def _group_for(root: Value, mat: set[int]) -> KernelGroup:
    node = root.node
    assert node is not None
    if node.op == "matmul" and not _generated_matmul(node):
        return KernelGroup("torch", [root], root.shape, node=node)
    tree = _tree(root, mat - {id(root)})
    matmuls = [n for n in tree if n.op == "matmul"]
    reductions = [n for n in tree if n.kind == "reduce"]
    if matmuls:
        mm = matmuls[0]
        if len(matmuls) > 1 or reductions or root.shape != mm.output.shape:
            raise Materialize(mm.output, "matmul output feeds more than an elementwise epilogue")
        return KernelGroup("matmul", [root], root.shape, node=mm)
    if not reductions:
        return KernelGroup("pointwise", [root], root.shape)
    first = min(reductions, key=lambda n: n.output.id)
    shape, axes = first.inputs[0].shape, first.attrs["axes"]
    for r in reductions:
        if (r.inputs[0].shape, r.attrs["axes"]) != (shape, axes):
            raise Materialize(r.output, "reduction over another domain")
    kept = tuple(n for i, n in enumerate(shape) if i not in axes)
    kept_keep = tuple(1 if i in axes else n for i, n in enumerate(shape))
    if root.shape not in (shape, kept, kept_keep):
        raise Materialize(first.output, f"result of shape {root.shape} fits no row domain")
    return KernelGroup("rows", [root], shape, tuple(axes), reductions=reductions)
