"""A compiled model: :class:`Program` (graph + weights + meta) and its executor.

The constructor partitions the graph (:mod:`kernforge.passes.partition`) and plans activation
buffers (:mod:`kernforge.runtime.memory`); both are pure functions of the graph, so a saved and
loaded program runs exactly as it compiled. Execution modes:

- ``gpu``: catalog ops and generated kernels on CUDA; :meth:`Program.prepare` (run at compile
  and load on a GPU, else by the first call) warms up (compiles and tunes every kernel), then
  captures the whole forward as one CUDA graph over static input buffers, so every buffer is
  allocated then, in the graph's pool; calls copy the inputs in and replay it;
- ``interpret``: the same steps on the CPU, generated kernels under Triton's interpreter;
- ``numpy``: the graph evaluated op by op with :mod:`kernforge.runtime.simulate` (the reference).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import device
from ..errors import ArgumentError, DeviceError, DTypeError, ShapeError
from ..ir import Graph, Value
from ..passes.partition import Partition, Step, partition, subgraph

MODES = ("gpu", "interpret", "numpy")


def default_mode() -> str:
    """``gpu`` when Triton compiles for a CUDA GPU here, else ``interpret``."""
    return "interpret" if device.INTERPRET else "gpu"


@dataclass
class _Compiled:
    """A step made runnable for one mode: ``fn(tensors read) -> tensors written``."""

    step: Step
    fn: Callable[[list[torch.Tensor]], list[torch.Tensor]]
    runs_on: str  # what executes it, for describe()
    reads: list[int] = field(default_factory=list)  # env slots
    writes: list[int] = field(default_factory=list)
    kernels: int = 1
    source: str | None = None


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
        aliases = {
            s.outputs[0].id: s.inputs[0].id
            for s in self.steps
            if s.kind == "view" and len(s.outputs) == 1 and len(s.inputs) == 1
        }
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
            if s.kind in ("catalog", "fallback"):
                reads = [slot[id(v)] for v in s.nodes[0].inputs]  # in argument order, repeats kept
                fn, who = catalog_step(s.nodes[0])
                c = _Compiled(s, (lambda f: lambda xs: [f(xs)])(fn), who, reads, writes)
            elif s.kind == "view":
                c = _Compiled(s, _view_fn(s), "torch view", reads, writes, kernels=0)
            else:
                c = self._fused(s, f"{self.graph.name}_s{i}", interpret, reads, writes)
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
            return _Compiled(s, _op_by_op(g, e), _OP_BY_OP, reads, writes, 0)
        state: dict = {}

        def run(xs: list[torch.Tensor]) -> list[torch.Tensor]:
            xs = [x if x.is_contiguous() else x.contiguous() for x in xs]
            if "fallback" in state:
                return state["fallback"](xs)
            if "ok" in state:
                return prog.run(xs)
            try:  # the first launch compiles; a codegen bug shows here
                out = prog.run(xs)
            except Exception as e:  # noqa: BLE001
                state["fallback"] = _op_by_op(g, e)
                self.meta.setdefault("notes", []).append(
                    f"step {name}: generated kernel failed ({type(e).__name__}: "
                    f"{str(e)[:120]}); runs op by op with torch"
                )
                return state["fallback"](xs)
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
        for c, dead in zip(steps, frees, strict=True):
            res = c.fn([env[i] for i in c.reads])
            for i, t in zip(c.writes, res, strict=True):
                env[i] = t
            for i in dead:
                env[i] = None
        slot = self._slots()
        return [env[slot[id(v)]] for v in self.graph.outputs]

    # -- gpu with a CUDA graph -------------------------------------------------------------

    def _run_graph(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        st = self._graph_state
        if st is None:
            static = [x.clone() for x in inputs]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # compile, tune and settle every kernel before capture
                    self._run_steps(static, "gpu")
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    outs = self._run_steps(static, "gpu")
            except Exception as e:  # noqa: BLE001 (a step that cannot be captured)
                self.cuda_graph = False
                self.meta["cuda_graph_error"] = f"{type(e).__name__}: {e}"
                torch.cuda.synchronize()
                return self._run_steps(list(inputs), "gpu")
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
        for _ in range(iters):
            env = self._env(inputs, mode)
            for k, c in enumerate(steps):
                args = [env[i] for i in c.reads]
                if gpu:
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(True)
                    a.record()
                    res = c.fn(args)
                    b.record()
                    b.synchronize()
                    times[k].append(a.elapsed_time(b))
                else:
                    t0 = time.perf_counter()
                    res = c.fn(args)
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

    def run(xs: list[torch.Tensor]) -> list[torch.Tensor]:
        dev = xs[0].device if xs else torch.device("cuda" if not device.INTERPRET else "cpu")
        env = {id(v): x for v, x in zip(g.inputs, xs, strict=True)}
        for n in g.nodes:
            env[id(n.output)] = evaluate_ir_torch(n, [env[id(v)] for v in n.inputs], dev)
        return [env[id(v)].contiguous() for v in g.outputs]

    run.error = err  # type: ignore[attr-defined]
    return run


def _view_fn(s: Step):
    """A step of reshapes run as torch views (no copy, no kernel)."""
    nodes = s.nodes

    def run(xs: list[torch.Tensor]) -> list[torch.Tensor]:
        env = {id(v): x for v, x in zip(s.inputs, xs, strict=True)}
        for n in nodes:
            x = env[id(n.inputs[0])]
            env[id(n.output)] = x if n.op == "alias" else x.reshape(n.output.shape)
        return [env[id(v)] for v in s.outputs]

    return run


def _nbytes(v: Value) -> int:
    from ..ir import dtypes

    return math.prod(v.shape) * dtypes.ITEMSIZE[v.dtype]
