"""``kf.jit``: trace a NumPy-style function once per input signature, fuse it, generate
Triton, and run it in one of four modes.

- ``numpy``: the function runs on NumPy arrays (the reference);
- ``simulate``: the traced IR is evaluated op by op with NumPy (checks the trace);
- ``interpret``: the generated Triton kernels run under Triton's CPU interpreter (checks the
  code generator; what CI runs);
- ``gpu``: the generated kernels run on the GPU.

Inputs may be torch tensors, NumPy arrays or DLPack objects; results come back in the kind
of the inputs (torch tensors, on the inputs' device, if any input is a tensor; else NumPy).
A cached call does one dictionary lookup on the arguments' shapes, dtypes and strides, then
launches the kernels.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .. import device
from ..errors import ArgumentError
from .dtypes import to_torch
from .trace import Leaf, Traced, bind, is_array, trace, trace_bound

MODES = ("numpy", "simulate", "interpret", "gpu")


def default_mode() -> str:
    """``gpu`` when a CUDA GPU is present and Triton compiles for it, else ``interpret``."""
    return "interpret" if device.INTERPRET else "gpu"


@dataclass
class _Entry:
    traced: Traced
    graph: Any  # after the clean-up passes
    paths: list[tuple]  # where each graph input sits in (args, kwargs)
    program: Any = None  # interpret / gpu
    #: positions of the graph inputs in ``args`` when every one is a top-level torch tensor
    #: on the device the kernels run on (the key then guarantees it for every hit)
    direct: list[int] | None = None
    single: bool = False  # the function returns exactly one array


def _key(x) -> Any:
    """The part of the cache key one argument contributes."""
    if isinstance(x, torch.Tensor):
        # Alignment too: Triton specializes pointers on 16-byte alignment.
        return (x.shape, x.dtype, x.stride(), x.device, x.data_ptr() % 16 == 0)
    if isinstance(x, np.ndarray):
        return ("np", x.shape, x.dtype.str, x.strides)
    if isinstance(x, list | tuple):
        return (type(x), tuple(_key(v) for v in x))
    if isinstance(x, dict):
        return ("dict", tuple((k, _key(v)) for k, v in x.items()))
    if is_array(x):
        return _key(torch.from_dlpack(x))
    try:
        hash(x)
    except TypeError:
        raise ArgumentError(
            f"kf.jit: static argument {x!r:.60} is not hashable; pass arrays, numbers, "
            "strings, tuples or other hashable values"
        ) from None
    return (type(x), x)


def _paths(x, path: tuple, found: dict[int, tuple]) -> None:
    if is_array(x):
        found.setdefault(id(x), path)
    elif isinstance(x, list | tuple):
        for i, v in enumerate(x):
            _paths(v, (*path, i), found)
    elif isinstance(x, dict):
        for k, v in x.items():
            _paths(v, (*path, k), found)


def _get(args: tuple, kwargs: dict, path: tuple):
    x = args if path[0] == "a" else kwargs
    for p in path[1:]:
        x = x[p]
    return x


def _as_tensor(a) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a
    if isinstance(a, np.ndarray):
        # torch takes no negative strides (a[::-1]) and no read-only arrays: copy those.
        if any(s < 0 for s in a.strides) or not a.flags.writeable:
            a = a.copy()
        return torch.from_numpy(a)
    return torch.from_dlpack(a)


class JitFunction:
    """A NumPy-style function compiled by :func:`jit`; call it like the function."""

    def __init__(self, fn: Callable, mode: str | None) -> None:
        if mode is not None and mode not in MODES:
            raise ArgumentError(f"kf.jit: unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        self.fn = fn
        self.mode = mode
        self._cache: dict[tuple, _Entry] = {}
        functools.update_wrapper(self, fn)

    # -- public API ------------------------------------------------------------------------

    def __call__(self, *args, **kwargs):
        mode = self.mode or default_mode()
        if mode == "numpy":
            return self._run_numpy(args, kwargs)
        entry = self._entry(args, kwargs, mode)
        if entry.direct is not None:  # the hot path: tensors already where the kernels run
            outs = entry.program.run([args[i] for i in entry.direct])
            return outs[0] if entry.single else entry.traced.rebuild(outs)
        arrays = [_get(args, kwargs, p) for p in entry.paths]
        tensors, kind = _to_target(arrays, mode)
        if mode == "simulate":
            from ..runtime import simulate

            outs = simulate.run(entry.graph, [_to_numpy(t) for t in tensors])
            outs = [_from_numpy(o, v.dtype) for o, v in zip(outs, entry.graph.outputs, strict=True)]
        else:
            outs = entry.program.run(tensors)
        return entry.traced.rebuild([_back(o, kind) for o in outs])

    def trace(self, *args, **kwargs) -> Traced:
        """The trace for these arguments: ``.graph`` is the IR as traced (printable)."""
        return trace(self.fn, args, kwargs, name=self.__name__)

    def lower(self, *args, **kwargs):
        """The kernels for these arguments (a :class:`kernforge.codegen.Lowered`; its
        ``plan.describe()`` says how the graph was fused)."""
        mode = self.mode if self.mode in ("interpret", "gpu") else default_mode()
        return self._entry(args, kwargs, mode).program.lowered

    def source(self, *args, **kwargs) -> str:
        """The generated Triton source for these arguments, every kernel in launch order."""
        return self.lower(*args, **kwargs).source()

    # -- internals -------------------------------------------------------------------------

    def _entry(self, args, kwargs, mode: str) -> _Entry:
        """The cached trace and program for these arguments (built on a miss)."""
        key = (mode, tuple(map(_key, args)))
        if kwargs:
            key += tuple((k, _key(v)) for k, v in kwargs.items())
        entry = self._cache.get(key)
        if entry is None:
            entry = self._cache[key] = self._build(args, kwargs, mode)
        return entry

    def _build(self, args, kwargs, mode: str) -> _Entry:
        from ..codegen import lower
        from ..passes.simplify import simplify
        from ..runtime.program import JitProgram

        bound = bind(self.fn, args, kwargs)
        traced = trace_bound(self.fn, bound, name=self.__name__)
        graph = simplify(traced.graph).verify()
        found: dict[int, tuple] = {}
        _paths(args, ("a",), found)
        _paths(kwargs, ("k",), found)
        entry = _Entry(traced, graph, [found[id(a)] for a in bound.arrays])
        entry.single = isinstance(traced.out_tree.skeleton, Leaf)
        if mode in ("interpret", "gpu"):
            interpret = mode == "interpret"
            other = "mode='gpu'" if interpret else "mode='interpret'"
            device.require_triton_mode(interpret, "kf.jit", other)
            tensors, _ = _to_target(bound.arrays, mode)
            strides = [tuple(t.stride()) for t in tensors]
            entry.program = JitProgram(graph, lower(graph, strides, interpret), interpret)
            target = "cpu" if interpret else "cuda"
            if all(
                len(p) == 2
                and p[0] == "a"
                and isinstance(a, torch.Tensor)
                and a.device.type == target
                for p, a in zip(entry.paths, bound.arrays, strict=True)
            ):
                entry.direct = [p[1] for p in entry.paths]
        return entry

    def _run_numpy(self, args, kwargs):
        kind = _kind([a for a in _leaves((args, kwargs)) if is_array(a)])

        def conv(a):
            return _to_numpy(a) if is_array(a) else a

        out = self.fn(*_map(conv, args), **_map(conv, kwargs))
        return _map(lambda o: _back(_from_numpy(np.asarray(o)), kind) if _is_np(o) else o, out)

    def __repr__(self) -> str:
        return f"<kf.jit {self.__name__} mode={self.mode or default_mode()}>"


def jit(fn: Callable | None = None, *, mode: str | None = None):
    """Compile a NumPy-style function into fused kernels (see the module docs).

    ``@kf.jit``, ``@kf.jit(mode=...)`` or ``kf.jit(fn, mode="numpy" | "simulate" | "interpret"
    | "gpu")``; the default mode is ``gpu`` when a CUDA GPU is present, else ``interpret``.
    """
    if fn is None:
        return lambda f: JitFunction(f, mode)
    return JitFunction(fn, mode)


# -- conversions ---------------------------------------------------------------------------


def _kind(arrays) -> tuple | None:
    """("torch", device) when any input is a tensor or DLPack object, else ("numpy", None)."""
    for a in arrays:
        if not isinstance(a, np.ndarray):
            return ("torch", _as_tensor(a).device)
    return ("numpy", None)


def _to_target(arrays, mode: str) -> tuple[list[torch.Tensor], tuple | None]:
    target = "cuda" if mode == "gpu" else "cpu"
    out = []
    for a in arrays:
        t = _as_tensor(a)
        out.append(t if t.device.type == target else t.to(target))
    return out, _kind(arrays)


def _leaves(x):
    if isinstance(x, list | tuple):
        for v in x:
            yield from _leaves(v)
    elif isinstance(x, dict):
        for v in x.values():
            yield from _leaves(v)
    else:
        yield x


def _map(f, x):
    if isinstance(x, list | tuple) and type(x) in (list, tuple):
        return type(x)(_map(f, v) for v in x)
    if isinstance(x, dict):
        return {k: _map(f, v) for k, v in x.items()}
    return f(x)


def _is_np(x) -> bool:
    return isinstance(x, np.ndarray | np.generic)


def _to_numpy(a) -> np.ndarray:
    if isinstance(a, np.ndarray):
        return a
    t = _as_tensor(a).detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()  # NumPy has no bfloat16: the same values, exactly, in float32
    return t.numpy()


def _from_numpy(a: np.ndarray, dtype: str | None = None) -> torch.Tensor:
    t = torch.from_numpy(np.array(a, order="C"))  # a copy; keeps 0-d arrays 0-d
    return t if dtype is None else t.to(to_torch(dtype))


def _back(t: torch.Tensor, kind) -> Any:
    if kind[0] == "numpy":
        return t.cpu().float().numpy() if t.dtype == torch.bfloat16 else t.cpu().numpy()
    return t.to(kind[1])
