"""The IR's operations: for each op name, its kind and how its output shape and dtype follow
from its inputs and attributes.

Semantics are NumPy's, but explicit: elementwise ops broadcast their inputs and take inputs of
one dtype (front ends insert ``cast``), reductions name their axes, views name their layout.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import DTypeError, ShapeError
from . import dtypes

Shape = tuple[int, ...]

UNARY = (
    "neg", "abs", "exp", "exp2", "log", "log2", "log1p", "expm1", "sqrt", "rsqrt", "sin", "cos",
    "tanh", "sigmoid", "erf", "floor", "ceil", "sign",
)  # fmt: skip
#: Unary ops whose result is bool.
PREDICATES = ("isnan", "isinf", "logical_not")
#: Unary ops that need a float input (front ends cast integers first, as NumPy does).
FLOAT_ONLY = tuple(op for op in UNARY if op not in ("neg", "abs", "sign"))
ARITHMETIC = ("add", "sub", "mul", "div", "floordiv", "mod", "pow", "maximum", "minimum")
COMPARISONS = ("eq", "ne", "lt", "le", "gt", "ge")
LOGICAL = ("logical_and", "logical_or", "logical_xor")
BINARY = ARITHMETIC + COMPARISONS + LOGICAL
REDUCTIONS = ("sum", "prod", "max", "min", "argmax", "argmin")
#: Ops that only rearrange elements of their first input.
VIEWS = ("reshape", "transpose", "broadcast_to", "slice")
ELEMENTWISE = (*UNARY, *PREDICATES, *BINARY, "where", "cast")


@dataclass(frozen=True)
class OpSpec:
    """How one op's output shape and dtype follow from its inputs and attributes."""

    name: str
    kind: str  # elementwise | reduce | view | index | create | matmul
    arity: int | None  # None: variadic
    infer: Callable[[Sequence[tuple[Shape, str]], dict[str, Any]], tuple[Shape, str]]


def broadcast_shapes(*shapes: Shape) -> Shape:
    """NumPy broadcasting of ``shapes``, or a ShapeError naming them."""
    ndim = max((len(s) for s in shapes), default=0)
    out = []
    for i in range(ndim):
        sizes = {s[len(s) - ndim + i] for s in shapes if len(s) - ndim + i >= 0} - {1}
        if len(sizes) > 1:
            raise ShapeError(
                f"shapes {', '.join(str(tuple(s)) for s in shapes)} do not broadcast "
                f"(axis {i - ndim}: sizes {sorted(sizes)})"
            )
        out.append(sizes.pop() if sizes else 1)
    return tuple(out)


def _same_dtype(op: str, ins: Sequence[tuple[Shape, str]]) -> str:
    kinds = {dt for _, dt in ins}
    if len(kinds) != 1:
        raise DTypeError(f"{op}: inputs must share a dtype (cast first), got {sorted(kinds)}")
    return kinds.pop()


def _unary(op: str):
    def infer(ins, attrs):
        ((shape, dt),) = ins
        if op in FLOAT_ONLY and not dtypes.is_float(dt):
            raise DTypeError(f"{op} takes a float input, got {dt} (cast it first)")
        return shape, dt

    return infer


def _predicate(op: str):
    def infer(ins, attrs):
        ((shape, dt),) = ins
        return shape, dtypes.BOOL

    return infer


def _binary(op: str):
    def infer(ins, attrs):
        dt = _same_dtype(op, ins)
        shape = broadcast_shapes(*(s for s, _ in ins))
        if op in COMPARISONS or op in LOGICAL:
            return shape, dtypes.BOOL
        if dt == dtypes.BOOL and op not in ("maximum", "minimum", "mul", "add"):
            raise DTypeError(f"{op} does not take bool inputs (cast them first)")
        return shape, dt

    return infer


def _where(ins, attrs):
    (cs, cdt), a, b = ins
    if cdt != dtypes.BOOL:
        raise DTypeError(f"where: the condition must be bool, got {cdt}")
    return broadcast_shapes(cs, a[0], b[0]), _same_dtype("where", [a, b])


def _cast(ins, attrs):
    ((shape, _),) = ins
    return shape, dtypes.check(attrs["dtype"])


def check_axes(axes: Sequence[int], ndim: int, op: str) -> tuple[int, ...]:
    """Sorted, non-negative, unique axes for an array of ``ndim`` dims."""
    out = []
    for a in axes:
        if not -ndim <= a < max(ndim, 1):
            raise ShapeError(f"{op}: axis {a} is out of range for a {ndim}-d array")
        out.append(a % max(ndim, 1))
    if len(set(out)) != len(out):
        raise ShapeError(f"{op}: repeated axis in {tuple(axes)}")
    return tuple(sorted(out))


def _reduce(op: str):
    def infer(ins, attrs):
        ((shape, dt),) = ins
        axes = check_axes(attrs["axes"], len(shape), op)
        if tuple(attrs["axes"]) != axes:
            raise ShapeError(f"{op}: axes must be sorted and non-negative, got {attrs['axes']}")
        if op in ("argmax", "argmin") and len(axes) != 1:
            raise ShapeError(f"{op} reduces exactly one axis, got {axes}")
        if any(shape[a] == 0 for a in axes) and op in ("max", "min", "argmax", "argmin"):
            raise ShapeError(f"{op} of an empty axis has no identity (shape {shape})")
        keep = attrs.get("keepdims", False)
        out = tuple(1 if i in axes else n for i, n in enumerate(shape) if keep or i not in axes)
        return out, ("int64" if op in ("argmax", "argmin") else dt)

    return infer


