"""``compile_model``: import, optimise, build weights, make the Program."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import ArgumentError
from ..ir import Graph
from ..passes.bn_fold import fold_batch_norm
from ..passes.cleanup import eliminate_aliases
from ..passes.layout import to_channels_last
from ..passes.patterns import (
    count_patterns,
    fuse_conv_epilogue,
    fuse_linear_epilogue,
    match_attention,
    match_rms_norm,
)
from ..passes.simplify import cse, dce, fold
from ..passes.weights import fold_weights
from ..runtime.model import MODES, Program
from .importer import import_model
from .weights import evaluate


def optimize(graph: Graph, channels_last: bool = True) -> Graph:
    """The compiler's pass pipeline (each pass a pure Graph -> Graph)."""
    g = eliminate_aliases(graph)
    g = fold_weights(g)
    g = fold_batch_norm(g)
    g = dce(cse(fold(g)))
    g = match_rms_norm(g)
    g = match_attention(g)
    g = fuse_conv_epilogue(g)
    g = fuse_linear_epilogue(g)
    if channels_last:
        g = to_channels_last(g)
    g = eliminate_aliases(dce(cse(fold(g))))
    return g.verify()


def build_weights(graph: Graph, source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each weight node's tensor, made from the source state dict by its recipe."""
    # Recipes run on the CPU (one place, deterministic, whatever device the model is on); the
    # program moves its weights to the device it runs on.
    source = {k: v.detach().cpu() for k, v in source.items()}
    out: dict[str, torch.Tensor] = {}
    for n in graph.nodes:
        if n.op == "weight" and n.attrs["name"] not in out:
            t = evaluate(n.attrs["name"], n.attrs["recipe"], source)
            out[n.attrs["name"]] = t.detach().contiguous()
    return out


def compile_model(
    model: torch.nn.Module,
    example_inputs: Sequence[Any],
    dtype: torch.dtype | None = None,
    mode: str | None = None,
    channels_last: bool = True,
) -> Program:
    """Compile ``model`` for ``example_inputs``' shapes into a :class:`Program`.

    ``dtype`` (e.g. torch.bfloat16) runs the model in that dtype (weights cast by recipes,
    floating inputs cast at the entry). ``mode`` (gpu | interpret) builds that mode's kernels
    now rather than on the first call; with CUDA example inputs (or ``mode="gpu"``) the program
    is tuned and its CUDA graph captured here (:meth:`Program.prepare`). ``channels_last`` runs
    convolutions NHWC.
    """
    if mode is not None and mode not in MODES:
        raise ArgumentError(f"compile_model: mode={mode!r}; use one of {', '.join(MODES)}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    t0 = time.perf_counter()
    imp = import_model(model, example_inputs, dtype)
    t1 = time.perf_counter()
    graph = optimize(imp.graph, channels_last)
    t2 = time.perf_counter()
    weights = build_weights(graph, imp.source)
    meta = {
        "ops_at_import": imp.ops_at_import,
        "patterns": count_patterns(graph),
        "notes": imp.notes,
        "dtype": None if dtype is None else str(dtype).removeprefix("torch."),
        "model": type(model).__name__,
    }
    prog = Program(graph, weights, meta)
    cuda_in = any(isinstance(x, torch.Tensor) and x.is_cuda for x in example_inputs)
    if mode == "interpret":
        prog.compiled_steps(mode)
    elif mode == "gpu" or (mode is None and cuda_in):
        # Tune, build and capture now: the program's first call allocates nothing.
        prog.prepare(*[x for x in example_inputs if isinstance(x, torch.Tensor)] if cuda_in else ())
    prog.meta["compile_s"] = {
        "import": t1 - t0, "passes": t2 - t1, "total": time.perf_counter() - t0,
    }  # fmt: skip
    return prog
