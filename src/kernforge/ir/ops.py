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

# -- model-level ops (the model compiler, docs/compiler.md) --------------------------------
# Kind "weight": a parameter or buffer of the program; "catalog": an op a kernforge catalog
# op runs; "fallback": a torch op the compiler does not cover, run by torch on the same device.
# Optional tensor inputs follow the required ones in a fixed order, flagged by ``has_*`` attrs.


def _attr_tensor(ins, attrs):
    return tuple(attrs["shape"]), dtypes.check(attrs["dtype"])


def _alias(ins, attrs):
    ((shape, dt),) = ins
    return shape, dt


def _conv_out(n: int, k: int, stride: int, pad: int, dil: int, ceil: bool = False) -> int:
    span = n + 2 * pad - dil * (k - 1) - 1
    out = (-(-span // stride) if ceil else span // stride) + 1
    if ceil and (out - 1) * stride >= n + pad:  # PyTorch: the last window starts inside
        out -= 1
    return out


def _spatial(shape: Shape, layout: str, op: str) -> tuple[int, int, int, int]:
    """(N, C, H, W) of a 4-d activation in ``layout`` (nchw | nhwc)."""
    if len(shape) != 4:
        raise ShapeError(f"{op}: expected a 4-d input, got shape {shape}")
    if layout == "nchw":
        return shape[0], shape[1], shape[2], shape[3]
    if layout == "nhwc":
        return shape[0], shape[3], shape[1], shape[2]
    raise ShapeError(f"{op}: layout must be 'nchw' or 'nhwc', got {layout!r}")


def _pack(layout: str, n: int, c: int, h: int, w: int) -> Shape:
    return (n, c, h, w) if layout == "nchw" else (n, h, w, c)


def _conv2d(ins, attrs):
    """x, weight [, bias [C_out]] [, residual (the output's shape)]: act(conv + bias) +
    residual. nchw weights are [O, C/g, KH, KW]; nhwc weights are [O, KH, KW, C/g]."""
    (xs, dt), (ws, _) = ins[0], ins[1]
    layout = attrs.get("layout", "nchw")
    n, c, h, w = _spatial(xs, layout, "conv2d")
    if len(ws) != 4:
        raise ShapeError(f"conv2d: weight must be 4-d, got {ws}")
    o, cg, kh, kw = ws if layout == "nchw" else (ws[0], ws[3], ws[1], ws[2])
    g = attrs.get("groups", 1)
    if cg * g != c or o % g:
        raise ShapeError(f"conv2d: weight {ws} with groups={g} does not fit {c} input channels")
    (sh, sw), (ph, pw), (dh, dw) = attrs["stride"], attrs["padding"], attrs["dilation"]
    out = _pack(layout, n, o, _conv_out(h, kh, sh, ph, dh), _conv_out(w, kw, sw, pw, dw))
    _same_dtype("conv2d", ins[:2])
    rest = list(ins[2:])
    if attrs.get("has_bias"):
        bs, bdt = rest.pop(0)
        if bs != (o,) or bdt != dt:
            raise ShapeError(f"conv2d: bias must be {dt}[{o}], got {bdt}{list(bs)}")
    if attrs.get("has_residual"):
        rs, rdt = rest.pop(0)
        if rs != out or rdt != dt:
            raise ShapeError(f"conv2d: residual must be {dt}{list(out)}, got {rdt}{list(rs)}")
    if rest:
        raise ShapeError(f"conv2d: {len(rest)} inputs more than has_bias/has_residual say")
    return out, dt


def _pool2d(ins, attrs):
    ((xs, dt),) = ins
    layout = attrs.get("layout", "nchw")
    n, c, h, w = _spatial(xs, layout, "max_pool2d")
    (kh, kw), (sh, sw), (ph, pw) = attrs["kernel"], attrs["stride"], attrs["padding"]
    (dh, dw), ceil = attrs.get("dilation", (1, 1)), attrs.get("ceil_mode", False)
    oh, ow = _conv_out(h, kh, sh, ph, dh, ceil), _conv_out(w, kw, sw, pw, dw, ceil)
    return _pack(layout, n, c, oh, ow), dt


def _adaptive_avg_pool2d(ins, attrs):
    ((xs, dt),) = ins
    layout = attrs.get("layout", "nchw")
    n, c, _, _ = _spatial(xs, layout, "adaptive_avg_pool2d")
    oh, ow = attrs["output_size"]
    return _pack(layout, n, c, oh, ow), dt


def _batch_norm(ins, attrs):
    """x [N, C, ...], weight, bias, running_mean, running_var [C] (inference)."""
    (xs, dt), *params = ins
    c = xs[1] if len(xs) > 1 else None
    for s, _ in params:
        if s != (c,):
            raise ShapeError(f"batch_norm: parameters must be [{c}], got {s}")
    return xs, dt


def _linear(ins, attrs):
    """x [..., K], weight [N, K] [, bias [N]] [, residual [..., N]]: act(x @ w.T + b) + r."""
    (xs, dt), (ws, _) = ins[0], ins[1]
    if len(ws) != 2 or ws[1] != xs[-1]:
        raise ShapeError(f"linear: weight {ws} does not take inputs of shape {xs}")
    _same_dtype("linear", ins)
    out = (*xs[:-1], ws[0])
    rest = list(ins[2:])
    if attrs.get("has_bias") and rest.pop(0)[0] != (ws[0],):
        raise ShapeError(f"linear: bias must be [{ws[0]}]")
    if attrs.get("has_residual") and rest.pop(0)[0] != out:
        raise ShapeError(f"linear: residual must be {out}")
    if rest:
        raise ShapeError("linear: more inputs than has_bias/has_residual say")
    return out, dt


def _norm(op: str):
    def infer(ins, attrs):
        (xs, dt), *params = ins
        for s, _ in params:
            if s != (xs[-1],):
                raise ShapeError(f"{op}: weight/bias must be [{xs[-1]}], got {s}")
        return xs, dt

    return infer


def _softmax(ins, attrs):
    ((xs, dt),) = ins
    check_axes([attrs["axis"]], len(xs), "softmax")
    if not dtypes.is_float(dt):
        raise DTypeError(f"softmax takes floats, got {dt}")
    return xs, dt


def _sdpa(ins, attrs):
    """q [B, H, Sq, D], k, v [B, Hk, Sk, D(v)] [, mask broadcastable to [B, H, Sq, Sk]]."""
    (qs, dt), (ks, _), (vs, _) = ins[:3]
    if len(qs) != 4 or len(ks) != 4 or len(vs) != 4 or qs[-1] != ks[-1] or ks[2] != vs[2]:
        raise ShapeError(f"sdpa: q {qs}, k {ks}, v {vs} do not fit [B, H, S, D]")
    if qs[1] % ks[1]:
        raise ShapeError(f"sdpa: {ks[1]} kv heads do not divide {qs[1]} query heads")
    _same_dtype("sdpa", ins[:3])
    return (*qs[:3], vs[3]), dt


def _index_copy(ins, attrs):
    """x, index (int [n]), src: x with ``x[..., index, ...] = src`` along ``axis``."""
    (xs, dt), (ids, idt), (ss, sdt) = ins
    if not dtypes.is_int(idt) or sdt != dt:
        raise DTypeError(f"index_copy: index must be integers and src {dt}, got {idt}, {sdt}")
    return xs, dt


def _index_put(ins, attrs):
    """x, values, *indices (int or None-free): x with ``x[indices] = values``."""
    (xs, dt), (_, vdt), *idx = ins
    if vdt != dt:
        raise DTypeError(f"index_put: values must be {dt}, got {vdt}")
    return xs, dt


_add("weight", "weight", 0, _attr_tensor)
_add("alias", "view", 1, _alias)  # an identity the clean-up pass removes (clone, detach, ...)
_add("conv2d", "catalog", None, _conv2d)
_add("max_pool2d", "catalog", 1, _pool2d)
_add("adaptive_avg_pool2d", "catalog", 1, _adaptive_avg_pool2d)
_add("batch_norm", "catalog", 5, _batch_norm)
_add("linear", "catalog", None, _linear)
_add("layer_norm", "catalog", None, _norm("layer_norm"))
_add("rms_norm", "catalog", None, _norm("rms_norm"))
_add("softmax", "catalog", 1, _softmax)
_add("sdpa", "catalog", None, _sdpa)
_add("index_copy", "catalog", 3, _index_copy)
_add("index_put", "catalog", None, _index_put)
_add("fallback", "fallback", None, _attr_tensor)


def spec(op: str) -> OpSpec:
    """The spec of ``op``, or an UnsupportedError-style KeyError naming the known ops."""
    try:
        return SPECS[op]
    except KeyError:
        from ..errors import UnsupportedError

        raise UnsupportedError(f"unknown IR op {op!r}; known: {', '.join(sorted(SPECS))}") from None
