"""Reductions on traced values, with NumPy's signatures and result dtypes.

sum/prod/max/min/argmax/argmin map to IR reductions; mean, var, std, any and all are lowered
to them (mean = sum / n; var = sum((x - mean)^2) / (n - ddof), two passes like NumPy). Like
NumPy, integer sums accumulate in int64 (uint64 for unsigned), integer means and variances
are float64, and float16/bfloat16 means and variances accumulate in float32.
"""

from __future__ import annotations

import builtins
import math
from typing import Any

import numpy as np

from ..errors import ShapeError, UnsupportedError
from ..ir import dtypes as ir
from ..ir.ops import check_axes
from . import dtypes
from .elementwise import cast
from .values import TracedArray, as_traced, at_user, tracer_of


def _arg(a: Any) -> TracedArray:
    return as_traced(a, tracer_of(a))


def norm_axes(x: TracedArray, axis: Any, op: str) -> tuple[int, ...]:
    """``axis`` (None, an int, or a tuple of ints) as sorted non-negative axes of ``x``."""
    if axis is None:
        return tuple(range(x.ndim))
    axes = (axis,) if isinstance(axis, int | np.integer) else tuple(axis)
    try:
        if x.ndim == 0 and axes:
            raise ShapeError(f"{op}: axis {axes[0]} is out of range for a 0-d array")
        return check_axes([int(a) for a in axes], x.ndim, op)
    except ShapeError as e:
        raise ShapeError(at_user(str(e))) from None


def _check(op: str, out: Any, kw: dict) -> None:
    if out is not None:
        raise UnsupportedError(at_user(f"np.{op}(..., out=...) is not supported in traced code"))
    bad = sorted(k for k, v in kw.items() if v is not None and v is not np._NoValue)
    if bad:
        raise UnsupportedError(at_user(f"np.{op}: arguments {bad} are not supported"))


def reduce(op: str, x: TracedArray, axes: tuple[int, ...], keepdims: bool) -> TracedArray:
    """IR reduction ``op`` over ``axes`` (no node when there are none)."""
    if not axes:
        return x
    return x.tracer.emit(op, [x], axes=axes, keepdims=bool(keepdims))


def _sum_dtype(dt: str) -> str:
    if dt == "bool" or (ir.is_int(dt) and dt.startswith("int")):
        return "int64"
    if ir.is_int(dt):
        return "uint64"
    return dt


def sum(a, axis=None, dtype=None, out=None, keepdims=False, **kw) -> TracedArray:  # noqa: A001
    """np.sum."""
    x = _arg(a)
    _check("sum", out, kw)
    dt = dtypes.ir_dtype(dtype) if dtype is not None else _sum_dtype(x.ir_dtype)
    return reduce("sum", cast(x, dt), norm_axes(x, axis, "sum"), keepdims)


def prod(a, axis=None, dtype=None, out=None, keepdims=False, **kw) -> TracedArray:
    """np.prod."""
    x = _arg(a)
    _check("prod", out, kw)
    dt = dtypes.ir_dtype(dtype) if dtype is not None else _sum_dtype(x.ir_dtype)
    return reduce("prod", cast(x, dt), norm_axes(x, axis, "prod"), keepdims)


def max(a, axis=None, out=None, keepdims=False, **kw) -> TracedArray:  # noqa: A001
    """np.max."""
    x = _arg(a)
    _check("max", out, kw)
    return reduce("max", x, norm_axes(x, axis, "max"), keepdims)


def min(a, axis=None, out=None, keepdims=False, **kw) -> TracedArray:  # noqa: A001
    """np.min."""
    x = _arg(a)
    _check("min", out, kw)
    return reduce("min", x, norm_axes(x, axis, "min"), keepdims)


def any(a, axis=None, out=None, keepdims=False, **kw) -> TracedArray:  # noqa: A001
    """np.any: max of the array as bool."""
    x = _arg(a)
    _check("any", out, kw)
    return reduce("max", cast(x, "bool"), norm_axes(x, axis, "any"), keepdims)


