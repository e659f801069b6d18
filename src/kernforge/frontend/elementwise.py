"""Elementwise ops on traced values: NumPy ufuncs, operators, casts, where, clip.

Dtypes follow NumPy exactly: the loop dtypes come from ``ufunc.resolve_dtypes`` (NEP 50 weak
Python scalars included; bfloat16 per :mod:`kernforge.frontend.dtypes`), every operand is cast
to its loop dtype with a ``cast`` node, and Python scalars become 0-d ``full`` nodes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ..errors import ArgumentError, DTypeError, UnsupportedError
from ..ir import dtypes as ir
from ..ir.ops import FLOAT_ONLY
from . import dtypes
from .values import TracedArray, Tracer, as_traced, at_user, is_weak, tracer_of


def _dtype_of(x: Any) -> Any:
    """What :func:`dtypes.resolve_ufunc` takes for operand ``x``."""
    if isinstance(x, TracedArray):
        return x.ir_dtype
    if is_weak(x):
        return x
    if isinstance(x, np.ndarray | np.generic | torch.Tensor):
        return dtypes.ir_dtype(x.dtype)
    if isinstance(x, list | tuple):
        return dtypes.ir_dtype(np.asarray(x).dtype)
    raise UnsupportedError(at_user(f"cannot use a {type(x).__name__} as an array operand"))


def resolve(ufunc: np.ufunc, args: Sequence[Any]) -> tuple[list[str], list[str]]:
    """NumPy's loop dtypes (inputs, outputs) for ``ufunc(*args)``; errors name the user's line."""
    try:
        return dtypes.resolve_ufunc(ufunc, [_dtype_of(a) for a in args])
    except DTypeError as e:
        raise DTypeError(at_user(str(e))) from None


def operand(x: Any, tracer: Tracer, dtype: str) -> TracedArray:
    """``x`` as a traced value of IR dtype ``dtype`` (casting it, or making a scalar ``full``)."""
    if is_weak(x):
        try:
            return tracer.full((), x, dtype)
        except OverflowError as e:
            raise DTypeError(at_user(f"Python scalar {x!r} does not fit {dtype} ({e})")) from None
    return cast(as_traced(x, tracer), dtype)


def cast(x: TracedArray, dtype: str) -> TracedArray:
    """``x.astype(dtype)``: a ``cast`` node, or ``x`` itself when it already has that dtype."""
    if x.ir_dtype == dtype:
        return x
    return x.tracer.emit("cast", [x], dtype=dtype)


def apply(ufunc: np.ufunc, op: str, args: Sequence[Any]) -> TracedArray:
    """IR op ``op`` on ``args`` with ``ufunc``'s NumPy typing."""
    tracer = tracer_of(*args)
    ins, _ = resolve(ufunc, args)
    xs = [operand(a, tracer, dt) for a, dt in zip(args, ins, strict=True)]
    if op in FLOAT_ONLY and not ir.is_float(ins[0]):
        if op in ("floor", "ceil"):  # NumPy 2 keeps integers as they are
            return xs[0]
        raise DTypeError(at_user(f"{op} takes a float input, got {ins[0]}"))
    return tracer.emit(op, xs)


def _simple(op: str, typing: np.ufunc | None = None) -> Callable[..., TracedArray]:
    def f(*args: Any) -> TracedArray:
        return apply(typing or ufunc_of[op], op, args)

    return f


def _float_unary(op: str) -> Callable[[Any], TracedArray]:
    """A unary float op NumPy lacks (sigmoid, rsqrt, erf): typed like np.exp."""
    return lambda x: apply(np.exp, op, [x])


def _power(a: Any, b: Any) -> TracedArray:
    """``a ** b``; a Python-scalar exponent 1, 2, 0.5, -0.5 or -1 becomes x, mul, sqrt, rsqrt
    or div, which are cheaper and more accurate than pow."""
    if isinstance(a, TracedArray) and is_weak(b) and not isinstance(b, bool):
        ins, _ = resolve(np.power, [a, b])
        x = operand(a, a.tracer, ins[0])
        t = a.tracer
        if b == 1:
            return x
        if b == 2:
            return t.emit("mul", [x, x])
        if ir.is_float(ins[0]):
            if b == 0.5:
                return t.emit("sqrt", [x])
            if b == -0.5:
                return t.emit("rsqrt", [x])
            if b == -1:
                return t.emit("div", [t.full((), 1, ins[0]), x])
        elif b < 0:
            raise ArgumentError(
                at_user(
                    f"integers to negative integer powers ({b}) are not "
                    "allowed (as in NumPy); cast to float first"
                )
            )
    return apply(np.power, "pow", [a, b])


