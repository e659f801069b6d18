"""The tracer and the traced value that user code sees in place of an array.

A :class:`Tracer` owns the :class:`~kernforge.ir.Graph` being built; a :class:`TracedArray` is
one of its values. Operators, methods, ``np.*`` ufuncs (``__array_ufunc__``) and ``np.*``
functions (``__array_function__``) on traced arrays append nodes. Every node records the line
of user code that made it (``file.py:LINE: source``), found by walking out of kernforge and
NumPy frames, so that errors can point there.
"""

from __future__ import annotations

import importlib
import linecache
import math
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from ..errors import KernforgeError, TraceError, UnsupportedError
from ..ir import Graph, Value
from ..ir import dtypes as ir
from . import dtypes

#: Largest captured array baked into a trace as a ``constant`` node (elements).
MAX_CONSTANT = 1 << 20

_SKIP = tuple(
    os.path.dirname(os.path.abspath(p)) + os.sep
    for p in (os.path.dirname(os.path.abspath(__file__)), np.__file__)
)


def user_loc() -> str | None:
    """``file.py:LINE: source`` of the innermost frame outside kernforge and NumPy."""
    f = sys._getframe(1)
    while f is not None and os.path.abspath(f.f_code.co_filename).startswith(_SKIP):
        f = f.f_back
    if f is None:
        return None
    path, line = f.f_code.co_filename, f.f_lineno
    src = linecache.getline(path, line).strip()
    return f"{os.path.basename(path)}:{line}: {src}" if src else f"{os.path.basename(path)}:{line}"


def at_user(msg: str) -> str:
    """``msg`` prefixed with the user's source line."""
    loc = user_loc()
    return f"{loc}: {msg}" if loc else msg


_local = threading.local()


def current() -> Tracer | None:
    """The innermost active tracer on this thread, or None outside tracing."""
    stack = getattr(_local, "stack", None)
    return stack[-1] if stack else None


class Tracer:
    """Builds one graph; active (see :func:`current`) inside ``with tracer:``."""

    def __init__(self, name: str = "graph") -> None:
        self.graph = Graph(name)

    def __enter__(self) -> Tracer:
        if not hasattr(_local, "stack"):
            _local.stack = []
        _local.stack.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _local.stack.pop()

    def input(self, shape: Sequence[int], dtype: str, name: str | None = None) -> TracedArray:
        return TracedArray(self, self.graph.input(shape, dtype, name))

    def emit(self, op: str, inputs: Sequence[TracedArray] = (), **attrs: Any) -> TracedArray:
        """Append ``op(*inputs, **attrs)``; IR shape/dtype errors get the user's line."""
        loc = user_loc()
        for x in inputs:
            if x.tracer is not self:
                raise TraceError(f"{loc}: a traced value from another trace was used here")
        try:
            v = self.graph.add(op, [x.value for x in inputs], loc, **attrs)
        except KernforgeError as e:
            raise type(e)(f"{loc}: {e}" if loc else str(e)) from None
        return TracedArray(self, v)

    def full(self, shape: Sequence[int], value: Any, dtype: str) -> TracedArray:
        """A ``full`` node: ``value`` (converted as NumPy would store it in ``dtype``)."""
        return self.emit("full", shape=tuple(shape), value=scalar_value(value, dtype), dtype=dtype)

    def constant(self, arr: Any, dtype: str | None = None) -> TracedArray:
        """A captured array (NumPy array or scalar, torch tensor, nested list) baked into the
        graph: a ``full`` node when all its elements are equal, else a ``constant`` node."""
        if isinstance(arr, torch.Tensor):
            dtype = dtype or dtypes.ir_dtype(arr.dtype)
            t = arr.detach().cpu()
            arr = (t.float() if t.dtype == torch.bfloat16 else t).numpy()
        arr = np.asarray(arr)
        dtype = dtype or dtypes.ir_dtype(arr.dtype)
        arr = arr.astype(dtypes.to_numpy(dtype), copy=False)
        if arr.size > MAX_CONSTANT:
            raise UnsupportedError(
                at_user(
                    f"a captured array of shape {arr.shape} ({arr.size} elements) is too large "
                    f"to bake into the trace (limit {MAX_CONSTANT}); pass it as an argument"
                )
            )
        if arr.size > 0:
            first = arr.reshape(-1)[0]
            same = arr == first
            if dtypes.ir.is_float(dtype) and np.isnan(first):
                same = np.isnan(arr)
            if bool(np.all(same)):
                return self.full(arr.shape, first.item(), dtype)
        return self.emit("constant", data=arr.tolist(), shape=arr.shape, dtype=dtype)