def all(a, axis=None, out=None, keepdims=False, **kw) -> TracedArray:  # noqa: A001
    """np.all: min of the array as bool."""
    x = _arg(a)
    _check("all", out, kw)
    return reduce("min", cast(x, "bool"), norm_axes(x, axis, "all"), keepdims)


def _arg_reduce(op: str, a: Any, axis: Any, out: Any, keepdims: bool) -> TracedArray:
    x = _arg(a)
    _check(op, out, {})
    if axis is None:  # NumPy flattens
        flat = x if x.ndim == 1 else x.tracer.emit("reshape", [x], shape=(x.size,))
        r = flat.tracer.emit(op, [flat], axes=(0,), keepdims=False)
        return r.tracer.emit("reshape", [r], shape=(1,) * x.ndim) if keepdims else r
    if not isinstance(axis, int | np.integer):
        raise UnsupportedError(at_user(f"np.{op} takes one axis (an int) or None, got {axis!r}"))
    axes = norm_axes(x, axis, op)
    return x.tracer.emit(op, [x], axes=axes, keepdims=bool(keepdims))


def argmax(a, axis=None, out=None, *, keepdims=False) -> TracedArray:
    """np.argmax (int64 indices; first occurrence; axis=None flattens)."""
    return _arg_reduce("argmax", a, axis, out, keepdims)


def argmin(a, axis=None, out=None, *, keepdims=False) -> TracedArray:
    """np.argmin."""
    return _arg_reduce("argmin", a, axis, out, keepdims)


def _mean_dtypes(x: TracedArray, dtype: Any) -> tuple[str, str]:
    """(accumulation dtype, result dtype) of np.mean/var/std."""
    dt = dtypes.ir_dtype(dtype) if dtype is not None else x.ir_dtype
    if dtype is None and not ir.is_float(dt):
        return "float64", "float64"
    return ("float32" if ir.is_low_precision(dt) else dt), dt


def _count(x: TracedArray, axes: tuple[int, ...]) -> int:
    return math.prod(x.shape[a] for a in axes)


def mean(a, axis=None, dtype=None, out=None, keepdims=False, **kw) -> TracedArray:
    """np.mean as sum / count."""
    x = _arg(a)
    _check("mean", out, kw)
    axes = norm_axes(x, axis, "mean")
    acc, res = _mean_dtypes(x, dtype)
    t = x.tracer
    s = reduce("sum", cast(x, acc), axes, keepdims)
    m = t.emit("div", [s, t.full((), _count(x, axes), acc)]) if axes else s
    return cast(m, res)


def _var(name: str, a, axis, dtype, out, ddof, keepdims, kw) -> tuple[TracedArray, str]:
    x = _arg(a)
    _check(name, out, kw)
    axes = norm_axes(x, axis, name)
    acc, res = _mean_dtypes(x, dtype)
    t = x.tracer
    xa = cast(x, acc)
    n = _count(x, axes)
    m = t.emit("div", [reduce("sum", xa, axes, True), t.full((), n, acc)])
    d = t.emit("sub", [xa, m])
    s = reduce("sum", t.emit("mul", [d, d]), axes, keepdims)
    return t.emit("div", [s, t.full((), builtins.max(n - ddof, 0), acc)]), res


def var(a, axis=None, dtype=None, out=None, ddof=0, keepdims=False, **kw) -> TracedArray:
    """np.var: two-pass, sum((x - mean)^2) / (n - ddof)."""
    v, res = _var("var", a, axis, dtype, out, ddof, keepdims, kw)
    return cast(v, res)


def std(a, axis=None, dtype=None, out=None, ddof=0, keepdims=False, **kw) -> TracedArray:
    """np.std: sqrt of np.var."""
    v, res = _var("std", a, axis, dtype, out, ddof, keepdims, kw)
    return cast(v.tracer.emit("sqrt", [v]), res)