def _square(x: Any) -> TracedArray:
    t = tracer_of(x)
    (dt,), _ = resolve(np.square, [x])
    v = operand(x, t, dt)
    return t.emit("mul", [v, v])


def _reciprocal(x: Any) -> TracedArray:
    t = tracer_of(x)
    (dt,), _ = resolve(np.reciprocal, [x])
    if not ir.is_float(dt):
        raise UnsupportedError(at_user(f"np.reciprocal of integers ({dt}) is not supported"))
    return t.emit("div", [t.full((), 1, dt), operand(x, t, dt)])


def _positive(x: Any) -> TracedArray:
    t = tracer_of(x)
    (dt,), _ = resolve(np.positive, [x])
    return operand(x, t, dt)


def _log10(x: Any) -> TracedArray:
    t = tracer_of(x)
    y = apply(np.log10, "log", [x])
    return t.emit("mul", [y, t.full((), 1 / math.log(10), y.ir_dtype)])


def _isfinite(x: Any) -> TracedArray:
    t = tracer_of(x)
    (dt,), _ = resolve(np.isfinite, [x])
    v = operand(x, t, dt)
    if not ir.is_float(dt):
        return t.emit("eq", [v, v])  # always True, with v's shape
    bad = t.emit("logical_or", [t.emit("isnan", [v]), t.emit("isinf", [v])])
    return t.emit("logical_not", [bad])


def _bitwise(op: str, ufunc: np.ufunc) -> Callable[..., TracedArray]:
    """& | ^ ~ : logical ops on bools; the IR has no integer bitwise ops."""

    def f(*args: Any) -> TracedArray:
        ins, _ = resolve(ufunc, args)
        if any(dt != "bool" for dt in ins):
            raise UnsupportedError(
                at_user(f"np.{ufunc.__name__} on {', '.join(ins)}: bitwise ops are supported on "
                        "bool arrays only (the IR has no integer bitwise ops)")
            )  # fmt: skip
        return apply(ufunc, op, args)

    return f


ufunc_of: dict[str, np.ufunc] = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.true_divide,
    "floordiv": np.floor_divide, "mod": np.remainder, "maximum": np.maximum,
    "minimum": np.minimum, "eq": np.equal, "ne": np.not_equal, "lt": np.less,
    "le": np.less_equal, "gt": np.greater, "ge": np.greater_equal,
    "logical_and": np.logical_and, "logical_or": np.logical_or, "logical_xor": np.logical_xor,
    "logical_not": np.logical_not, "neg": np.negative, "abs": np.absolute, "exp": np.exp,
    "exp2": np.exp2, "log": np.log, "log2": np.log2, "log1p": np.log1p, "expm1": np.expm1,
    "sqrt": np.sqrt, "sin": np.sin, "cos": np.cos, "tanh": np.tanh, "floor": np.floor,
    "ceil": np.ceil, "sign": np.sign, "isnan": np.isnan, "isinf": np.isinf,
}  # fmt: skip

#: NumPy ufunc -> how to trace it.
UFUNCS: dict[np.ufunc, Callable[..., TracedArray]] = {
    uf: _simple(op) for op, uf in ufunc_of.items()
}
UFUNCS.update({
    np.fabs: _simple("abs", np.fabs), np.float_power: _simple("pow", np.float_power),
    np.power: _power, np.square: _square, np.reciprocal: _reciprocal, np.positive: _positive,
    np.log10: _log10, np.isfinite: _isfinite,
    np.bitwise_and: _bitwise("logical_and", np.bitwise_and),
    np.bitwise_or: _bitwise("logical_or", np.bitwise_or),
    np.bitwise_xor: _bitwise("logical_xor", np.bitwise_xor),
    np.invert: _bitwise("logical_not", np.invert),
})  # fmt: skip

sigmoid = _float_unary("sigmoid")
rsqrt = _float_unary("rsqrt")
erf = _float_unary("erf")