def scalar_value(value: Any, dtype: str) -> bool | int | float:
    """``value`` as a Python scalar of IR dtype ``dtype`` (NumPy 2 conversion rules: an int out
    of the dtype's range is an OverflowError; floats to ints truncate)."""
    if isinstance(value, np.generic | np.ndarray):
        value = value.item()
    if dtype == "bool":
        return bool(value)
    if ir.is_int(dtype):
        if isinstance(value, float):
            if not math.isfinite(value):
                raise OverflowError(f"cannot store {value} in {dtype}")
            value = int(value)
        return dtypes.to_numpy(dtype).type(value).item()
    return float(value)


def tracer_of(*args: Any) -> Tracer:
    """The tracer of the traced values among ``args`` (nested in lists/tuples too)."""
    for a in args:
        if isinstance(a, TracedArray):
            return a.tracer
        if isinstance(a, list | tuple):
            for b in a:
                if isinstance(b, TracedArray):
                    return b.tracer
    t = current()
    if t is None:
        raise TraceError("no traced value among the arguments and no active trace")
    return t


def is_weak(x: Any) -> bool:
    """A Python int/float/bool scalar, which NumPy 2 promotes weakly."""
    return isinstance(x, bool | int | float) and not isinstance(x, np.generic)


def as_traced(x: Any, tracer: Tracer, dtype: str | None = None) -> TracedArray:
    """``x`` as a traced value of ``tracer``: traced values as they are (cast to ``dtype`` if
    given), Python scalars as 0-d ``full`` (of ``dtype``, or their default NumPy dtype), and
    captured arrays as constants."""
    if isinstance(x, TracedArray):
        if x.tracer is not tracer:
            raise TraceError(at_user("a traced value from another trace was used here"))
        return x if dtype is None else x.astype(dtype)
    if is_weak(x):
        return tracer.full((), x, dtype or dtypes.result_type(x))
    if isinstance(x, complex):
        raise UnsupportedError(at_user(f"complex value {x!r}: the IR has no complex dtypes"))
    if isinstance(x, np.ndarray | np.generic | torch.Tensor | list | tuple):
        c = tracer.constant(x)
        return c if dtype is None else c.astype(dtype)
    raise UnsupportedError(
        at_user(f"cannot use a {type(x).__name__} ({x!r:.60}) as an array in traced code")
    )


def _unknown(what: str) -> TraceError:
    return TraceError(
        at_user(
            f"{what} needs the value of a traced array, which is not known at trace time "
            "(data-dependent control flow). Compute both branches and select with np.where, "
            "or pass the value as a static Python argument."
        )
    )


