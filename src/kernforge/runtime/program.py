"""A lowered graph, ready to run: generated kernels in launch order, with the buffers they
read and write.

``JitProgram.run`` is the hot path of a cached ``kf.jit`` call: it allocates the stored
values and launches each kernel with precomputed arguments, nothing else. Given ``outputs=``
(preallocated tensors, as the model executor's activation arena hands it), the graph's outputs
are written there instead of into fresh tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from triton import knobs as _knobs
from triton.runtime import driver as _driver

from ..codegen import Lowered
from ..errors import ArgumentError
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
        # outputs=: the output that takes over each allocated slot (its first occurrence), and
        # the outputs that are filled by a copy after the launches (an output that is an
        # input, a constant, or a value returned twice: none has an allocation of its own).
        alloc_slots = {i for i, _, _ in self.allocs}
        self._out_alloc: dict[int, int] = {}
        self._out_copy: list[int] = []
        for k, i in enumerate(self.outputs):
            if i in alloc_slots and i not in self._out_alloc:
                self._out_alloc[i] = k
            else:
                self._out_copy.append(k)
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

    def run(
        self,
        inputs: Sequence[torch.Tensor],
        outputs: Sequence[torch.Tensor | None] | None = None,
    ) -> list[torch.Tensor]:
        """Run on ``inputs`` (torch tensors of the traced shapes, strides and alignment, on one
        device). ``outputs``: one entry per graph output, a contiguous tensor of its shape and
        dtype on the inputs' device (16-byte aligned, as kernels are specialized on it) that
        the kernels write into, or None to allocate it; the returned list holds them."""
        dev = inputs[0].device if inputs else torch.device("cpu" if self.interpret else "cuda")
        env: list = [*inputs, *self._blank]
        if self.constants:
            for (i, _), t in zip(self.constants, self._constants(dev), strict=True):
                env[i] = t
        empty = common.new_output if common._poison else _empty
        if outputs is None:
            for i, shape, dtype in self.allocs:
                env[i] = empty(shape, dtype, dev)
        else:
            self._check_outputs(outputs, dev)
            taken = self._out_alloc
            for i, shape, dtype in self.allocs:
                k = taken.get(i)
                given = None if k is None else outputs[k]
                env[i] = empty(shape, dtype, dev) if given is None else given
        fast = not self.interpret and not _hooks()
        for s in self.steps:
            args = [env[i] for i in s.args]
            if s.fn is None:
                res = _torch_matmul(*args)
                k = None if outputs is None else self._out_alloc.get(s.out)
                if k is not None and outputs[k] is not None:
                    res = env[s.out].copy_(res)  # a given output: written in place
                env[s.out] = res
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
        if outputs is None:
            return [env[i] for i in self.outputs]
        got = [env[i] for i in self.outputs]
        for k in self._out_copy:
            if outputs[k] is not None:
                got[k] = outputs[k].copy_(got[k])
        return got

    def _check_outputs(self, outputs: Sequence[torch.Tensor | None], dev: torch.device) -> None:
        if len(outputs) != len(self.outputs):
            raise ArgumentError(
                f"JitProgram.run: outputs has {len(outputs)} entries; the graph "
                f"{self.graph.name!r} returns {len(self.outputs)} values (None allocates one)"
            )
        for k, (t, v) in enumerate(zip(outputs, self.graph.outputs, strict=True)):
            if t is None:
                continue
            want = to_torch(v.dtype)
            same_dev = t.device.type == dev.type and dev.index in (None, t.device.index)
            if tuple(t.shape) != v.shape or t.dtype != want or not same_dev:
                raise ArgumentError(
                    f"JitProgram.run: outputs[{k}] is {t.dtype}{list(t.shape)} on {t.device}; "
                    f"output {k} is {want}{list(v.shape)} on {dev}"
                )
            if not t.is_contiguous() or t.data_ptr() % 16:
                raise ArgumentError(
                    f"JitProgram.run: outputs[{k}] must be contiguous and 16-byte aligned "
                    f"(strides {t.stride()}, address % 16 = {t.data_ptr() % 16})"
                )

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
