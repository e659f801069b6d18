"""A compiled model: :class:`Program` (graph + weights + meta) and its executor.

The constructor partitions the graph (:mod:`kernforge.passes.partition`) and plans activation
buffers (:mod:`kernforge.runtime.memory`); both are pure functions of the graph, so a saved and
loaded program runs exactly as it compiled. Execution modes:

- ``gpu``: catalog ops and generated kernels on CUDA; :meth:`Program.prepare` (run at compile
  and load on a GPU, else by the first call) warms up (compiles and tunes every kernel), then
  captures the whole forward as one CUDA graph over static input buffers; calls copy the
  inputs in and replay it;
- ``interpret``: the same steps on the CPU, generated kernels under Triton's interpreter;
- ``numpy``: the graph evaluated op by op with :mod:`kernforge.runtime.simulate` (the reference).

In the gpu and interpret modes every stored intermediate value lives in one activation arena
(one uint8 tensor per mode and device, allocated at the first call or by ``prepare``) at the
byte offset the buffer plan gave it: each step is handed tensor views of the arena for the
values it writes and writes into them (generated kernels and the conv / pool / GEMM catalog ops
store there directly; other catalog and fallback ops copy their result in). Graph outputs are
not in the arena (the caller keeps them), nor are temporaries inside one op (split-K partials,
values a fused step keeps between its own kernels): those come from the torch allocator (inside
the CUDA graph's private pool on the GPU).
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import device
from ..errors import ArgumentError, DeviceError, DTypeError, ShapeError
from ..ir import Graph, Value
from ..kernels import common
from ..passes.partition import Partition, Step, partition, subgraph

MODES = ("gpu", "interpret", "numpy")


def default_mode() -> str:
    """``gpu`` when Triton compiles for a CUDA GPU here, else ``interpret``."""
    return "interpret" if device.INTERPRET else "gpu"


#: How a step's arena values get written: by the kernels themselves, by a copy of the result,
#: or not at all (a view step: torch views of its input).
INTO_KINDS = ("in place", "copy", "view")

StepRun = Callable[[list[torch.Tensor], list[torch.Tensor | None]], list[torch.Tensor]]


@dataclass
class _Compiled:
    """A step made runnable for one mode: ``fn(tensors read, destinations) -> tensors
    written``; a destination is the arena view the written value must land in, or None (a
    graph output, or a view that shares its base's bytes) to return a tensor of its own."""

    step: Step
    fn: StepRun
    runs_on: str  # what executes it, for describe()
    reads: list[int] = field(default_factory=list)  # env slots
    writes: list[int] = field(default_factory=list)
    kernels: int = 1
    source: str | None = None
    into: str = "in place"  # one of INTO_KINDS
    read_values: list[Value] = field(default_factory=list)  # the values behind reads/writes
    write_values: list[Value] = field(default_factory=list)


class Program:
    """A compiled model: call it like the model (see the module docs and docs/compiler.md)."""

    def __init__(
        self, graph: Graph, weights: dict[str, torch.Tensor], meta: dict | None = None
    ) -> None:
        self.graph = graph.verify()
        self.weights = dict(weights)
        self.meta = dict(meta or {})
        missing = [
            n.attrs["name"]
            for n in graph.nodes
            if n.op == "weight" and n.attrs["name"] not in self.weights
        ]
        if missing:
            raise ArgumentError(
                f"Program: no tensor for weights {missing[:5]}{'...' if len(missing) > 5 else ''}"
                "; pass every weight node's tensor (or load them with load_weights)"
            )
        for n in graph.nodes:
            if n.op == "weight":
                t = self.weights[n.attrs["name"]]
                if tuple(t.shape) != n.output.shape or str(t.dtype)[6:] != n.output.dtype:
                    raise ShapeError(
                        f"Program: weight {n.attrs['name']!r} is {t.dtype}{list(t.shape)}, the "
                        f"graph expects {n.output.dtype}{list(n.output.shape)}"
                    )
        self.partitions: list[Partition] = partition(self.graph)
        self.steps: list[Step] = [s for p in self.partitions for s in p.steps]
        self.buffer_plan = self._plan_buffers()
        self._compiled: dict[str, list[_Compiled]] = {}
        self._frees_by_mode: dict[str, list[list[int]]] = {}
        self._dev_weights: dict[Any, dict[str, torch.Tensor]] = {}
        self._graph_state: dict | None = None
        self._arenas: dict[tuple[str, Any], dict] = {}  # (mode, device) -> arena and views
        self._memory: dict[str, Any] = {}  # measured at capture (memory_report)
        self.cuda_graph = True  # capture on GPU; set False to run step by step

    # -- planning --------------------------------------------------------------------------

    def _plan_buffers(self):
        try:
            from .memory import plan_buffers
        except ImportError:  # the planner module is optional at this stage
            return None
        stepped = [
            ([v.id for v in s.inputs], [v.id for v in s.outputs]) for s in self.steps if s.outputs
        ]
        stored = [v.id for s in self.steps for v in s.outputs]
        aliases = {o: i for s in self.steps if s.kind == "view" for o, i in _view_bases(s)}
        try:
            return plan_buffers(self.graph, steps=stepped, stored=stored, aliases=aliases)
        except Exception:  # noqa: BLE001 (a planner limitation must not stop the program)
            return plan_buffers(self.graph, steps=stepped, stored=stored)

    # -- calling ---------------------------------------------------------------------------

    def __call__(self, *inputs: torch.Tensor):
        return self.run(*inputs)

    def run(self, *inputs: torch.Tensor, mode: str | None = None):
        """Run the program on ``inputs`` (tensors of the compiled shapes and dtypes) in
        ``mode`` (default: gpu where Triton compiles for a GPU, else interpret). Returns one
        tensor, or a tuple when the model returns several."""
        mode = mode or default_mode()
        if mode not in MODES:
            raise ArgumentError(f"Program.run: mode={mode!r}; use one of {', '.join(MODES)}")
        self._check_inputs(inputs, mode)
        if mode == "numpy":
            outs = self._run_numpy(inputs)
        elif mode == "gpu" and self.cuda_graph:
            outs = self._run_graph(inputs)
        else:
            outs = self._run_steps(list(inputs), mode)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def prepare(self, *inputs: torch.Tensor) -> Program:
        """On a GPU: build, tune and capture everything now (random inputs of the compiled
        shapes unless ``inputs`` are given), so that calls allocate nothing; returns self.
        A no-op without CUDA or with ``cuda_graph`` off."""
        if not (self.cuda_graph and device.cuda_available() and not device.INTERPRET):
            return self
        if not inputs:
            from ..frontend.dtypes import to_torch

            inputs = tuple(
                torch.randn(v.shape, device="cuda").to(to_torch(v.dtype))
                if to_torch(v.dtype).is_floating_point
                else torch.zeros(v.shape, dtype=to_torch(v.dtype), device="cuda")
                for v in self.graph.inputs
            )
        self._check_inputs(inputs, "gpu")
        if self._graph_state is None:
            self._run_graph(inputs)
        return self

    def _check_inputs(self, inputs: Sequence[Any], mode: str) -> None:
        want = self.graph.inputs
        if len(inputs) != len(want):
            raise ArgumentError(
                f"Program: takes {len(want)} inputs "
                f"({', '.join(f'{v.dtype}{list(v.shape)}' for v in want)}), got {len(inputs)}"
            )
        for i, (x, v) in enumerate(zip(inputs, want, strict=True)):
            if not isinstance(x, torch.Tensor):
                raise ArgumentError(f"Program: input {i} is {type(x).__name__}, not a tensor")
            if tuple(x.shape) != v.shape:
                raise ShapeError(
                    f"Program: input {i} ({v.name}) has shape {tuple(x.shape)}; the program was "
                    f"compiled for {v.shape} (compile again for other shapes)"
                )
            if str(x.dtype)[6:] != v.dtype:
                raise DTypeError(
                    f"Program: input {i} ({v.name}) is {x.dtype}; the program takes "
                    f"torch.{v.dtype} (convert it with .to(torch.{v.dtype}))"
                )
            if mode == "gpu" and not x.is_cuda:
                raise DeviceError(
                    f"Program: input {i} is on {x.device}; mode 'gpu' takes CUDA tensors "
                    "(move it with .cuda(), or run with mode='interpret'/'numpy' on the CPU)"
                )
            if mode != "gpu" and x.device.type != "cpu":
                raise DeviceError(
                    f"Program: input {i} is on {x.device}; mode {mode!r} runs on the CPU "
                    "(move it with .cpu())"
                )

    def _weights_on(self, dev: torch.device) -> dict[str, torch.Tensor]:
        got = self._dev_weights.get(dev)
        if got is None:
            got = {k: v.to(dev).contiguous() for k, v in self.weights.items()}
            self._dev_weights[dev] = got
        return got

    # -- numpy -----------------------------------------------------------------------------

    def _run_numpy(self, inputs) -> list[torch.Tensor]:
        from . import simulate

        outs = simulate.run(self.graph, list(inputs), self.weights)
        return [
            torch.from_numpy(o.copy()).to(getattr(torch, v.dtype))
            for o, v in zip(outs, self.graph.outputs, strict=True)
        ]

    # -- steps (gpu without graphs, interpret) ---------------------------------------------

    def compiled_steps(self, mode: str) -> list[_Compiled]:
        """Each step made runnable for ``mode`` (gpu | interpret), built once."""
        got = self._compiled.get(mode)
        if got is None:
            got = self._compiled[mode] = self._compile(mode)
        return got

    def _slots(self) -> dict[int, int]:
        got = self.__dict__.get("_slot_map")
        if got is not None:
            return got
        slot: dict[int, int] = self.__dict__.setdefault("_slot_map", {})
        for v in self.graph.inputs:
            slot[id(v)] = len(slot)
        for n in self.graph.nodes:
            slot[id(n.output)] = len(slot)
        return slot

    def _compile(self, mode: str) -> list[_Compiled]:
        from .model_ops import catalog_step

        interpret = mode == "interpret"
        other = "mode='gpu' or 'numpy'" if interpret else "mode='interpret' or 'numpy'"
        device.require_triton_mode(interpret, "Program", other)
        slot = self._slots()
        out: list[_Compiled] = []
        for i, s in enumerate(self.steps):
            reads = [slot[id(v)] for v in s.inputs]
            writes = [slot[id(v)] for v in s.outputs]
            read_values = list(s.inputs)
            if s.kind in ("catalog", "fallback"):
                read_values = list(s.nodes[0].inputs)  # in argument order, repeats kept
                reads = [slot[id(v)] for v in read_values]
                fn, who, in_place = catalog_step(s.nodes[0])
                run = (lambda f: lambda xs, dests: [f(xs, dests[0])])(fn)
                c = _Compiled(s, run, who, reads, writes, into="in place" if in_place else "copy")
            elif s.kind == "view":
                c = _Compiled(s, _view_fn(s), "torch view", reads, writes, kernels=0, into="view")
            else:
                c = self._fused(s, f"{self.graph.name}_s{i}", interpret, reads, writes)
            c.read_values, c.write_values = read_values, list(s.outputs)
            out.append(c)
        return out

    def _fused(self, s: Step, name: str, interpret: bool, reads, writes) -> _Compiled:
        from ..codegen import contiguous_strides, lower
        from ..passes.simplify import simplify
        from .program import JitProgram

        g = simplify(subgraph(s, name))
        try:
            lowered = lower(g, [contiguous_strides(v.shape) for v in g.inputs], interpret)
            prog = JitProgram(g, lowered, interpret)
        except Exception as e:  # noqa: BLE001 (a codegen gap must not stop the model)
            return _Compiled(s, _op_by_op(g, e), _OP_BY_OP, reads, writes, 0, into="copy")
        state: dict = {}

        def run(xs: list[torch.Tensor], dests: list[torch.Tensor | None]) -> list[torch.Tensor]:
            xs = [x if x.is_contiguous() else x.contiguous() for x in xs]
            outs = dests if any(d is not None for d in dests) else None
            if "fallback" in state:
                return state["fallback"](xs, dests)
            if "ok" in state:
                return prog.run(xs, outs)
            try:  # the first launch compiles; a codegen bug shows here
                out = prog.run(xs, outs)
            except Exception as e:  # noqa: BLE001
                state["fallback"] = _op_by_op(g, e)
                self.meta.setdefault("notes", []).append(
                    f"step {name}: generated kernel failed ({type(e).__name__}: "
                    f"{str(e)[:120]}); runs op by op with torch"
                )
                return state["fallback"](xs, dests)
            state["ok"] = True
            return out

        return _Compiled(
            s, run, "generated Triton", reads, writes, prog.kernel_count(), lowered.source()
        )

    def _env(self, inputs: Sequence[torch.Tensor], mode: str) -> list:
        dev = inputs[0].device if inputs else torch.device("cuda" if mode == "gpu" else "cpu")
        slot = self._slots()
        env: list = [None] * len(slot)
        for v, x in zip(self.graph.inputs, inputs, strict=True):
            env[slot[id(v)]] = x
        w = self._weights_on(dev)
        for n in self.graph.nodes:
            if n.op == "weight":
                env[slot[id(n.output)]] = w[n.attrs["name"]]
        return env

    def _frees(self, steps: list[_Compiled]) -> list[list[int]]:
        """For each step, the slots whose last reader it is (intermediates only): dropping
        them lets the allocator (and, on the GPU, the CUDA graph's pool) reuse their memory,
        the liveness reuse the buffer plan describes."""
        slot = self._slots()
        keep = {slot[id(v)] for v in self.graph.outputs} | {slot[id(v)] for v in self.graph.inputs}
        keep |= {slot[id(n.output)] for n in self.graph.nodes if n.op == "weight"}
        last: dict[int, int] = {}
        for k, c in enumerate(steps):
            for i in (*c.reads, *c.writes):
                last[i] = k
        out: list[list[int]] = [[] for _ in steps]
        for i, k in last.items():
            if i not in keep:
                out[k].append(i)
        return out

    def _run_steps(self, inputs: list[torch.Tensor], mode: str) -> list[torch.Tensor]:
        steps = self.compiled_steps(mode)
        frees = self._frees_by_mode.get(mode)
        if frees is None:
            frees = self._frees_by_mode[mode] = self._frees(steps)
        env = self._env(inputs, mode)
        dests = self._arena(mode, self._device(inputs, mode))["dests"]
        for c, dest, dead in zip(steps, dests, frees, strict=True):
            res = c.fn([env[i] for i in c.reads], dest)
            for i, t in zip(c.writes, res, strict=True):
                env[i] = t
            for i in dead:
                env[i] = None
        slot = self._slots()
        return [env[slot[id(v)]] for v in self.graph.outputs]

    # -- the activation arena --------------------------------------------------------------

    @staticmethod
    def _device(inputs: Sequence[torch.Tensor], mode: str) -> torch.device:
        if inputs:
            return inputs[0].device
        return torch.device("cuda", torch.cuda.current_device()) if mode == "gpu" else (
            torch.device("cpu")
        )  # fmt: skip

    def _arena(self, mode: str, dev: torch.device) -> dict:
        """The arena of ``mode`` on ``dev`` (allocated once: one uint8 tensor of the plan's
        size, 0xFF-filled (NaN in every float dtype) while outputs are poisoned for tests) and,
        per compiled step, the arena views its written values go to."""
        key = (mode, dev)
        st = self._arenas.get(key)
        if st is not None:
            return st
        steps = self.compiled_steps(mode)
        plan = self.buffer_plan
        size = 0 if plan is None else plan.arena_bytes
        arena = torch.empty(size, dtype=torch.uint8, device=dev)
        if common._poison:
            arena.fill_(0xFF)
        views = {} if plan is None else plan.tensors(arena, self.graph)
        own = set() if plan is None else set(plan.offsets)
        dests = [
            [views[v.id] if v.id in own else None for v in c.write_values] for c in steps
        ]  # fmt: skip
        st = self._arenas[key] = {"arena": arena, "dests": dests, "views": views}
        return st

    def arena(self, mode: str | None = None, dev=None) -> torch.Tensor | None:
        """The activation arena tensor of ``mode`` (default: this machine's) on ``dev``
        (default: cuda for gpu, else the CPU), or None before the first run allocates it."""
        mode = mode or default_mode()
        dev = torch.device(dev) if dev is not None else self._device((), mode)
        st = self._arenas.get((mode, dev))
        return None if st is None else st["arena"]

    # -- gpu with a CUDA graph -------------------------------------------------------------

    def _run_graph(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        st = self._graph_state
        if st is None:
            static = [x.clone() for x in inputs]
            dev = static[0].device if static else self._device((), "gpu")
            self._weights_on(dev)
            # Measured from here: the arena, what the steps allocate while warming up (the
            # peak) and what the captured graph keeps (its private pool), not the weights or
            # static inputs made above. Garbage (e.g. an earlier program, freed only by the
            # cycle collector) is collected first, so that its freeing cannot hide growth.
            gc.collect()
            torch.cuda.synchronize(dev)
            base = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            arena = self._arena("gpu", dev)["arena"]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # compile, tune and settle every kernel before capture
                    self._run_steps(static, "gpu")
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize(dev)
            warm_peak = torch.cuda.max_memory_allocated(dev) - base
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    outs = self._run_steps(static, "gpu")
            except Exception as e:  # noqa: BLE001 (a step that cannot be captured)
                self.cuda_graph = False
                self.meta["cuda_graph_error"] = f"{type(e).__name__}: {e}"
                torch.cuda.synchronize()
                return self._run_steps(list(inputs), "gpu")
            torch.cuda.synchronize(dev)
            out_bytes = sum(o.numel() * o.element_size() for o in outs)
            self._memory = _measure(graph, dev, base, warm_peak, out_bytes, arena.numel())
            st = self._graph_state = {"graph": graph, "in": static, "out": outs}
        for s, x in zip(st["in"], inputs, strict=True):
            s.copy_(x)
        st["graph"].replay()
        return [o.clone() for o in st["out"]]

    # -- inspection ------------------------------------------------------------------------

    def profile(self, *inputs: torch.Tensor, mode: str | None = None, iters: int = 5) -> dict:
        """Time every step (CUDA events on the GPU, perf_counter on the CPU), median over
        ``iters`` runs, and sum per partition. Returns {"steps": [...], "partitions": [...],
        "total_ms": ...}."""
        mode = mode or default_mode()
        if mode == "numpy":
            raise ArgumentError("Program.profile: mode 'numpy' has no kernels; use gpu/interpret")
        self._check_inputs(inputs, mode)
        steps = self.compiled_steps(mode)
        self._run_steps(list(inputs), mode)  # warm up
        gpu = mode == "gpu"
        times: list[list[float]] = [[] for _ in steps]
        dests = self._arena(mode, self._device(inputs, mode))["dests"]
        for _ in range(iters):
            env = self._env(inputs, mode)
            for k, c in enumerate(steps):
                args = [env[i] for i in c.reads]
                if gpu:
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(True)
                    a.record()
                    res = c.fn(args, dests[k])
                    b.record()
                    b.synchronize()
                    times[k].append(a.elapsed_time(b))
                else:
                    t0 = time.perf_counter()
                    res = c.fn(args, dests[k])
                    times[k].append((time.perf_counter() - t0) * 1e3)
                for i, t in zip(c.writes, res, strict=True):
                    env[i] = t
        med = [sorted(t)[len(t) // 2] for t in times]
        rows, parts, k = [], [], 0
        for pi, p in enumerate(self.partitions):
            total = 0.0
            for s in p.steps:
                c = steps[k]
                rows.append(
                    {
                        "partition": pi,
                        "step": s.label,
                        "kind": s.kind,
                        "runs_on": c.runs_on,
                        "kernels": c.kernels,
                        "ms": med[k],
                    }  # fmt: skip
                )
                total += med[k]
                k += 1
            parts.append({"partition": pi, "kind": p.kind, "steps": len(p.steps), "ms": total})
        return {"mode": mode, "steps": rows, "partitions": parts, "total_ms": sum(med)}

    def fused_fraction(self) -> float:
        """The fraction of the imported ATen ops that run inside another op's kernel: 1 -
        (steps that launch work) / (ops at import)."""
        n = int(self.meta.get("ops_at_import", 0))
        launched = sum(1 for s in self.steps if s.kind != "view")
        return max(0.0, 1.0 - launched / n) if n else 0.0

    def describe(self) -> str:
        """Partitions and their steps (what runs each), buffers, weights, fused patterns."""
        mode = default_mode()
        try:
            compiled = self.compiled_steps(mode)
        except Exception as e:  # noqa: BLE001 (describe must work even when lowering fails)
            compiled = None
            note = f"(kernels not built for {mode}: {type(e).__name__}: {e})"
        lines = [f"kernforge Program {self.graph.name!r}"]
        ins = ", ".join(f"{v.name}: {v.dtype}{list(v.shape)}" for v in self.graph.inputs)
        outs = ", ".join(f"{v.dtype}{list(v.shape)}" for v in self.graph.outputs)
        lines.append(f"  inputs: {ins}\n  outputs: {outs}")
        k = 0
        kernels = 0
        for pi, p in enumerate(self.partitions):
            lines.append(f"  partition {pi} [{p.kind}]: {len(p.steps)} steps")
            for s in p.steps:
                c = compiled[k] if compiled else None
                who = f" <- {c.runs_on}" if c else ""
                nk = f", {c.kernels} kernels" if c and s.kind == "fused" else ""
                kernels += c.kernels if c else 0
                ops = ""
                if s.kind in ("fused", "view"):
                    ops = " (" + " ".join(sorted({n.op for n in s.nodes})) + ")"
                lines.append(f"    {s.kind:8s} {s.label}{ops}{nk}{who}")
                k += 1
        if compiled is None:
            lines.append(f"  {note}")
        else:
            lines.append(f"  {kernels} kernel launches per call ({mode})")
        wbytes = sum(t.numel() * t.element_size() for t in self.weights.values())
        lines.append(f"  weights: {len(self.weights)} tensors, {wbytes / 2**20:.2f} MiB")
        if self.buffer_plan is not None:
            lines.append(f"  buffers: {self.buffer_plan.describe()}")
        if compiled is not None:
            into = self._into_counts(compiled)
            lines.append(
                f"  arena writes: {into['in place']} steps write their values into the arena "
                f"in place, {into['copy']} copy their result in, {into['view']} are views; "
                f"{into['outside']} write only graph outputs (not in the arena)"
            )
        mem = self._memory
        if mem:
            lines.append(
                f"  measured ({mem['device']}): activations "
                f"{_mib(mem['activation_bytes_measured'])} (arena "
                f"{_mib(mem['activation_bytes_measured'] - mem['graph_pool_extra_bytes'])} + "
                "graph pool beyond the outputs "
                f"{_mib(mem['graph_pool_extra_bytes'])}), warm-up peak "
                f"{_mib(mem['peak_bytes_measured'])}"
            )
        pats = self.meta.get("patterns", {})
        if pats:
            lines.append("  fused patterns: " + ", ".join(f"{k} x{v}" for k, v in pats.items()))
        n = self.meta.get("ops_at_import")
        if n:
            lines.append(
                f"  ops fused: {self.fused_fraction():.0%} of {n} imported ATen ops run inside "
                "another op's kernel"
            )
        for note in self.meta.get("notes", []):
            lines.append(f"  note: {note}")
        return "\n".join(lines)

    def peak_activation_bytes(self) -> int | None:
        """The activation arena's size from the buffer plan (None without a plan)."""
        return None if self.buffer_plan is None else int(self.buffer_plan.arena_bytes)

    def memory_report(self) -> dict[str, Any]:
        """Activation memory, planned and (on the GPU, after the CUDA graph is captured)
        measured. Keys: ``arena_bytes_planned`` (the plan's arena, what the executor
        allocates), ``no_reuse_bytes`` (the arena without liveness reuse), ``live_bytes_bound``
        (the most bytes live at one step: no plan can do better), ``arena_values``,
        ``steps_in_place`` / ``steps_copy`` / ``steps_view`` (how steps write their arena
        values, for this machine's mode); once captured: ``activation_bytes_measured`` (device
        memory the program holds for activations: the arena plus its CUDA graph pool's bytes
        beyond the graph outputs: temporaries inside ops such as split-K partials and values a
        fused step keeps between its own kernels), ``graph_pool_extra_bytes``,
        ``peak_bytes_measured`` (the allocator's peak over the warm-up runs, beyond weights,
        inputs and one set of outputs), ``output_bytes``, ``device``."""
        plan = self.buffer_plan
        rep: dict[str, Any] = {
            "arena_bytes_planned": None if plan is None else plan.arena_bytes,
            "no_reuse_bytes": None if plan is None else plan.no_reuse_bytes,
            "live_bytes_bound": None if plan is None else plan.live_bytes,
            "arena_values": None if plan is None else len(plan.offsets),
        }
        try:
            compiled = self.compiled_steps(default_mode())
        except Exception:  # noqa: BLE001 (the report must work where kernels cannot be built)
            compiled = None
        if compiled is not None:
            for k, n in self._into_counts(compiled).items():
                rep[f"steps_{k.replace(' ', '_')}"] = n
        rep.update(self._memory)
        return rep

    def _into_counts(self, compiled: list[_Compiled]) -> dict[str, int]:
        """Steps by how they write their arena values (INTO_KINDS), and ``outside``: steps
        that write no arena value of their own (only graph outputs)."""
        plan = self.buffer_plan
        own = set() if plan is None else set(plan.offsets)
        out = dict.fromkeys((*INTO_KINDS, "outside"), 0)
        for c in compiled:
            mine = c.into == "view" or any(v.id in own for v in c.write_values)
            out[c.into if mine else "outside"] += 1
        return out

    # -- saving and weights (runtime/archive.py, runtime/recipes.py; docs/program_format.md)

    def kernel_sources(self) -> dict[str, str]:
        """The generated Triton source of each fused step for this machine's mode, keyed
        ``"<mode>/s<i>:<label>"`` (the interpreter's sources differ from the GPU's); saved
        programs store them, and loading warns when this kernforge generates other ones."""
        mode = default_mode()
        try:
            steps = self.compiled_steps(mode)
        except Exception:  # noqa: BLE001 (a program whose kernels cannot be built here still saves)
            return {}
        return {f"{mode}/s{i}:{c.step.label}": c.source for i, c in enumerate(steps) if c.source}

    def save(self, path):
        """Write the program to ``path``: one ``.kf`` file when it ends in ``.kf``, else a
        folder (JSON + safetensors, no pickle); returns the path. ``kernforge.load`` reads it."""
        from .archive import save

        return save(self, path)

    @classmethod
    def load(cls, path, strict: bool = False) -> Program:
        """A program saved by :meth:`save`, checked (format, hashes, shapes, dtypes);
        ``strict``: raise when this kernforge generates other kernel sources than were saved."""
        from .archive import load

        return load(path, program_cls=cls, strict=strict)

    def load_weights(self, source) -> dict[str, torch.Tensor]:
        """New weights from ``source`` (a safetensors file of the original model's state dict,
        or the state dict), through the recipes the compile recorded (BN folds, casts,
        layouts); returns them."""
        from .recipes import load_weights

        return load_weights(self, source)

    def set_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Replace weights by name (same shapes and dtypes as the graph's weight nodes); the
        device copies and a captured CUDA graph are rebuilt on the next call."""
        nodes = {n.attrs["name"]: n.output for n in self.graph.nodes if n.op == "weight"}
        for k, t in weights.items():
            v = nodes.get(k)
            if v is None:
                raise ArgumentError(f"Program.set_weights: the program has no weight {k!r}")
            if tuple(t.shape) != v.shape or str(t.dtype)[6:] != v.dtype:
                raise ShapeError(
                    f"Program.set_weights: weight {k!r} is {t.dtype}{list(t.shape)}, the graph "
                    f"expects {v.dtype}{list(v.shape)}"
                )
        self.weights.update(weights)
        self._dev_weights.clear()
        self._graph_state = None

    def __repr__(self) -> str:
        return (
            f"<kernforge.Program {self.graph.name!r}: {len(self.partitions)} partitions, "
            f"{len(self.steps)} steps, {len(self.weights)} weights>"
        )


_OP_BY_OP = "torch, op by op (codegen fallback)"


def _op_by_op(g: Graph, err: Exception):
    """A fused step that the code generator could not handle, run op by op with torch on the
    step's device (one kernel per op, but capturable in the CUDA graph): a stop-gap that keeps
    the model running; describe() notes it."""
    from .model_ops import evaluate_ir_torch

    def run(xs: list[torch.Tensor], dests: list | None = None) -> list[torch.Tensor]:
        dests = dests or [None] * len(g.outputs)
        dev = xs[0].device if xs else torch.device("cuda" if not device.INTERPRET else "cpu")
        env = {id(v): x for v, x in zip(g.inputs, xs, strict=True)}
        for n in g.nodes:
            env[id(n.output)] = evaluate_ir_torch(n, [env[id(v)] for v in n.inputs], dev)
        return [
            env[id(v)].contiguous() if d is None else d.copy_(env[id(v)])
            for v, d in zip(g.outputs, dests, strict=True)
        ]

    run.error = err  # type: ignore[attr-defined]
    return run


def _view_fn(s: Step):
    """A step of reshapes run as torch views (no copy, no kernel). An output the plan gave
    bytes of its own (not a view of its base there) is copied into them."""
    nodes = s.nodes

    def run(xs: list[torch.Tensor], dests: list | None = None) -> list[torch.Tensor]:
        dests = dests or [None] * len(s.outputs)
        env = {id(v): x for v, x in zip(s.inputs, xs, strict=True)}
        for n in nodes:
            x = env[id(n.inputs[0])]
            env[id(n.output)] = x if n.op == "alias" else x.reshape(n.output.shape)
        return [
            env[id(v)] if d is None else d.copy_(env[id(v)])
            for v, d in zip(s.outputs, dests, strict=True)
        ]

    return run


def _view_bases(s: Step) -> list[tuple[int, int]]:
    """(output id, id of the step input it is a view of) for each output of a view step (the
    buffer plan's aliases: the output shares the input's bytes). Arena values are contiguous,
    so their reshapes are always views."""
    src: dict[int, Value] = {id(v): v for v in s.inputs}
    for n in s.nodes:
        if n.op not in ("reshape", "alias") or id(n.inputs[0]) not in src:
            return []
        src[id(n.output)] = src[id(n.inputs[0])]
    return [(v.id, src[id(v)].id) for v in s.outputs if id(v) in src]


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def _measure(graph, dev: torch.device, base: int, warm_peak: int, out_bytes: int,
             arena_bytes: int) -> dict[str, Any]:  # fmt: skip
    """What a captured program holds on ``dev`` for activations (see memory_report): its arena
    plus every byte its CUDA graph's private pool reserves (temporaries freed during capture,
    which every replay reuses, and the steps' caches), less the outputs, which live there too.
    The pool is read from the allocator's snapshot, so memory that other code frees meanwhile
    cannot hide growth; without snapshots, the allocator's growth since ``base`` is used."""
    try:
        pool = tuple(graph.pool())
        pool_bytes = sum(
            int(seg["total_size"])
            for seg in torch.cuda.memory_snapshot()
            if tuple(seg.get("segment_pool_id", ())) == pool
        )
        act = arena_bytes + pool_bytes - out_bytes
    except Exception:  # noqa: BLE001 (an allocator without snapshots: count what is held)
        act = torch.cuda.memory_allocated(dev) - base - out_bytes
    return {
        "device": torch.cuda.get_device_name(dev),
        "activation_bytes_measured": int(act),
        "graph_pool_extra_bytes": int(act - arena_bytes),
        "peak_bytes_measured": int(warm_peak - out_bytes),
        "output_bytes": int(out_bytes),
    }


def _nbytes(v: Value) -> int:
    from ..ir import dtypes

    return math.prod(v.shape) * dtypes.ITEMSIZE[v.dtype]
