"""``kernforge.np``: the NumPy functions kernforge traces, plus a few NumPy lacks.

Every function here works both on traced values (it records IR nodes) and on plain NumPy
arrays (it computes with NumPy), so one function body runs in every ``kf.jit`` mode. The NumPy
names are NumPy's own functions (they reach traced values through ``__array_ufunc__`` and
``__array_function__``), except the creation functions (zeros, ones, full, empty, arange, eye,
identity, asarray), which record ``full``/``iota`` nodes while a trace is active. Extras:
sigmoid, rsqrt, erf, silu, gelu, softmax, log_softmax, logsumexp, and the dtype marker
:data:`bfloat16` (NumPy arrays hold bfloat16 data as float32).
"""

from __future__ import annotations

import builtins as _builtins
import math
from typing import Any

import numpy as _np
import torch as _torch

from . import creation as _creation
from . import dtypes as _dtypes
from . import elementwise as _ew
from .values import TracedArray as _Traced
from .values import current as _current

bfloat16 = _dtypes.bfloat16

# -- NumPy's own functions (traced through NumPy's dispatch protocols) -----------------------
_UFUNC_NAMES = (
    "abs", "absolute", "add", "subtract", "multiply", "divide", "true_divide", "floor_divide",
    "mod", "remainder", "power", "float_power", "negative", "positive", "exp", "exp2", "log",
    "log2", "log10", "log1p", "expm1", "sqrt", "square", "reciprocal", "sin", "cos", "tanh",
    "floor", "ceil", "sign", "fabs", "maximum", "minimum", "equal", "not_equal", "less",
    "less_equal", "greater", "greater_equal", "logical_and", "logical_or", "logical_xor",
    "logical_not", "bitwise_and", "bitwise_or", "bitwise_xor", "invert", "isnan", "isinf",
    "isfinite", "matmul",
)  # fmt: skip
_FUNCTION_NAMES = (
    "where", "clip", "sum", "prod", "mean", "var", "std", "max", "min", "amax", "amin",
    "argmax", "argmin", "any", "all", "reshape", "ravel", "transpose", "swapaxes", "moveaxis",
    "expand_dims", "squeeze", "broadcast_to", "concatenate", "stack", "split", "flip", "take",
    "dot", "einsum", "inner", "outer", "tensordot", "zeros_like", "ones_like", "empty_like",
    "full_like", "astype", "shape", "ndim", "size", "result_type",
)  # fmt: skip
_DTYPES = (
    "bool_", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "dtype", "ndarray",
)  # fmt: skip
_CONSTANTS = ("pi", "e", "inf", "nan", "newaxis")

_FUNCTION_NAMES = tuple(n for n in _FUNCTION_NAMES if hasattr(_np, n))  # astype: NumPy >= 2.1
for _name in (*_UFUNC_NAMES, *_FUNCTION_NAMES, *_DTYPES, *_CONSTANTS):
    globals()[_name] = getattr(_np, _name)


def _traced(*args: Any) -> bool:
    # builtins: this module's own `any`, `all`, `sum`, `max`... are NumPy's
    return _builtins.any(isinstance(a, _Traced) for a in args)


# -- creation: nodes inside a trace, NumPy arrays outside ---------------------------------------
def _np_dtype(dtype: Any) -> Any:
    return None if dtype is None else _dtypes.to_numpy(_dtypes.ir_dtype(dtype))


def zeros(shape: Any, dtype: Any = float, order: str = "C") -> Any:
    """np.zeros (a ``full`` node inside a trace)."""
    if _current() is not None:
        return _creation.zeros(shape, dtype)
    return _np.zeros(shape, _np_dtype(dtype), order)


def ones(shape: Any, dtype: Any = float, order: str = "C") -> Any:
    """np.ones (a ``full`` node inside a trace)."""
    if _current() is not None:
        return _creation.ones(shape, dtype)
    return _np.ones(shape, _np_dtype(dtype), order)


def empty(shape: Any, dtype: Any = float, order: str = "C") -> Any:
    """np.empty; zeros inside a trace."""
    if _current() is not None:
        return _creation.empty(shape, dtype)
    return _np.empty(shape, _np_dtype(dtype), order)


def full(shape: Any, fill_value: Any, dtype: Any = None, order: str = "C") -> Any:
    """np.full (a ``full`` node inside a trace)."""
    if _current() is not None or _traced(fill_value):
        return _creation.full(shape, fill_value, dtype)
    return _np.full(shape, fill_value, _np_dtype(dtype), order)