class TracedArray:
    """Stands for an array while a function is traced: it has a static shape and dtype, and
    every operation on it records an IR node. ``dtype`` is a NumPy dtype, or
    :data:`kernforge.np.bfloat16` for bfloat16 values."""

    __slots__ = ("tracer", "value")
    __array_priority__ = 1000
    __hash__ = None  # type: ignore[assignment]  # like ndarray: == is elementwise

    def __init__(self, tracer: Tracer, value: Value) -> None:
        self.tracer = tracer
        self.value = value

    # -- static facts ----------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return self.value.shape

    @property
    def ndim(self) -> int:
        return len(self.value.shape)

    @property
    def size(self) -> int:
        return math.prod(self.value.shape)

    @property
    def ir_dtype(self) -> str:
        return self.value.dtype

    @property
    def dtype(self) -> np.dtype | dtypes.BFloat16Type:
        return dtypes.public(self.value.dtype)

    @property
    def itemsize(self) -> int:
        return ir.ITEMSIZE[self.value.dtype]

    @property
    def nbytes(self) -> int:
        return self.size * self.itemsize

    def __repr__(self) -> str:
        return f"TracedArray(shape={self.shape}, dtype={self.value.dtype})"

    # -- values that are not known at trace time -------------------------------------------
    def __bool__(self) -> bool:
        raise _unknown("`if`/`while`/`and`/`or` on a traced array (bool(x))")

    def __int__(self) -> int:
        raise _unknown("int(x)")

    def __float__(self) -> float:
        raise _unknown("float(x)")

    def __complex__(self) -> complex:
        raise _unknown("complex(x)")

    def __index__(self) -> int:
        raise _unknown("using a traced array as a Python index (operator.index(x))")

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        raise _unknown("converting a traced array to a NumPy array (np.asarray(x))")

    def item(self, *args: Any) -> Any:
        raise _unknown("x.item()")

    def tolist(self) -> Any:
        raise _unknown("x.tolist()")

    def __len__(self) -> int:
        if not self.shape:
            raise TraceError(at_user("len() of a 0-d traced array"))
        return self.shape[0]

    def __iter__(self) -> Iterator[TracedArray]:
        """Static unrolling over the first axis (its size is known at trace time)."""
        if not self.shape:
            raise TraceError(at_user("iteration over a 0-d traced array"))
        return (self[i] for i in range(self.shape[0]))

    def __setitem__(self, key: Any, val: Any) -> None:
        raise UnsupportedError(
            at_user("item assignment (x[...] = v) is not supported in traced code; build the "
                    "result with np.where, np.concatenate or np.pad-free slicing instead")
        )  # fmt: skip

    # -- NumPy protocols -------------------------------------------------------------------
    def __array_ufunc__(self, ufunc: np.ufunc, method: str, *inputs: Any, **kwargs: Any) -> Any:
        return elementwise.array_ufunc(ufunc, method, inputs, kwargs)

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        from .np_functions import array_function

        return array_function(func, args, kwargs)

    def __getitem__(self, key: Any) -> TracedArray:
        return shapes.getitem(self, key)

    # -- methods (NumPy's names and signatures) --------------------------------------------
    @property
    def T(self) -> TracedArray:
        return shapes.transpose(self)

    def astype(self, dtype: Any, *args: Any, **kwargs: Any) -> TracedArray:
        return elementwise.cast(self, dtypes.ir_dtype(dtype))

    def reshape(self, *shape: Any, order: str = "C") -> TracedArray:
        if len(shape) == 1 and isinstance(shape[0], tuple | list):
            shape = tuple(shape[0])
        return shapes.reshape(self, shape, order=order)

    def transpose(self, *axes: Any) -> TracedArray:
        if len(axes) == 1 and (axes[0] is None or isinstance(axes[0], tuple | list)):
            axes = axes[0]
        return shapes.transpose(self, axes or None)

    def swapaxes(self, a: int, b: int) -> TracedArray:
        return shapes.swapaxes(self, a, b)

    def squeeze(self, axis: Any = None) -> TracedArray:
        return shapes.squeeze(self, axis)

    def ravel(self, order: str = "C") -> TracedArray:
        return shapes.reshape(self, (-1,), order=order)

    flatten = ravel

    def copy(self, order: str = "C") -> TracedArray:
        return self

    def clip(self, min: Any = None, max: Any = None, **kwargs: Any) -> TracedArray:
        return elementwise.clip(self, min, max, **kwargs)

    def sum(self, axis=None, dtype=None, out=None, keepdims=False, **kw):  # noqa: D102
        return reductions.sum(self, axis, dtype, out, keepdims, **kw)

    def prod(self, axis=None, dtype=None, out=None, keepdims=False, **kw):  # noqa: D102
        return reductions.prod(self, axis, dtype, out, keepdims, **kw)

    def mean(self, axis=None, dtype=None, out=None, keepdims=False, **kw):  # noqa: D102
        return reductions.mean(self, axis, dtype, out, keepdims, **kw)

    def var(self, axis=None, dtype=None, out=None, ddof=0, keepdims=False, **kw):  # noqa: D102
        return reductions.var(self, axis, dtype, out, ddof, keepdims, **kw)

    def std(self, axis=None, dtype=None, out=None, ddof=0, keepdims=False, **kw):  # noqa: D102
        return reductions.std(self, axis, dtype, out, ddof, keepdims, **kw)

    def max(self, axis=None, out=None, keepdims=False, **kw):  # noqa: D102
        return reductions.max(self, axis, out, keepdims, **kw)

    def min(self, axis=None, out=None, keepdims=False, **kw):  # noqa: D102
        return reductions.min(self, axis, out, keepdims, **kw)

    def argmax(self, axis=None, out=None, *, keepdims=False):  # noqa: D102
        return reductions.argmax(self, axis, out, keepdims=keepdims)

    def argmin(self, axis=None, out=None, *, keepdims=False):  # noqa: D102
        return reductions.argmin(self, axis, out, keepdims=keepdims)

    def any(self, axis=None, out=None, keepdims=False, **kw):  # noqa: D102
        return reductions.any(self, axis, out, keepdims, **kw)

    def all(self, axis=None, out=None, keepdims=False, **kw):  # noqa: D102
        return reductions.all(self, axis, out, keepdims, **kw)

    def dot(self, other: Any) -> TracedArray:
        return linalg.dot(self, other)

    def take(self, indices: Any, axis: Any = None, out: Any = None, mode: str = "raise"):
        return shapes.take(self, indices, axis, out, mode)


