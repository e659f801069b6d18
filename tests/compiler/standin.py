"""Small hand-built graphs with weight nodes, and a stand-in for the compiled Program, for the
program-format, recipe and memory-plan tests (they test those pieces without the compiler)."""

from __future__ import annotations

import torch

from kernforge.frontend.dtypes import to_torch
from kernforge.ir import Graph
from kernforge.runtime.memory import plan_buffers


def tiny_graph(n: int = 3, k: int = 8, m: int = 5) -> Graph:
    """x[n, k] -> exp(linear(x, fc.weight, fc.bias)) and (cast(h, bf16) + scale), with weights
    made by recipes (a BatchNorm fold, a cast, a transpose)."""
    g = Graph("tiny")
    x = g.input((n, k), "float32", "x")
    w = g.add("weight", shape=(m, k), dtype="float32", name="fc.weight",
              recipe=("transpose", "fc.weight_t", (1, 0)))  # fmt: skip
    b = g.add("weight", shape=(m,), dtype="float32", name="fc.bias", recipe=None)
    s = g.add("weight", shape=(m,), dtype="bfloat16", name="scale",
              recipe=("cast", "scale", "bfloat16"))  # fmt: skip
    h = g.add("linear", [x, w, b], has_bias=True)
    y = g.add("exp", [h])
    z = g.add("add", [g.add("cast", [h], dtype="bfloat16"), s])
    g.set_outputs([y, z])
    return g.verify()


def source_state(n: int = 3, k: int = 8, m: int = 5) -> dict[str, torch.Tensor]:
    """A source state dict for :func:`tiny_graph` (random, never zeros)."""
    return {
        "fc.weight_t": torch.randn(k, m),
        "fc.bias": torch.randn(m),
        "scale": torch.rand(m) + 0.5,
    }


def random_weights(graph: Graph) -> dict[str, torch.Tensor]:
    """Random tensors of every weight node's shape and dtype."""
    return {
        n.attrs["name"]: torch.randn(n.output.shape).to(to_torch(n.output.dtype))
        for n in graph.nodes
        if n.op == "weight"
    }


class StandInProgram:
    """What archive.save/load and recipes.load_weights need of ``runtime.Program``."""

    def __init__(self, graph: Graph, weights: dict, meta: dict | None = None) -> None:
        self.graph, self.weights, self.meta = graph, dict(weights), dict(meta or {})
        self.buffer_plan = plan_buffers(graph)

    def kernel_sources(self) -> dict[str, str]:
        return {f"k{i}_{n.op}": f"# {n.op} of {self.graph.name}\n" for i, n in
                enumerate(self.graph.nodes) if n.op not in ("weight",)}  # fmt: skip

    def set_weights(self, weights: dict) -> None:
        self.weights = dict(weights)
