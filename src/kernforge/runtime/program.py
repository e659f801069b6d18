"""A lowered graph, ready to run: generated kernels in launch order, with the buffers they
read and write.

``JitProgram.run`` is the hot path of a cached ``kf.jit`` call: it allocates the stored
values and launches each kernel with precomputed arguments, nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from triton import knobs as _knobs
from triton.runtime import driver as _driver

from ..codegen import Lowered
from ..frontend.dtypes import to_torch
from ..ir import Graph, Value
from ..kernels import common
from .loader import load


@dataclass
class Step:
    """One launch: a generated kernel (``fn``) or a torch matmul (``fn`` None)."""

    fn: object | None
    args: list[int]  # slots of the buffers it reads and writes, in argument order
    grid: tuple[int, ...]
    num_warps: int
    num_stages: int
    out: int = -1  # torch steps: the slot they fill
    compiled: object | None = None  # the Triton binary, after the first launch (GPU)


def _hooks() -> bool:
    """Whether a profiler hooks Triton launches (then every launch goes through Triton)."""
    hooks = (_knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook)
    # Triton 3.6 keeps an always-present, usually empty, HookChain; older ones keep None.
    return any(h is not None and getattr(h, "calls", True) for h in hooks)


def _empty(shape, dtype: torch.dtype, dev: torch.device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=dev)


def _torch_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Matmuls the generated kernels do not cover; CUDA has no integer matmul, so those run on
    the CPU."""
    if a.is_cuda and not a.is_floating_point():
        return torch.matmul(a.cpu(), b.cpu()).to(a.device)
    return torch.matmul(a, b)


class JitProgram:
    """Kernels and buffer plan of one traced graph, for one device."""

    def __init__(self, graph: Graph, lowered: Lowered, interpret: bool) -> None:
        self.graph = graph
        self.lowered = lowered
        self.interpret = interpret
        slot: dict[int, int] = {}
        for v in graph.inputs:
            slot[id(v)] = len(slot)
        self.n_inputs = len(slot)
        #: stored values made by this program: (slot, shape, dtype); constants hold data.
        self.allocs: list[tuple[int, tuple[int, ...], torch.dtype]] = []
        self.constants: list[tuple[int, Value]] = []
        for node in graph.nodes:
            v = node.output
            if id(v) not in lowered.plan.materialized:
                continue
            slot[id(v)] = len(slot)
            if node.op == "constant":
                self.constants.append((slot[id(v)], v))
            else:
                self.allocs.append((slot[id(v)], v.shape, to_torch(v.dtype)))
        self.n_slots = len(slot)
        self.steps: list[Step] = []
        for group, src in zip(lowered.plan.groups, lowered.sources, strict=True):
            if group.kind == "torch":
                a, b = group.node.inputs
                self.steps.append(
                    Step(None, [slot[id(a)], slot[id(b)]], (), 0, 0, slot[id(group.node.output)])
                )
            elif src is not None:
                fn = load(src.source, src.name, interpret)
                args = [slot[id(v)] for v in src.args]
                launch = src.launch
                grid = (*launch.grid, 1, 1)[:3]
                self.steps.append(Step(fn, args, grid, launch.num_warps, launch.num_stages))
        self.outputs = [slot[id(v)] for v in graph.outputs]
        self._blank = [None] * (self.n_slots - self.n_inputs)
        self._const_cache: dict[torch.device, list[torch.Tensor]] = {}

    def _constants(self, dev: torch.device) -> list[torch.Tensor]:
        got = self._const_cache.get(dev)
        if got is None:
            got = [
                torch.tensor(v.node.attrs["data"], dtype=to_torch(v.dtype), device=dev).reshape(
                    v.shape
                )
                for _, v in self.constants
            ]
            self._const_cache[dev] = got
        return got

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Run on ``inputs`` (torch tensors of the traced shapes, strides and alignment, on one
        device)."""
        dev = inputs[0].device if inputs else torch.device("cpu" if self.interpret else "cuda")
        env: list = [*inputs, *self._blank]
        if self.constants:
            for (i, _), t in zip(self.constants, self._constants(dev), strict=True):
                env[i] = t
        empty = common.new_output if common._poison else _empty
        for i, shape, dtype in self.allocs:
            env[i] = empty(shape, dtype, dev)
        fast = not self.interpret and not _hooks()
        for s in self.steps:
            args = [env[i] for i in s.args]
            if s.fn is None:
                env[s.out] = _torch_matmul(*args)
            elif fast and s.compiled is not None:
                # Triton's launcher re-binds and re-specializes the arguments on every call
                # (~10 us of host time); the kf.jit cache key (shapes, strides, 16-byte
                # alignment) already pins them down, so the compiled kernel is called directly.
                k, g = s.compiled, s.grid
                stream = _driver.active.get_current_stream(dev.index)
                k.run(
                    g[0], g[1], g[2], stream, k.function, k.packed_metadata, None, None, None, *args
                )
            else:
                k = s.fn[s.grid](*args, num_warps=s.num_warps, num_stages=s.num_stages)
                if not self.interpret:
                    s.compiled = k
        return [env[i] for i in self.outputs]

    def kernel_count(self) -> int:
        return len(self.steps)

    def describe(self) -> str:
        """The kernels, their launches and the buffers they touch."""
        lines = [self.lowered.plan.describe()]
        total = sum(
            math.prod(s) * torch.empty((), dtype=d).element_size() for _, s, d in self.allocs
        )
        lines.append(f"{len(self.allocs)} buffers allocated per call, {total} bytes")
        return "\n".join(lines)