class _Lazy:
    """A lowering module (they import this one), imported on first use and then bound in
    place of this stand-in, so import order does not matter."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        mod = importlib.import_module(f"{__package__}.{self._name}")
        globals()[self._name] = mod
        return getattr(mod, attr)


elementwise: Any = _Lazy("elementwise")
linalg: Any = _Lazy("linalg")
reductions: Any = _Lazy("reductions")
shapes: Any = _Lazy("shapes")

_BINARY = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "truediv": np.true_divide,
    "floordiv": np.floor_divide, "mod": np.remainder, "pow": np.power, "and": np.bitwise_and,
    "or": np.bitwise_or, "xor": np.bitwise_xor,
}  # fmt: skip
_COMPARE = {
    "eq": np.equal, "ne": np.not_equal, "lt": np.less, "le": np.less_equal, "gt": np.greater,
    "ge": np.greater_equal,
}  # fmt: skip
_UNARY = {"neg": np.negative, "pos": np.positive, "abs": np.absolute, "invert": np.invert}


def _operator(ufunc: np.ufunc, reflected: bool = False):
    if ufunc.nin == 1:
        return lambda self: elementwise.call(ufunc, self)
    if reflected:
        return lambda self, other: elementwise.call(ufunc, other, self)
    return lambda self, other: elementwise.call(ufunc, self, other)


for _name, _uf in _BINARY.items():
    setattr(TracedArray, f"__{_name}__", _operator(_uf))
    setattr(TracedArray, f"__r{_name}__", _operator(_uf, reflected=True))
for _name, _uf in {**_COMPARE, **_UNARY}.items():
    setattr(TracedArray, f"__{_name}__", _operator(_uf))
TracedArray.__matmul__ = lambda self, other: linalg.matmul(self, other)  # type: ignore[attr-defined]
TracedArray.__rmatmul__ = lambda self, other: linalg.matmul(other, self)  # type: ignore[attr-defined]