def arange(start: Any, stop: Any = None, step: Any = None, dtype: Any = None) -> Any:
    """np.arange (``start + iota * step`` inside a trace)."""
    if _current() is not None:
        return _creation.arange(start, stop, step, dtype)
    args = (start,) if stop is None else (start, stop) if step is None else (start, stop, step)
    return _np.arange(*args, dtype=_np_dtype(dtype))


def eye(N: int, M: int | None = None, k: int = 0, dtype: Any = float) -> Any:
    """np.eye (iota comparisons inside a trace)."""
    if _current() is not None:
        return _creation.eye(N, M, k, dtype)
    return _np.eye(N, M, k, _np_dtype(dtype))


def identity(n: int, dtype: Any = float) -> Any:
    """np.identity."""
    return eye(n, dtype=dtype)


def asarray(a: Any, dtype: Any = None) -> Any:
    """np.asarray; a traced value stays traced (cast to ``dtype`` if given)."""
    if isinstance(a, _Traced):
        return a if dtype is None else a.astype(dtype)
    return _np.asarray(a, _np_dtype(dtype))


# -- functions NumPy lacks ---------------------------------------------------------------------
def _float_np(x: Any) -> _np.ndarray:
    """``x`` as a NumPy array of the float dtype np.exp would compute it in."""
    x = _np.asarray(x)
    dt = _np.exp.resolve_dtypes((x.dtype, None))[0]
    return x.astype(dt, copy=False)


def sigmoid(x: Any) -> Any:
    """1 / (1 + exp(-x)), elementwise."""
    if _traced(x):
        return _ew.sigmoid(x)
    x = _float_np(x)
    with _np.errstate(over="ignore"):
        return (1 / (1 + _np.exp(-x))).astype(x.dtype, copy=False)


def rsqrt(x: Any) -> Any:
    """1 / sqrt(x), elementwise."""
    if _traced(x):
        return _ew.rsqrt(x)
    x = _float_np(x)
    with _np.errstate(divide="ignore", invalid="ignore"):
        return (1 / _np.sqrt(x)).astype(x.dtype, copy=False)


def erf(x: Any) -> Any:
    """The error function, elementwise (NumPy has none; computed with torch)."""
    if _traced(x):
        return _ew.erf(x)
    x = _float_np(x)
    wide = x.astype(_np.float64) if x.dtype != _np.float64 else x
    return _torch.special.erf(_torch.from_numpy(wide)).numpy().astype(x.dtype, copy=False)


def silu(x: Any) -> Any:
    """x * sigmoid(x)."""
    return x * sigmoid(x)


def gelu(x: Any, approximate: str = "none") -> Any:
    """GELU: ``0.5 x (1 + erf(x / sqrt 2))``, or the tanh approximation with
    ``approximate="tanh"``."""
    if approximate == "tanh":
        inner = math.sqrt(2 / math.pi) * (x + 0.044715 * (x * x * x))
        return 0.5 * x * (1 + _np.tanh(inner))
    if approximate != "none":
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return 0.5 * x * (1 + erf(x * (1 / math.sqrt(2))))


def softmax(x: Any, axis: int = -1) -> Any:
    """exp(x - max) / sum(exp(x - max)) along ``axis``."""
    e = _np.exp(x - _np.max(x, axis=axis, keepdims=True))
    return e / _np.sum(e, axis=axis, keepdims=True)


def logsumexp(x: Any, axis: Any = None, keepdims: bool = False) -> Any:
    """log(sum(exp(x))) along ``axis``, shifted by the max (rows of -inf give -inf)."""
    m = _np.max(x, axis=axis, keepdims=True)
    m = _np.where(_np.isfinite(m), m, 0)
    r = _np.log(_np.sum(_np.exp(x - m), axis=axis, keepdims=True)) + m
    return r if keepdims else _np.squeeze(r, axis=axis)


def log_softmax(x: Any, axis: int = -1) -> Any:
    """x - logsumexp(x) along ``axis``."""
    return x - logsumexp(x, axis=axis, keepdims=True)


_EXTRAS = (
    "zeros", "ones", "empty", "full", "arange", "eye", "identity", "asarray", "sigmoid",
    "rsqrt", "erf", "silu", "gelu", "softmax", "logsumexp", "log_softmax", "bfloat16",
)  # fmt: skip
__all__ = [*_UFUNC_NAMES, *_FUNCTION_NAMES, *_DTYPES, *_CONSTANTS, *_EXTRAS]


def __getattr__(name: str) -> Any:
    if hasattr(_np, name):
        raise AttributeError(
            f"kernforge.np has no {name!r}: np.{name} is not supported by kernforge tracing. "
            f"Supported: {', '.join(sorted(n for n in __all__ if not n[0].isupper()))}"
        )
    raise AttributeError(f"module 'kernforge.np' has no attribute {name!r}")
