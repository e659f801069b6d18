"""Activation memory planning: every intermediate value of a program gets a byte offset into
one arena, and values whose lifetimes do not overlap share bytes.

A value is *live* from the step that writes it to the last step that reads it, both included
(a kernel that reads ``a`` and writes ``b`` needs both at once, so they never share bytes).
Offsets are chosen greedily, biggest buffer first, each into the smallest gap left between the
buffers already placed whose lifetimes overlap its own (best fit), else on top of them: the
"greedy by size" planner of TFLite and PyTorch's static runtimes, which lands within a few
percent of the lower bound (the most bytes live at any one step) on real networks.

Graph inputs and outputs, weights and constants are not in the arena: the caller owns the
inputs, the outputs are handed back to the caller (so they cannot be reused by the next call),
and weights live as long as the program. A value that is a view of another (the executor says
which, through ``aliases``) has no bytes of its own: it shares its base's storage, and keeps
the base alive as long as the view is used.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ArgumentError
from ..ir import Graph, dtypes

#: Byte alignment of every buffer in the arena: enough for 16-byte vector loads, TMA's
#: 128-byte rule and whole 256-byte cache sectors.
ALIGNMENT = 256
#: Ops whose values are never in the arena (they live as long as the program).
PERSISTENT_OPS = ("weight", "constant")

#: One launch in execution order: the value ids it reads and the value ids it writes.
Step = tuple[Iterable[int], Iterable[int]]


@dataclass
class BufferPlan:
    """Where each intermediate value lives in the activation arena.

    ``offsets``/``sizes``: byte offset and (aligned) byte size per value id in the arena;
    ``lifetimes``: the first and last step (inclusive) each arena value is live;
    ``views``: value id -> the id of the arena value whose storage it shares;
    ``arena_bytes``: the arena's size (the peak activation memory);
    ``no_reuse_bytes``: the arena size if no two values shared bytes (for comparison);
    ``live_bytes``: the most bytes live at one step, a lower bound on ``arena_bytes``.
    """

    offsets: dict[int, int] = field(default_factory=dict)
    sizes: dict[int, int] = field(default_factory=dict)
    lifetimes: dict[int, tuple[int, int]] = field(default_factory=dict)
    views: dict[int, int] = field(default_factory=dict)
    arena_bytes: int = 0
    no_reuse_bytes: int = 0
    live_bytes: int = 0
    alignment: int = ALIGNMENT

    @property
    def reuse_ratio(self) -> float:
        """``no_reuse_bytes / arena_bytes`` (1.0 when nothing is shared or nothing is stored)."""
        return self.no_reuse_bytes / self.arena_bytes if self.arena_bytes else 1.0

    def storage(self, value_id: int) -> int | None:
        """The arena value whose bytes ``value_id`` uses (itself, or its base when it is a
        view), or None when it is not in the arena (input, output, weight)."""
        base = self.views.get(value_id, value_id)
        return base if base in self.offsets else None

    def check(self) -> None:
        """Raise ArgumentError when two values live at the same step share a byte, or a
        buffer breaks the alignment (a planner bug; tests call this)."""
        items = sorted(self.offsets, key=lambda v: self.offsets[v])
        for i, a in enumerate(items):
            if self.offsets[a] % self.alignment:
                raise ArgumentError(f"buffer %{a} at offset {self.offsets[a]} is not aligned")
            if self.offsets[a] + self.sizes[a] > self.arena_bytes:
                raise ArgumentError(f"buffer %{a} ends past the arena ({self.arena_bytes} B)")
            for b in items[i + 1 :]:
                if self.offsets[b] >= self.offsets[a] + self.sizes[a]:
                    break
                if self.sizes[b] and _overlap(self.lifetimes[a], self.lifetimes[b]):
                    raise ArgumentError(
                        f"buffers %{a} and %{b} overlap in memory while both are live "
                        f"(lifetimes {self.lifetimes[a]} and {self.lifetimes[b]})"
                    )

    def describe(self) -> str:
        """One line: values, arena size, the no-reuse size and the lower bound."""
        return (
            f"{len(self.offsets)} activation buffers ({len(self.views)} views) in one "
            f"{_mib(self.arena_bytes)} arena; without reuse {_mib(self.no_reuse_bytes)}, "
            f"most live at once {_mib(self.live_bytes)}"
        )

    def to_json(self) -> dict[str, Any]:
        """The plan as JSON-able data (value ids become string keys)."""
        return {
            "alignment": self.alignment,
            "arena_bytes": self.arena_bytes,
            "no_reuse_bytes": self.no_reuse_bytes,
            "live_bytes": self.live_bytes,
            "buffers": {
                str(v): [self.offsets[v], self.sizes[v], *self.lifetimes[v]] for v in self.offsets
            },
            "views": {str(v): b for v, b in self.views.items()},
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> BufferPlan:
        """Rebuild a plan written by :meth:`to_json`."""
        plan = cls(
            alignment=int(doc["alignment"]),
            arena_bytes=int(doc["arena_bytes"]),
            no_reuse_bytes=int(doc["no_reuse_bytes"]),
            live_bytes=int(doc["live_bytes"]),
        )
        for k, (off, size, first, last) in doc["buffers"].items():
            plan.offsets[int(k)], plan.sizes[int(k)] = int(off), int(size)
            plan.lifetimes[int(k)] = (int(first), int(last))
        plan.views = {int(k): int(b) for k, b in doc["views"].items()}
        return plan

    def tensors(self, arena: Any, graph: Graph) -> dict[int, Any]:
        """Torch views into ``arena`` (a uint8 tensor of at least ``arena_bytes``) for every
        arena value and view of ``graph``, by value id, each contiguous in its own shape and
        dtype. (Views get their base's bytes reinterpreted; the executor makes the real
        view from the base when the layout differs.)"""
        from ..frontend.dtypes import to_torch

        if arena.numel() < self.arena_bytes:
            raise ArgumentError(
                f"arena has {arena.numel()} bytes, the plan needs {self.arena_bytes}"
            )
        out: dict[int, Any] = {}
        for v in _values(graph):
            base = self.storage(v.id)
            if base is None:
                continue
            nbytes = v.size * dtypes.ITEMSIZE[v.dtype]
            raw = arena[self.offsets[base] : self.offsets[base] + nbytes]
            out[v.id] = raw.view(to_torch(v.dtype)).view(v.shape)
        return out


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _values(graph: Graph):
    yield from graph.inputs
    for node in graph.nodes:
        yield node.output


def nbytes(shape: Sequence[int], dtype: str) -> int:
    """Bytes of a contiguous array of ``shape`` and IR ``dtype``."""
    n = dtypes.ITEMSIZE[dtype]
    for d in shape:
        n *= d
    return n


def _align(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def plan_buffers(
    graph: Graph,
    *,
    steps: Sequence[Step] | None = None,
    stored: Iterable[int] | None = None,
    aliases: Mapping[int, int] | None = None,
    alignment: int = ALIGNMENT,
) -> BufferPlan:
    """Plan the activation arena of ``graph``.

    ``steps``: the launches in execution order, each ``(ids read, ids written)``; default one
    step per node (its inputs, its output), for an executor that runs node by node. A fused
    kernel is one step: everything it reads and writes is live across it.
    ``stored``: the ids of values kept in memory (default: every value a step writes);
    values computed inside a kernel and never stored need no buffer.
    ``aliases``: view id -> id of the value whose storage it shares (the executor decides which
    views it makes without a copy); chains are followed to the base.
    Inputs, outputs, weights and constants, and views of them, are left out of the arena.
    """
    if alignment <= 0 or alignment & (alignment - 1):
        raise ArgumentError(f"alignment must be a power of two, got {alignment}")
    by_id = {}
    for v in _values(graph):
        if v.id in by_id:
            raise ArgumentError(f"graph {graph.name!r} has two values with id {v.id}")
        by_id[v.id] = v
    if steps is None:
        steps = [([v.id for v in n.inputs], [n.output.id]) for n in graph.nodes]
    steps = [(list(r), list(w)) for r, w in steps]
    aliases = dict(aliases or {})
    for view, base in aliases.items():
        if view not in by_id or base not in by_id:
            missing = view if view not in by_id else base
            raise ArgumentError(f"aliases name value %{missing}, which is not in the graph")

    def root(v: int) -> int:
        seen = set()
        while v in aliases:
            if v in seen:
                raise ArgumentError(f"aliases form a cycle through value %{v}")
            seen.add(v)
            v = aliases[v]
        return v

    # Values that must not be in the arena, and every view of them.
    outside = {v.id for v in graph.inputs} | {v.id for v in graph.outputs}
    outside |= {n.output.id for n in graph.nodes if n.op in PERSISTENT_OPS}
    outside |= {root(v.id) for v in graph.outputs}  # an output's base is the output's storage
    written = [w for _, ws in steps for w in ws]
    candidates = set(written) if stored is None else set(stored)
    # First write and last use of each storage root, views' uses counted on their root.
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for i, (reads, writes) in enumerate(steps):
        for w in writes:
            r = root(w)
            first.setdefault(r, i)
            last[r] = max(last.get(r, i), i)
        for u in reads:
            r = root(u)
            last[r] = max(last.get(r, i), i)
    plan = BufferPlan(alignment=alignment)
    arena: list[int] = []
    for v in sorted(candidates):
        if v not in by_id:
            raise ArgumentError(f"stored value %{v} is not in the graph")
        r = root(v)
        if r in outside or root(v) != v:
            if r != v and r not in outside:
                plan.views[v] = r
            continue
        if v not in first:
            raise ArgumentError(f"stored value %{v} is not written by any step")
        arena.append(v)
    for view, base in list(plan.views.items()):
        if base not in arena:  # a view of a value not otherwise stored: store its base
            if base not in first:
                raise ArgumentError(f"view %{view}'s base %{base} is not written by any step")
            arena.append(base)
    for v in arena:
        plan.sizes[v] = _align(nbytes(by_id[v].shape, by_id[v].dtype), alignment)
        plan.lifetimes[v] = (first[v], last[v])
    _place(plan, sorted(set(arena)))
    plan.no_reuse_bytes = sum(plan.sizes.values())
    live = [0] * (len(steps) + 1)
    for v in plan.offsets:
        a, b = plan.lifetimes[v]
        live[a] += plan.sizes[v]
        live[b + 1] -= plan.sizes[v]
    running = 0
    for d in live:
        running += d
        plan.live_bytes = max(plan.live_bytes, running)
    return plan


def _place(plan: BufferPlan, values: list[int]) -> None:
    """Greedy by size, best fit: biggest first (ties: earlier first, then lower id, so plans
    are deterministic), each into the tightest gap among the overlapping buffers placed."""
    placed: list[int] = []
    order = sorted(values, key=lambda v: (-plan.sizes[v], plan.lifetimes[v][0], v))
    for v in order:
        size, life = plan.sizes[v], plan.lifetimes[v]
        if size == 0:
            plan.offsets[v] = 0
            continue
        busy = sorted(
            (plan.offsets[p], plan.offsets[p] + plan.sizes[p])
            for p in placed
            if _overlap(life, plan.lifetimes[p])
        )
        best, best_gap, top = None, None, 0
        for start, end in busy:
            gap = start - top
            if gap >= size and (best_gap is None or gap < best_gap):
                best, best_gap = top, gap
            top = max(top, end)
        plan.offsets[v] = top if best is None else best
        placed.append(v)
    plan.arena_bytes = max((plan.offsets[v] + plan.sizes[v] for v in values), default=0)
