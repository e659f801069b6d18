"""Code generation: fused kernel groups to Triton source (see ``docs/jit.md``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..ir import Graph, Value
from ..passes.fuse import KernelGroup, Materialize, Plan, plan
from .triton import KernelSource, generate

__all__ = ["KernelSource", "Lowered", "contiguous_strides", "generate", "lower"]


def contiguous_strides(shape) -> tuple[int, ...]:
    """Row-major strides, in elements, of a contiguous array of ``shape``."""
    out, acc = [], 1
    for n in reversed(shape):
        out.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(out))


@dataclass
class Lowered:
    """A graph partitioned into kernels, with each kernel's source (None for ``torch`` groups
    and for groups with nothing to compute)."""

    plan: Plan
    sources: list[KernelSource | None]

    def source(self) -> str:
        """Every generated kernel's source, in launch order."""
        return "\n\n".join(s.source for s in self.sources if s is not None)


def lower(graph: Graph, input_strides: list[tuple[int, ...]], interpret: bool) -> Lowered:
    """Partition ``graph`` and generate each kernel, storing more values whenever a kernel
    cannot compute one inline (each retry stores one more value, so this ends)."""
    forced: set[int] = set()
    while True:
        try:
            p = plan(graph, forced)
            layouts: dict[int, tuple] = {
                id(v): (v.shape, tuple(s)) for v, s in zip(graph.inputs, input_strides, strict=True)
            }
            for node in graph.nodes:
                if id(node.output) in p.materialized:
                    layouts.setdefault(id(node.output), _contiguous(node.output))
            sources = [
                _generate(g, p, layouts, interpret, f"{graph.name}_k{i}")
                for i, g in enumerate(p.groups)
            ]
            return Lowered(p, sources)
        except Materialize as m:
            if id(m.value) in forced or m.value.node is None:
                raise AssertionError(f"planner loop on {m.value!r}: {m}") from m
            forced.add(id(m.value))


def _contiguous(v: Value) -> tuple:
    return (v.shape, contiguous_strides(v.shape))


def _generate(g: KernelGroup, p: Plan, layouts, interpret: bool, name: str) -> KernelSource | None:
    if g.kind == "torch" or all(math.prod(r.shape) == 0 for r in g.roots):
        return None
    stop = p.barrier - {id(r) for r in g.roots}
    return generate(g, stop, layouts, interpret, _safe(name))


def _safe(name: str) -> str:
    out = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
    return out if out[:1].isalpha() else f"k_{out}"