def _reshape(ins, attrs):
    ((shape, dt),) = ins
    new = tuple(attrs["shape"])
    if math.prod(new) != math.prod(shape) or any(n < 0 for n in new):
        raise ShapeError(f"cannot reshape an array of shape {shape} into {new}")
    return new, dt


def _transpose(ins, attrs):
    ((shape, dt),) = ins
    perm = tuple(attrs["perm"])
    if sorted(perm) != list(range(len(shape))):
        raise ShapeError(f"transpose: {perm} is not a permutation of the {len(shape)} axes")
    return tuple(shape[p] for p in perm), dt


def _broadcast_to(ins, attrs):
    ((shape, dt),) = ins
    target = tuple(attrs["shape"])
    if broadcast_shapes(shape, target) != target:
        raise ShapeError(f"cannot broadcast shape {shape} to {target}")
    return target, dt


def _slice(ins, attrs):
    ((shape, dt),) = ins
    starts, steps, out = attrs["starts"], attrs["steps"], tuple(attrs["shape"])
    if not len(starts) == len(steps) == len(out) == len(shape):
        raise ShapeError(f"slice: starts/steps/shape must have one entry per axis of {shape}")
    for n, start, step, size in zip(shape, starts, steps, out, strict=True):
        last = start + step * (size - 1)
        if step == 0 or (size > 0 and not (0 <= start < n and 0 <= last < n)):
            raise ShapeError(f"slice start {start} step {step} size {size} leaves an axis of {n}")
    return out, dt


def _concat(ins, attrs):
    axis = attrs["axis"]
    first, dt = ins[0]
    _same_dtype("concat", ins)
    for s, _ in ins:
        if len(s) != len(first) or any(
            a != b for i, (a, b) in enumerate(zip(s, first, strict=True)) if i != axis
        ):
            raise ShapeError(
                f"concat along axis {axis}: shapes {[s for s, _ in ins]} differ off that axis"
            )
    size = sum(s[axis] for s, _ in ins)
    return first[:axis] + (size,) + first[axis + 1 :], dt


def _take(ins, attrs):
    (shape, dt), (ishape, idt) = ins
    axis = attrs["axis"]
    if not dtypes.is_int(idt):
        raise DTypeError(f"take: indices must be integers, got {idt}")
    if not 0 <= axis < len(shape):
        raise ShapeError(f"take: axis {axis} out of range for shape {shape}")
    return shape[:axis] + tuple(ishape) + shape[axis + 1 :], dt


def _full(ins, attrs):
    return tuple(attrs["shape"]), dtypes.check(attrs["dtype"])


def _iota(ins, attrs):
    shape = tuple(attrs["shape"])
    if not 0 <= attrs["axis"] < len(shape):
        raise ShapeError(f"iota: axis {attrs['axis']} out of range for shape {shape}")
    return shape, dtypes.check(attrs["dtype"])


def _constant(ins, attrs):
    return tuple(attrs["shape"]), dtypes.check(attrs["dtype"])


def _matmul(ins, attrs):
    (a, adt), (b, bdt) = ins
    if len(a) < 2 or len(b) < 2:
        raise ShapeError(f"matmul takes arrays of 2 or more dims, got {a} and {b}")
    if a[-1] != b[-2]:
        raise ShapeError(f"matmul: contraction sizes differ: {a} @ {b} ({a[-1]} != {b[-2]})")
    dt = _same_dtype("matmul", ins)
    return broadcast_shapes(a[:-2], b[:-2]) + (a[-2], b[-1]), dt


SPECS: dict[str, OpSpec] = {}


def _add(name: str, kind: str, arity: int | None, infer) -> None:
    SPECS[name] = OpSpec(name, kind, arity, infer)


for _op in UNARY:
    _add(_op, "elementwise", 1, _unary(_op))
for _op in PREDICATES:
    _add(_op, "elementwise", 1, _predicate(_op))
for _op in BINARY:
    _add(_op, "elementwise", 2, _binary(_op))
for _op in REDUCTIONS:
    _add(_op, "reduce", 1, _reduce(_op))
_add("where", "elementwise", 3, _where)
_add("cast", "elementwise", 1, _cast)
_add("reshape", "view", 1, _reshape)
_add("transpose", "view", 1, _transpose)
_add("broadcast_to", "view", 1, _broadcast_to)
_add("slice", "view", 1, _slice)
_add("concat", "index", None, _concat)
_add("take", "index", 2, _take)
_add("full", "create", 0, _full)
_add("iota", "create", 0, _iota)
_add("constant", "create", 0, _constant)
_add("matmul", "matmul", 2, _matmul)


def spec(op: str) -> OpSpec:
    """The spec of ``op``, or an UnsupportedError-style KeyError naming the known ops."""
    try:
        return SPECS[op]
    except KeyError:
        from ..errors import UnsupportedError

        raise UnsupportedError(f"unknown IR op {op!r}; known: {', '.join(sorted(SPECS))}") from None
