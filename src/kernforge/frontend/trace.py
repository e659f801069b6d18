"""Tracing a NumPy-style Python function into a verified :class:`~kernforge.ir.Graph`.

Array arguments (NumPy arrays, torch tensors, anything with ``__dlpack__``, or an
:class:`ArgSpec`), also inside lists/tuples/dicts, become graph inputs named after the
function's parameters (``x``, ``ws_0``, ``cfg_scale``); every other argument is static and
baked into the trace. The function is called once on :class:`TracedArray` stand-ins; its
return value (an array, or lists/tuples/dicts of arrays, or None) is flattened into the graph
outputs, and :class:`OutTree` rebuilds it.

``bind(fn, args, kwargs)`` does the argument half alone, so a caller (``kf.jit``) can key its
cache on ``Bound.key`` before deciding whether to trace.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import ArgumentError, UnsupportedError
from ..ir import Graph, Value
from . import dtypes
from .values import TracedArray, Tracer


@dataclass(frozen=True)
class ArgSpec:
    """Shape and dtype of an array argument, for tracing without data."""

    shape: tuple[int, ...]
    dtype: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))
        object.__setattr__(self, "dtype", dtypes.ir_dtype(self.dtype))


def is_array(x: Any) -> bool:
    """Whether ``x`` is traced as an input: an array, tensor, DLPack object or ArgSpec."""
    if isinstance(x, np.ndarray | torch.Tensor | ArgSpec):
        return True
    return hasattr(x, "__dlpack__") and not isinstance(x, type | np.generic)


def spec_of(x: Any) -> ArgSpec:
    """The ArgSpec (shape and IR dtype) of an array argument."""
    if isinstance(x, ArgSpec):
        return x
    if isinstance(x, np.ndarray | torch.Tensor):
        return ArgSpec(tuple(x.shape), dtypes.ir_dtype(x.dtype))
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        try:
            return ArgSpec(tuple(x.shape), dtypes.ir_dtype(x.dtype))
        except Exception:  # e.g. a dtype object we cannot read: ask DLPack
            pass
    t = torch.from_dlpack(x)
    return ArgSpec(tuple(t.shape), dtypes.ir_dtype(t.dtype))


@dataclass(frozen=True)
class Leaf:
    """The position of an array inside the arguments or results."""

    index: int


def _flatten(x: Any, name: str, leaves: list, names: list[str]) -> Any:
    """``x`` with each array replaced by a Leaf (appending it to ``leaves``)."""
    if is_array(x):
        leaves.append(x)
        names.append(name)
        return Leaf(len(leaves) - 1)
    if isinstance(x, list | tuple) and type(x) in (list, tuple):
        return type(x)(_flatten(v, f"{name}_{i}", leaves, names) for i, v in enumerate(x))
    if isinstance(x, dict):
        return {k: _flatten(v, f"{name}_{k}", leaves, names) for k, v in x.items()}
    return x


def _rebuild(skel: Any, values: Sequence[Any]) -> Any:
    if isinstance(skel, Leaf):
        return values[skel.index]
    if isinstance(skel, list | tuple) and type(skel) in (list, tuple):
        return type(skel)(_rebuild(v, values) for v in skel)
    if isinstance(skel, dict):
        return {k: _rebuild(v, values) for k, v in skel.items()}
    return skel


def _hashable(x: Any, where: str) -> Any:
    """A cache-key form of a static argument (types kept: 1 and 1.0 trace differently)."""
    if isinstance(x, Leaf):
        return ("leaf", x.index)
    if isinstance(x, list | tuple):
        return (type(x).__name__, tuple(_hashable(v, where) for v in x))
    if isinstance(x, dict):
        return ("dict", tuple((k, _hashable(v, where)) for k, v in x.items()))
    try:
        hash(x)
    except TypeError:
        raise ArgumentError(
            f"static argument {where} ({type(x).__name__}) is not hashable, so traces cannot "
            "be cached on it; pass arrays, numbers, strings, tuples or other hashable values"
        ) from None
    return (type(x).__name__, x)


@dataclass
class Bound:
    """A call's arguments split into arrays (graph inputs, in order) and static values."""

    arrays: list[Any]
    names: list[str]
    specs: list[ArgSpec]
    skeleton: inspect.BoundArguments  # arguments with arrays replaced by Leaf
    static: dict[str, Any]
    key: tuple

    def call_args(self, values: Sequence[Any]) -> tuple[tuple, dict]:
        """(args, kwargs) for the function, with ``values`` in place of the arrays."""
        ba = self.skeleton
        rebuilt = {k: _rebuild(v, values) for k, v in ba.arguments.items()}
        new = inspect.BoundArguments(ba.signature, rebuilt)  # type: ignore[arg-type]
        return new.args, new.kwargs


