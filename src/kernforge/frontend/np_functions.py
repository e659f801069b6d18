"""``TracedArray.__array_function__``: which ``np.*`` functions trace, and how."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import UnsupportedError
from . import creation, dtypes, elementwise, linalg, reductions, shapes
from .values import TracedArray, at_user


def _astype(x: TracedArray, dtype: Any, /, *, copy: bool = True, device: Any = None):
    return x.astype(dtype)


def _shape(a: TracedArray) -> tuple[int, ...]:
    return a.shape


def _ndim(a: TracedArray) -> int:
    return a.ndim


def _size(a: TracedArray, axis: int | None = None) -> int:
    return a.size if axis is None else a.shape[axis]


def _result_type(*arrays_and_dtypes: Any) -> Any:
    return dtypes.public(dtypes.result_type(*arrays_and_dtypes))


#: NumPy function -> its traced implementation (same signature).
FUNCTIONS: dict[Callable, Callable] = {
    np.sum: reductions.sum, np.prod: reductions.prod, np.mean: reductions.mean,
    np.var: reductions.var, np.std: reductions.std, np.max: reductions.max,
    np.amax: reductions.max, np.min: reductions.min, np.amin: reductions.min,
    np.argmax: reductions.argmax, np.argmin: reductions.argmin, np.any: reductions.any,
    np.all: reductions.all,
    np.where: elementwise.where, np.clip: elementwise.clip,
    np.reshape: shapes.reshape, np.ravel: shapes.ravel, np.transpose: shapes.transpose,
    np.swapaxes: shapes.swapaxes, np.moveaxis: shapes.moveaxis,
    np.expand_dims: shapes.expand_dims, np.squeeze: shapes.squeeze,
    np.broadcast_to: shapes.broadcast_to, np.concatenate: shapes.concatenate,
    np.stack: shapes.stack, np.split: shapes.split, np.flip: shapes.flip, np.take: shapes.take,
    np.matmul: linalg.matmul, np.dot: linalg.dot, np.einsum: linalg.einsum,
    np.inner: linalg.inner, np.outer: linalg.outer, np.tensordot: linalg.tensordot,
    np.zeros_like: creation.zeros_like, np.ones_like: creation.ones_like,
    np.empty_like: creation.empty_like, np.full_like: creation.full_like,
    np.shape: _shape, np.ndim: _ndim, np.size: _size,
    np.result_type: _result_type,
}  # fmt: skip


if hasattr(np, "astype"):  # NumPy >= 2.1
    FUNCTIONS[np.astype] = _astype


def array_function(func: Callable, args: Any, kwargs: dict) -> Any:
    """Run the traced implementation of NumPy function ``func``, or raise UnsupportedError
    naming it and the user's line."""
    impl = FUNCTIONS.get(func)
    if impl is None:
        name = getattr(func, "__module__", "numpy").replace("numpy._core.", "numpy.")
        full = f"{name}.{func.__name__}".replace("numpy.", "np.", 1)
        raise UnsupportedError(
            at_user(f"{full} is not supported in traced code (kernforge traces: "
                    f"{', '.join(sorted('np.' + f.__name__ for f in FUNCTIONS))}, and the ufuncs "
                    "of kernforge.np)")
        )  # fmt: skip
    return impl(*args, **kwargs)