def call(ufunc: np.ufunc, *args: Any) -> TracedArray:
    """``ufunc(*args)`` traced, or UnsupportedError naming the ufunc and the user's line."""
    if ufunc is np.matmul:
        from .linalg import matmul

        return matmul(*args)
    handler = UFUNCS.get(ufunc)
    if handler is None:
        names = ", ".join(sorted(u.__name__ for u in UFUNCS))
        raise UnsupportedError(
            at_user(f"np.{ufunc.__name__} is not supported in traced code; supported ufuncs: "
                    f"{names}, matmul")
        )  # fmt: skip
    return handler(*args)


_REDUCE = {
    np.add: "sum", np.multiply: "prod", np.maximum: "max", np.minimum: "min",
    np.logical_and: "all", np.logical_or: "any",
}  # fmt: skip


def array_ufunc(ufunc: np.ufunc, method: str, inputs: Sequence[Any], kwargs: dict) -> Any:
    """``TracedArray.__array_ufunc__``: ``ufunc(...)`` and ``ufunc.reduce(...)``."""
    from . import reductions

    if kwargs.get("out") is not None:
        raise UnsupportedError(
            at_user(
                f"np.{ufunc.__name__}(..., out=...): in-place results "
                "are not supported in traced code; use the return value"
            )
        )
    extra = sorted(k for k, v in kwargs.items() if k != "out" and v is not None)
    if method == "__call__":
        if extra:
            raise UnsupportedError(
                at_user(f"np.{ufunc.__name__}: keyword arguments {extra} are not supported")
            )
        return call(ufunc, *inputs)
    if method == "reduce" and ufunc in _REDUCE:
        (x,) = inputs
        axis = kwargs.get("axis", 0)
        keepdims = bool(kwargs.get("keepdims", False))
        fn = getattr(reductions, _REDUCE[ufunc])
        if kwargs.get("dtype") is not None:
            x = cast(as_traced(x, tracer_of(x)), dtypes.ir_dtype(kwargs["dtype"]))
        bad = [k for k in extra if k not in ("axis", "keepdims", "dtype")]
        if bad:
            raise UnsupportedError(at_user(f"np.{ufunc.__name__}.reduce: {bad} not supported"))
        return fn(x, axis=axis, keepdims=keepdims)
    raise UnsupportedError(at_user(f"np.{ufunc.__name__}.{method} is not supported in traced code"))


def where(condition: Any, x: Any = None, y: Any = None) -> TracedArray:
    """``np.where(condition, x, y)`` (the one-argument form has a data-dependent shape)."""
    if x is None or y is None:
        raise UnsupportedError(
            at_user("np.where(condition) with one argument (nonzero) has a data-dependent "
                    "shape; use np.where(condition, x, y)")
        )  # fmt: skip
    t = tracer_of(condition, x, y)
    c = cast(as_traced(condition, t), "bool")
    try:
        dt = dtypes.result_type(_dtype_of(x), _dtype_of(y))
    except DTypeError as e:
        raise DTypeError(at_user(str(e))) from None
    return t.emit("where", [c, operand(x, t, dt), operand(y, t, dt)])


def clip(a: Any, a_min: Any = None, a_max: Any = None, out: Any = None, **kwargs: Any) -> Any:
    """``np.clip(a, a_min, a_max)`` as ``minimum(maximum(a, a_min), a_max)`` (NumPy 2 typing:
    the result dtype promotes all three)."""
    a_min = kwargs.pop("min", a_min)
    a_max = kwargs.pop("max", a_max)
    if out is not None or kwargs:
        raise UnsupportedError(at_user(f"np.clip: out=/{sorted(kwargs)} are not supported"))
    t = tracer_of(a, a_min, a_max)
    bounds = [b for b in (a_min, a_max) if b is not None]
    try:
        dt = dtypes.result_type(*(_dtype_of(v) for v in (a, *bounds)))
    except DTypeError as e:
        raise DTypeError(at_user(str(e))) from None
    y = operand(a, t, dt)
    if a_min is not None:
        y = t.emit("maximum", [y, operand(a_min, t, dt)])
    if a_max is not None:
        y = t.emit("minimum", [y, operand(a_max, t, dt)])
    return y
