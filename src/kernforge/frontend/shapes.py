"""Shape ops and indexing on traced values: reshape, transpose, swapaxes, moveaxis,
expand_dims, squeeze, broadcast_to, concatenate, stack, split, flip, take, and ``x[...]``.

Basic indexing (ints, slices with any step, None, Ellipsis) becomes one ``slice`` node and one
``reshape``; one integer-array index (a captured NumPy array, a list, or a traced integer
array) becomes a ``take`` along its axis, placed where NumPy's advanced-indexing rules put it.
Take indices reach the IR in ``[0, n)``: negative captured indices are wrapped at trace time
and traced indices get ``where(i < 0, i + n, i)``. Ops that leave the array as it is add no node.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..errors import ShapeError, UnsupportedError
from ..ir import dtypes as ir
from ..ir.ops import broadcast_shapes, check_axes
from . import dtypes
from .elementwise import cast
from .values import TracedArray, as_traced, at_user, tracer_of


def _arg(a: Any) -> TracedArray:
    return as_traced(a, tracer_of(a))


def _axis(axis: Any, ndim: int, op: str) -> int:
    if not isinstance(axis, int | np.integer):
        raise ShapeError(at_user(f"{op}: axis must be an int, got {axis!r}"))
    if not -ndim <= axis < ndim:
        raise ShapeError(at_user(f"{op}: axis {axis} is out of range for a {ndim}-d array"))
    return int(axis) % ndim


def _axes(axes: Sequence[int], ndim: int, op: str) -> tuple[int, ...]:
    try:
        return check_axes([int(a) for a in axes], ndim, op)
    except ShapeError as e:
        raise ShapeError(at_user(str(e))) from None


def _int_tuple(shape: Any) -> tuple[int, ...]:
    if isinstance(shape, int | np.integer):
        return (int(shape),)
    return tuple(int(n) for n in shape)


def reshape(
    a: Any, shape: Any = None, order: str = "C", *, newshape: Any = None, copy: Any = None
) -> TracedArray:
    """np.reshape (C order; one -1 is inferred)."""
    x = _arg(a)
    shape = newshape if shape is None else shape
    if order != "C":
        raise UnsupportedError(at_user(f"reshape(order={order!r}): only C order is supported"))
    new = list(_int_tuple(shape))
    if new.count(-1) > 1:
        raise ShapeError(at_user(f"reshape: can only infer one dimension, got {tuple(new)}"))
    if -1 in new:
        known = math.prod(n for n in new if n != -1)
        if known == 0 or x.size % known:
            raise ShapeError(
                at_user(f"cannot reshape an array of shape {x.shape} into {tuple(new)}")
            )
        new[new.index(-1)] = x.size // known
    if tuple(new) == x.shape:
        return x
    return x.tracer.emit("reshape", [x], shape=tuple(new))


def ravel(a: Any, order: str = "C") -> TracedArray:
    """np.ravel."""
    return reshape(a, (-1,), order)


def transpose(a: Any, axes: Any = None) -> TracedArray:
    """np.transpose (axes=None reverses them)."""
    x = _arg(a)
    if axes is None:
        perm = tuple(range(x.ndim))[::-1]
    else:
        perm = tuple(int(p) % x.ndim if -x.ndim <= int(p) < x.ndim else int(p) for p in axes)
    if perm == tuple(range(x.ndim)):
        return x
    return x.tracer.emit("transpose", [x], perm=perm)


def swapaxes(a: Any, axis1: int, axis2: int) -> TracedArray:
    """np.swapaxes."""
    x = _arg(a)
    i, j = _axis(axis1, x.ndim, "swapaxes"), _axis(axis2, x.ndim, "swapaxes")
    perm = list(range(x.ndim))
    perm[i], perm[j] = perm[j], perm[i]
    return transpose(x, perm)


def moveaxis(a: Any, source: Any, destination: Any) -> TracedArray:
    """np.moveaxis."""
    x = _arg(a)
    src = [_axis(s, x.ndim, "moveaxis") for s in _int_tuple(source)]
    dst = [_axis(d, x.ndim, "moveaxis") for d in _int_tuple(destination)]
    if len(src) != len(dst):
        raise ShapeError(at_user("moveaxis: source and destination need the same length"))
    order = [n for n in range(x.ndim) if n not in src]
    for d, s in sorted(zip(dst, src, strict=True)):
        order.insert(d, s)
    return transpose(x, order)


def expand_dims(a: Any, axis: Any) -> TracedArray:
    """np.expand_dims (an int or a tuple of axes of the result)."""
    x = _arg(a)
    axes = _int_tuple(axis)
    ndim = x.ndim + len(axes)
    where = _axes(axes, ndim, "expand_dims")
    it = iter(x.shape)
    return reshape(x, tuple(1 if i in where else next(it) for i in range(ndim)))


def squeeze(a: Any, axis: Any = None) -> TracedArray:
    """np.squeeze (axis None drops every size-1 axis)."""
    x = _arg(a)
    if axis is None:
        drop = {i for i, n in enumerate(x.shape) if n == 1}
    else:
        drop = set(_axes(_int_tuple(axis), x.ndim, "squeeze"))
        if any(x.shape[i] != 1 for i in drop):
            raise ShapeError(at_user(f"squeeze: axis {axis} of shape {x.shape} is not of size 1"))
    return reshape(x, tuple(n for i, n in enumerate(x.shape) if i not in drop))


def broadcast_to(array: Any, shape: Any, subok: bool = False) -> TracedArray:
    """np.broadcast_to."""
    x = _arg(array)
    target = _int_tuple(shape)
    if target == x.shape:
        return x
    return x.tracer.emit("broadcast_to", [x], shape=target)


def _common(arrays: Sequence[Any], op: str) -> list[TracedArray]:
    """``arrays`` as traced values of their NumPy result dtype (arrays are all strong)."""
    if isinstance(arrays, TracedArray):
        raise UnsupportedError(at_user(f"np.{op} of one traced array: pass a list of arrays"))
    t = tracer_of(*arrays)
    xs = [as_traced(a, t) for a in arrays]
    if not xs:
        raise ShapeError(at_user(f"np.{op} needs at least one array"))
    dt = dtypes.result_type(*(x.ir_dtype for x in xs))
    return [cast(x, dt) for x in xs]


def concatenate(
    arrays: Sequence[Any],
    axis: Any = 0,
    out: Any = None,
    *,
    dtype: Any = None,
    casting: str = "same_kind",
) -> TracedArray:
    """np.concatenate (axis=None flattens first)."""
    if out is not None:
        raise UnsupportedError(at_user("np.concatenate(out=...) is not supported"))
    xs = _common(arrays, "concatenate")
    if dtype is not None:
        xs = [cast(x, dtypes.ir_dtype(dtype)) for x in xs]
    if axis is None:
        xs, axis = [ravel(x) for x in xs], 0
    if xs[0].ndim == 0:
        raise ShapeError(at_user("np.concatenate: zero-dimensional arrays cannot be concatenated"))
    ax = _axis(axis, xs[0].ndim, "concatenate")
    if any(x.ndim != xs[0].ndim for x in xs):
        raise ShapeError(
            at_user(
                f"np.concatenate: arrays have different numbers of dimensions "
                f"{[x.shape for x in xs]}"
            )
        )
    if len(xs) == 1:
        return xs[0]
    return xs[0].tracer.emit("concat", xs, axis=ax)


def stack(
    arrays: Sequence[Any],
    axis: int = 0,
    out: Any = None,
    *,
    dtype: Any = None,
    casting: str = "same_kind",
) -> TracedArray:
    """np.stack: expand_dims then concatenate."""
    xs = _common(arrays, "stack")
    if any(x.shape != xs[0].shape for x in xs):
        raise ShapeError(
            at_user(
                f"np.stack: all input arrays must have the same shape, got {[x.shape for x in xs]}"
            )
        )
    ax = _axis(axis, xs[0].ndim + 1, "stack")
    return concatenate([expand_dims(x, ax) for x in xs], ax, out, dtype=dtype)


def _slice_axis(x: TracedArray, axis: int, start: int, stop: int, step: int) -> TracedArray:
    n = x.shape[axis]
    start, stop, step = slice(start, stop, step).indices(n)
    size = len(range(start, stop, step))
    if (start, step, size) == (0, 1, n):
        return x
    starts = [0] * x.ndim
    steps = [1] * x.ndim
    starts[axis], steps[axis] = (start if size else 0), step
    shape = list(x.shape)
    shape[axis] = size
    return x.tracer.emit("slice", [x], starts=tuple(starts), steps=tuple(steps), shape=tuple(shape))


def split(ary: Any, indices_or_sections: Any, axis: int = 0) -> list[TracedArray]:
    """np.split: equal sections or split points, as slices."""
    x = _arg(ary)
    ax = _axis(axis, x.ndim, "split")
    n = x.shape[ax]
    if isinstance(indices_or_sections, int | np.integer):
        k = int(indices_or_sections)
        if k <= 0 or n % k:
            raise ShapeError(
                at_user(
                    f"np.split: {k} sections do not divide axis {ax} of size "
                    f"{n} equally (use split points instead)"
                )
            )
        points = [n // k * i for i in range(1, k)]
    else:
        points = [int(p) for p in indices_or_sections]
    bounds = [0, *points, n]
    return [_slice_axis(x, ax, lo, hi, 1) for lo, hi in zip(bounds, bounds[1:], strict=False)]


def flip(m: Any, axis: Any = None) -> TracedArray:
    """np.flip: a slice with step -1 on each axis."""
    x = _arg(m)
    axes = range(x.ndim) if axis is None else _axes(_int_tuple(axis), x.ndim, "flip")
    for a in axes:
        x = _slice_axis(x, a, None, None, -1)  # type: ignore[arg-type]
    return x


def _index_array(idx: Any, x: TracedArray, axis: int) -> TracedArray:
    """Integer indices along ``axis`` of ``x`` as a traced int array with values in [0, n)."""
    n = x.shape[axis]
    t = x.tracer
    if isinstance(idx, TracedArray):
        if not ir.is_int(idx.ir_dtype):
            if idx.ir_dtype == "bool":
                raise UnsupportedError(
                    at_user(
                        "indexing with a traced bool mask has a data-dependent shape; use np.where"
                    )
                )
            raise ShapeError(at_user(f"indices must be integers, got {idx.ir_dtype}"))
        if idx.ir_dtype.startswith("uint"):
            return idx
        neg = t.emit("lt", [idx, t.full((), 0, idx.ir_dtype)])
        wrapped = t.emit("add", [idx, t.full((), n, idx.ir_dtype)])
        return t.emit("where", [neg, wrapped, idx])
    if isinstance(idx, torch.Tensor):
        idx = idx.detach().cpu().numpy()
    arr = np.asarray(idx)
    if arr.dtype == bool:
        if arr.ndim != 1 or arr.shape[0] != n:
            raise ShapeError(
                at_user(f"a bool index of shape {arr.shape} does not match axis {axis} of size {n}")
            )
        arr = np.nonzero(arr)[0]  # a captured mask is static: its positions are known now
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ShapeError(at_user(f"indices must be integers, got {arr.dtype}"))
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < -n or arr.max() >= n):
        raise ShapeError(
            at_user(
                f"index {arr.max() if arr.max() >= n else arr.min()} is out of "
                f"bounds for axis {axis} with size {n}"
            )
        )
    return t.constant(np.where(arr < 0, arr + n, arr))


def take(
    a: Any, indices: Any, axis: Any = None, out: Any = None, mode: str = "raise"
) -> TracedArray:
    """np.take along one axis (axis=None takes from the flattened array)."""
    x = _arg(a)
    if out is not None or mode != "raise":
        raise UnsupportedError(at_user("np.take: out= and mode= are not supported"))
    if axis is None:
        x, axis = ravel(x), 0
    ax = _axis(axis, x.ndim, "take")
    if isinstance(indices, int | np.integer):
        i = int(indices)
        if not -x.shape[ax] <= i < x.shape[ax]:
            raise ShapeError(
                at_user(f"index {i} is out of bounds for axis {ax} with size {x.shape[ax]}")
            )
        i %= x.shape[ax]
        y = _slice_axis(x, ax, i, i + 1, 1)
        return reshape(y, x.shape[:ax] + x.shape[ax + 1 :])
    idx = _index_array(indices, x, ax)
    return x.tracer.emit("take", [x, idx], axis=ax)


def _is_array_index(k: Any) -> bool:
    return isinstance(k, TracedArray | np.ndarray | list | torch.Tensor)


def getitem(x: TracedArray, key: Any) -> TracedArray:
    """``x[key]`` with NumPy's basic indexing plus one integer-array index."""
    key = key if isinstance(key, tuple) else (key,)
    for k in key:
        if isinstance(k, bool | np.bool_):
            raise UnsupportedError(at_user("indexing with a Python bool is not supported"))
        if not (
            k is None
            or k is Ellipsis
            or isinstance(k, slice | int | np.integer)
            or _is_array_index(k)
        ):
            raise UnsupportedError(
                at_user(f"index {k!r} of type {type(k).__name__} is not supported")
            )
    if sum(k is Ellipsis for k in key) > 1:
        raise ShapeError(at_user("an index can only have a single ellipsis ('...')"))
    used = sum(k is not None and k is not Ellipsis for k in key)
    if used > x.ndim:
        raise ShapeError(at_user(f"too many indices: {used} for a {x.ndim}-d array"))
    fill = (slice(None),) * (x.ndim - used)
    if any(k is Ellipsis for k in key):
        key = tuple(k2 for k in key for k2 in (fill if k is Ellipsis else (k,)))
    else:
        key = key + fill
    arrays = [i for i, k in enumerate(key) if _is_array_index(k)]
    if len(arrays) > 1:
        raise UnsupportedError(
            at_user(
                "more than one integer-array index (NumPy advanced "
                "indexing) is not supported; index one axis at a time"
            )
        )

    starts, steps, sizes, out_shape = [], [], [], []
    advanced: list[int] = []  # key positions of ints and the array (NumPy's advanced indices)
    array_dim = None  # where the array-indexed axis lands in out_shape
    axis = 0
    for pos, k in enumerate(key):
        if k is None:
            out_shape.append(1)
            continue
        n = x.shape[axis]
        if isinstance(k, slice):
            start, stop, step = k.indices(n)
            size = len(range(start, stop, step))
            starts.append(start if size else 0)
            steps.append(step)
            sizes.append(size)
            out_shape.append(size)
        elif _is_array_index(k):
            advanced.append(pos)
            starts.append(0)
            steps.append(1)
            sizes.append(n)
            array_dim = len(out_shape)
            out_shape.append(n)
        else:
            i = int(k)
            if not -n <= i < n:
                raise ShapeError(
                    at_user(f"index {i} is out of bounds for axis {axis} with size {n}")
                )
            advanced.append(pos)
            starts.append(i % n)
            steps.append(1)
            sizes.append(1)
        axis += 1

    y = x
    if tuple(sizes) != x.shape or any(s != 0 for s in starts) or any(s != 1 for s in steps):
        y = x.tracer.emit(
            "slice", [x], starts=tuple(starts), steps=tuple(steps), shape=tuple(sizes)
        )
    y = reshape(y, tuple(out_shape))
    if array_dim is None:
        return y
    y = y.tracer.emit("take", [y, _index_array(key[arrays[0]], y, array_dim)], axis=array_dim)
    contiguous = advanced == list(range(advanced[0], advanced[-1] + 1))
    if contiguous or array_dim == 0:
        return y
    nidx = y.ndim - len(out_shape) + 1  # dims the index array contributes
    front = list(range(array_dim, array_dim + nidx))
    return transpose(y, front + [d for d in range(y.ndim) if d not in front])


def check_broadcast(*shapes: Sequence[int]) -> tuple[int, ...]:
    """NumPy broadcasting of ``shapes``; a ShapeError names the user's line."""
    try:
        return broadcast_shapes(*(tuple(s) for s in shapes))
    except ShapeError as e:
        raise ShapeError(at_user(str(e))) from None
