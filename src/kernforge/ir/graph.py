"""The kernforge IR: a typed graph of single-output nodes.

A :class:`Graph` has input values, nodes in topological order, and output values. Every value
has a static shape and an IR dtype name. Nodes carry an op name (see :mod:`kernforge.ir.ops`),
attributes of plain Python data (ints, floats, bools, strings, tuples), and the source
location that made them, so errors can point at the user's line.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import KernforgeError, ShapeError
from . import dtypes
from .ops import spec

Shape = tuple[int, ...]


class VerifyError(KernforgeError, ValueError):
    """A graph breaks an IR rule (shape or dtype inconsistency, use before definition)."""


@dataclass(eq=False)
class Value:
    """One array in the graph: made by ``node``, or a graph input when ``node`` is None."""

    id: int
    shape: Shape
    dtype: str
    node: Node | None = None
    name: str | None = None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def __repr__(self) -> str:
        return f"%{self.name or self.id}: {self.dtype}[{','.join(map(str, self.shape))}]"


@dataclass(eq=False)
class Node:
    """One operation: ``output = op(*inputs, **attrs)``."""

    op: str
    inputs: tuple[Value, ...]
    attrs: dict[str, Any]
    output: Value = field(init=False)
    loc: str | None = None

    @property
    def kind(self) -> str:
        return spec(self.op).kind


def _freeze(x: Any) -> Any:
    """Attributes as hashable, JSON-round-trippable data (lists become tuples)."""
    if isinstance(x, list | tuple):
        return tuple(_freeze(v) for v in x)
    return x


class Graph:
    """A typed dataflow graph; build it with :meth:`input` and :meth:`add`."""

    def __init__(self, name: str = "graph") -> None:
        self.name = name
        self.inputs: list[Value] = []
        self.nodes: list[Node] = []
        self.outputs: list[Value] = []
        self._next_id = 0

    def _new_value(self, shape: Sequence[int], dtype: str, name: str | None = None) -> Value:
        v = Value(self._next_id, tuple(int(n) for n in shape), dtypes.check(dtype), name=name)
        self._next_id += 1
        return v

    def input(self, shape: Sequence[int], dtype: str, name: str | None = None) -> Value:
        """Add a graph input."""
        if any(int(n) < 0 for n in shape):
            raise ShapeError(f"input {name!r}: negative size in shape {tuple(shape)}")
        v = self._new_value(shape, dtype, name)
        self.inputs.append(v)
        return v

    def add(
        self, op: str, inputs: Sequence[Value] = (), loc: str | None = None, **attrs: Any
    ) -> Value:
        """Append node ``op(*inputs, **attrs)`` and return its output value (shape and dtype
        inferred; a ShapeError/DTypeError says why they could not be)."""
        s = spec(op)
        if s.arity is not None and len(inputs) != s.arity:
            raise VerifyError(f"{op} takes {s.arity} inputs, got {len(inputs)}")
        attrs = {k: _freeze(v) for k, v in attrs.items()}
        shape, dt = s.infer([(v.shape, v.dtype) for v in inputs], attrs)
        node = Node(op, tuple(inputs), attrs, loc=loc)
        node.output = self._new_value(shape, dt)
        node.output.node = node
        self.nodes.append(node)
        return node.output

    def set_outputs(self, outputs: Iterable[Value]) -> None:
        self.outputs = list(outputs)

    # -- checking and printing -------------------------------------------------------------

    def verify(self) -> Graph:
        """Check that every value is defined before use and every node's output shape and dtype
        match what its op infers; return the graph, or raise VerifyError."""
        defined = {id(v) for v in self.inputs}
        for node in self.nodes:
            for v in node.inputs:
                if id(v) not in defined:
                    raise VerifyError(f"{node.op} at {node.loc}: input {v!r} used before defined")
            try:
                shape, dt = spec(node.op).infer(
                    [(v.shape, v.dtype) for v in node.inputs], node.attrs
                )
            except KernforgeError as e:
                raise VerifyError(f"{node.op} at {node.loc}: {e}") from e
            if (shape, dt) != (node.output.shape, node.output.dtype):
                raise VerifyError(
                    f"{node.op} at {node.loc}: output is {node.output!r}, "
                    f"op gives {dt}{list(shape)}"
                )
            if node.output.node is not node:
                raise VerifyError(f"{node.op}: output value does not point back at its node")
            defined.add(id(node.output))
        for v in self.outputs:
            if id(v) not in defined:
                raise VerifyError(f"output {v!r} is not defined in the graph")
        return self

    def __str__(self) -> str:
        names = {id(v): f"%{v.name or v.id}" for v in self.inputs}
        ty = lambda v: f"{v.dtype}[{','.join(map(str, v.shape))}]"  # noqa: E731
        head = ", ".join(f"{names[id(v)]}: {ty(v)}" for v in self.inputs)
        lines = [f"graph {self.name}({head}) {{"]
        for node in self.nodes:
            out = node.output
            names[id(out)] = f"%{out.id}"
            args = ", ".join(names[id(v)] for v in node.inputs)
            attrs = ", ".join(f"{k}={v!r}" for k, v in node.attrs.items())
            body = f"{node.op}({', '.join(p for p in (args, attrs) if p)})"
            line = f"  %{out.id}: {ty(out)} = {body}"
            lines.append(f"{line:<72}  # {node.loc}" if node.loc else line)
        lines.append(f"  return {', '.join(names[id(v)] for v in self.outputs)}")
        lines.append("}")
        return "\n".join(lines)

    # -- serialisation ---------------------------------------------------------------------

    def to_json(self) -> str:
        """The graph as a JSON string (see :meth:`from_json`)."""
        value = lambda v: {"id": v.id, "shape": list(v.shape), "dtype": v.dtype}  # noqa: E731
        doc = {
            "format": "kernforge.ir/1",
            "name": self.name,
            "inputs": [{**value(v), "name": v.name} for v in self.inputs],
            "nodes": [
                {
                    "op": n.op,
                    "inputs": [v.id for v in n.inputs],
                    "attrs": n.attrs,
                    "output": value(n.output),
                    "loc": n.loc,
                }
                for n in self.nodes
            ],
            "outputs": [v.id for v in self.outputs],
        }
        return json.dumps(doc, allow_nan=True)

    @classmethod
    def from_json(cls, text: str) -> Graph:
        """Rebuild a graph written by :meth:`to_json`, and verify it."""
        doc = json.loads(text)
        if doc.get("format") != "kernforge.ir/1":
            raise VerifyError(f"not a kernforge IR document (format {doc.get('format')!r})")
        g = cls(doc["name"])
        by_id: dict[int, Value] = {}
        for d in doc["inputs"]:
            v = g.input(d["shape"], d["dtype"], d["name"])
            v.id = d["id"]
            by_id[v.id] = v
        for d in doc["nodes"]:
            out = g.add(d["op"], [by_id[i] for i in d["inputs"]], d["loc"], **d["attrs"])
            out.id = d["output"]["id"]
            by_id[out.id] = out
        g.outputs = [by_id[i] for i in doc["outputs"]]
        g._next_id = max(by_id, default=-1) + 1
        return g.verify()

    # -- queries ---------------------------------------------------------------------------

    def users(self) -> dict[int, list[Node]]:
        """id(value) -> the nodes that read it."""
        out: dict[int, list[Node]] = {}
        for node in self.nodes:
            for v in node.inputs:
                out.setdefault(id(v), []).append(node)
        return out
