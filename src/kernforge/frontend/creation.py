"""Array creation inside a trace: zeros, ones, full, empty, arange, eye, identity and the
``*_like`` forms, as ``full`` and ``iota`` nodes (no data is baked into the graph).

``empty``/``empty_like`` give zeros. ``arange(start, stop, step)`` is ``start + iota * step``
computed in its dtype (NumPy's: int64 for ints, float64 when any bound is a float).
"""

from __future__ import annotations

import math
from typing import Any

from ..errors import ArgumentError, TraceError
from ..ir import dtypes as ir
from . import dtypes
from .elementwise import cast
from .shapes import _int_tuple, broadcast_to
from .values import TracedArray, Tracer, as_traced, at_user, current, tracer_of


def _tracer() -> Tracer:
    t = current()
    if t is None:
        raise TraceError("kernforge.np creation functions record nodes only inside a trace")
    return t


def _dt(dtype: Any, default: str = "float64") -> str:
    return default if dtype is None else dtypes.ir_dtype(dtype)


def full(
    shape: Any, fill_value: Any, dtype: Any = None, order: str = "C", **kw: Any
) -> TracedArray:
    """np.full: a ``full`` node (or a broadcast of a traced fill value)."""
    shape = _int_tuple(shape)
    if isinstance(fill_value, TracedArray):
        v = cast(fill_value, _dt(dtype, fill_value.ir_dtype))
        return broadcast_to(v, shape)
    t = _tracer()
    dt = _dt(dtype, dtypes.result_type(fill_value))
    try:
        return t.full(shape, fill_value, dt)
    except OverflowError as e:
        raise ArgumentError(at_user(f"fill value {fill_value!r} does not fit {dt}: {e}")) from None


def zeros(shape: Any, dtype: Any = float, order: str = "C", **kw: Any) -> TracedArray:
    """np.zeros."""
    return full(shape, 0, _dt(dtype))


def ones(shape: Any, dtype: Any = float, order: str = "C", **kw: Any) -> TracedArray:
    """np.ones."""
    return full(shape, 1, _dt(dtype))


empty = zeros


def _like(a: Any, fill: Any, dtype: Any, shape: Any) -> TracedArray:
    x = as_traced(a, tracer_of(a))
    dt = _dt(dtype, x.ir_dtype)
    shp = x.shape if shape is None else _int_tuple(shape)
    with x.tracer:
        return full(shp, fill, dt)


def zeros_like(
    a: Any, dtype: Any = None, order: str = "K", subok: bool = True, shape: Any = None, **kw: Any
) -> TracedArray:
    """np.zeros_like."""
    return _like(a, 0, dtype, shape)


def ones_like(
    a: Any, dtype: Any = None, order: str = "K", subok: bool = True, shape: Any = None, **kw: Any
) -> TracedArray:
    """np.ones_like."""
    return _like(a, 1, dtype, shape)


empty_like = zeros_like


def full_like(
    a: Any,
    fill_value: Any,
    dtype: Any = None,
    order: str = "K",
    subok: bool = True,
    shape: Any = None,
    **kw: Any,
) -> TracedArray:
    """np.full_like (the fill value is converted to the array's dtype, as NumPy does)."""
    return _like(a, fill_value, dtype, shape)


def iota(shape: Any, axis: int, dtype: str = "int64") -> TracedArray:
    """0, 1, 2, ... along ``axis`` of ``shape``: an ``iota`` node."""
    return _tracer().emit("iota", shape=_int_tuple(shape), axis=int(axis), dtype=dtype)


def arange(
    start: Any, stop: Any = None, step: Any = None, dtype: Any = None, **kw: Any
) -> TracedArray:
    """np.arange(start, stop, step): ``start + iota * step``."""
    if stop is None:
        start, stop = 0, start
    step = 1 if step is None else step
    if step == 0:
        raise ArgumentError(at_user("arange: step must not be zero"))
    for v in (start, stop, step):
        if isinstance(v, TracedArray):
            raise TraceError(at_user("arange bounds must be static Python numbers, not traced"))
    natural = dtypes.result_type(start, stop, step)
    dt = _dt(dtype, natural)
    n = max(0, math.ceil((stop - start) / step))
    t = _tracer()
    calc = natural if ir.is_float(natural) or not ir.is_float(dt) else dt
    y = iota((n,), 0, "int64" if ir.is_float(calc) else calc)
    y = cast(y, calc)
    if step != 1:
        y = t.emit("mul", [y, t.full((), step, calc)])
    if start != 0:
        y = t.emit("add", [y, t.full((), start, calc)])
    return cast(y, dt)


def eye(
    N: int, M: int | None = None, k: int = 0, dtype: Any = float, order: str = "C", **kw: Any
) -> TracedArray:
    """np.eye: ``iota(rows) + k == iota(cols)``, cast to ``dtype``."""
    t = _tracer()
    shape = (int(N), int(N if M is None else M))
    rows, cols = iota(shape, 0), iota(shape, 1)
    if k:
        rows = t.emit("add", [rows, t.full((), int(k), "int64")])
    return cast(t.emit("eq", [rows, cols]), _dt(dtype))


def identity(n: int, dtype: Any = float, **kw: Any) -> TracedArray:
    """np.identity."""
    return eye(n, dtype=dtype)