def bind(fn: Callable, args: Sequence[Any], kwargs: dict | None = None) -> Bound:
    """Split a call of ``fn`` into array inputs and static arguments (see module docstring)."""
    try:
        sig = inspect.signature(fn)
        ba = sig.bind(*args, **(kwargs or {}))
    except TypeError as e:
        raise ArgumentError(
            f"cannot call {getattr(fn, '__name__', fn)} with these arguments: {e}"
        ) from None
    except ValueError:  # no signature (a builtin): name positional inputs arg0, arg1, ...
        sig = inspect.Signature(
            [inspect.Parameter(f"arg{i}", inspect.Parameter.POSITIONAL_ONLY)
             for i in range(len(args))]
        )  # fmt: skip
        ba = sig.bind(*args)
        if kwargs:
            raise ArgumentError(
                f"{fn!r} has no signature; pass positional arguments only"
            ) from None
    leaves: list[Any] = []
    names: list[str] = []
    arguments = {}
    for name, value in ba.arguments.items():
        arguments[name] = _flatten(value, name, leaves, names)
    skeleton = inspect.BoundArguments(sig, arguments)  # type: ignore[arg-type]
    specs = [spec_of(a) for a in leaves]
    static = {k: v for k, v in arguments.items() if not _has_leaf(v)}
    key = (
        tuple((s.shape, s.dtype) for s in specs),
        tuple((k, _hashable(v, k)) for k, v in arguments.items()),
    )
    return Bound(leaves, names, specs, skeleton, static, key)


def _has_leaf(x: Any) -> bool:
    if isinstance(x, Leaf):
        return True
    if isinstance(x, list | tuple):
        return any(_has_leaf(v) for v in x)
    if isinstance(x, dict):
        return any(_has_leaf(v) for v in x.values())
    return False


@dataclass
class OutTree:
    """How to rebuild a function's return value from the graph outputs."""

    skeleton: Any  # the return value with Leaf(i) for graph output i
    n: int

    def unflatten(self, outputs: Sequence[Any]) -> Any:
        """The return value, with ``outputs[i]`` for graph output i."""
        if len(outputs) != self.n:
            raise ArgumentError(f"expected {self.n} outputs, got {len(outputs)}")
        return _rebuild(self.skeleton, outputs)


@dataclass
class Traced:
    """The result of :func:`trace`: the graph, how to rebuild the return value, and the call's
    static arguments and input names."""

    graph: Graph
    out_tree: OutTree
    static: dict[str, Any]
    input_names: list[str] = field(default_factory=list)
    key: tuple = ()

    def rebuild(self, outputs: Sequence[Any]) -> Any:
        """The function's return value with ``outputs[i]`` for graph output i."""
        return self.out_tree.unflatten(outputs)


def _outputs(result: Any, tracer: Tracer, values: list[Value], where: str) -> Any:
    """``result`` with each array replaced by Leaf(i), appending graph values to ``values``."""
    if isinstance(result, TracedArray):
        if result.tracer is not tracer:
            raise UnsupportedError(f"{where}: returns a traced value from another trace")
        values.append(result.value)
        return Leaf(len(values) - 1)
    if isinstance(result, np.ndarray | np.generic | torch.Tensor):
        values.append(tracer.constant(result).value)
        return Leaf(len(values) - 1)
    if isinstance(result, list | tuple) and type(result) in (list, tuple):
        return type(result)(_outputs(r, tracer, values, where) for r in result)
    if isinstance(result, dict):
        return {k: _outputs(v, tracer, values, where) for k, v in result.items()}
    if result is None:
        return None
    raise UnsupportedError(
        f"{where} returned a {type(result).__name__} ({result!r:.60}); traced functions return "
        "arrays (or lists, tuples or dicts of arrays). For a Python scalar, return "
        "np.asarray(value) computed outside, or an array expression."
    )


def trace_bound(fn: Callable, bound: Bound, name: str | None = None) -> Traced:
    """Trace ``fn`` on the arguments of ``bound`` (see :func:`bind`)."""
    gname = name or getattr(fn, "__name__", "graph")
    tracer = Tracer(gname)
    inputs = [
        tracer.input(s.shape, s.dtype, n) for s, n in zip(bound.specs, bound.names, strict=True)
    ]
    args, kwargs = bound.call_args(inputs)
    with tracer:
        result = fn(*args, **kwargs)
        values: list[Value] = []
        skeleton = _outputs(result, tracer, values, gname)
    tracer.graph.set_outputs(values)
    tracer.graph.verify()
    return Traced(
        tracer.graph, OutTree(skeleton, len(values)), bound.static, bound.names, bound.key
    )


def trace(
    fn: Callable, args: Sequence[Any], kwargs: dict | None = None, name: str | None = None
) -> Traced:
    """Trace ``fn(*args, **kwargs)`` into a verified IR graph (see the module docstring)."""
    return trace_bound(fn, bind(fn, args, kwargs), name)
