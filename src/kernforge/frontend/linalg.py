"""matmul, dot, einsum (and outer, inner, tensordot) on traced values.

Everything lowers to the IR's ``matmul`` (2-D or batched, batch dims broadcast) plus
transpose/reshape/sum/mul: 1-D matmul operands are reshaped to 2-D and the added axis dropped,
as NumPy does; an einsum contracts its operands pairwise, left to right, each pair as one
batched matmul (or a broadcast multiply when nothing is contracted).
"""

from __future__ import annotations

import math
import string
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import ArgumentError, DTypeError, ShapeError, UnsupportedError
from . import dtypes
from .elementwise import _dtype_of, cast
from .reductions import reduce
from .shapes import broadcast_to, reshape, transpose
from .values import TracedArray, as_traced, at_user, tracer_of


def _promote(ufunc: np.ufunc, a: Any, b: Any) -> tuple[TracedArray, TracedArray]:
    t = tracer_of(a, b)
    try:
        (da, db), _ = dtypes.resolve_ufunc(ufunc, [_dtype_of(a), _dtype_of(b)])
    except DTypeError as e:
        raise DTypeError(at_user(str(e))) from None
    return cast(as_traced(a, t), da), cast(as_traced(b, t), db)


def matmul(a: Any, b: Any, out: Any = None, **kwargs: Any) -> TracedArray:
    """``a @ b`` with NumPy's rules for 1-D operands and batch broadcasting."""
    if out is not None or kwargs:
        raise UnsupportedError(at_user("np.matmul: out= and other keywords are not supported"))
    x, y = _promote(np.matmul, a, b)
    if x.ndim == 0 or y.ndim == 0:
        raise ShapeError(
            at_user(
                "matmul: input operand does not have enough dimensions "
                f"(shapes {x.shape} and {y.shape}); use * for scalars"
            )
        )
    xv = reshape(x, (1, x.shape[0])) if x.ndim == 1 else x
    yv = reshape(y, (y.shape[0], 1)) if y.ndim == 1 else y
    r = x.tracer.emit("matmul", [xv, yv])
    if x.ndim == 1 or y.ndim == 1:
        shape = r.shape[:-2] + (() if x.ndim == 1 else r.shape[-2:-1])
        shape += () if y.ndim == 1 else r.shape[-1:]
        r = reshape(r, shape)
    return r


def dot(a: Any, b: Any, out: Any = None) -> TracedArray:
    """np.dot for operands of up to 2 dims (N-d dot: use matmul or einsum)."""
    t = tracer_of(a, b)
    x, y = as_traced(a, t), as_traced(b, t)
    if out is not None:
        raise UnsupportedError(at_user("np.dot(out=...) is not supported"))
    if x.ndim == 0 or y.ndim == 0:
        return x * y
    if x.ndim > 2 or y.ndim > 2:
        raise UnsupportedError(
            at_user(
                f"np.dot of {x.ndim}-d and {y.ndim}-d arrays is not "
                "supported; use np.matmul or np.einsum"
            )
        )
    return matmul(x, y)


def inner(a: Any, b: Any) -> TracedArray:
    """np.inner: contraction over the last axis of both."""
    t = tracer_of(a, b)
    x, y = as_traced(a, t), as_traced(b, t)
    if x.ndim == 0 or y.ndim == 0:
        return x * y
    lx = _letters(x.ndim - 1, "z")
    ly = _letters(y.ndim - 1, "z" + lx)
    return einsum(f"{lx}z,{ly}z->{lx}{ly}", x, y)


def outer(a: Any, b: Any, out: Any = None) -> TracedArray:
    """np.outer of the flattened operands."""
    t = tracer_of(a, b)
    x, y = as_traced(a, t), as_traced(b, t)
    return reshape(x, (x.size, 1)) * reshape(y, (1, y.size))


def tensordot(a: Any, b: Any, axes: Any = 2) -> TracedArray:
    """np.tensordot, as an einsum."""
    t = tracer_of(a, b)
    x, y = as_traced(a, t), as_traced(b, t)
    if isinstance(axes, int | np.integer):
        ax, bx = list(range(x.ndim - axes, x.ndim)), list(range(int(axes)))
    else:
        ax, bx = ([v] if isinstance(v, int) else list(v) for v in axes)
    ax = [i % x.ndim for i in ax]
    bx = [i % y.ndim for i in bx]
    la = list(_letters(x.ndim, ""))
    lb = list(_letters(y.ndim, "".join(la)))
    for i, j in zip(ax, bx, strict=True):
        lb[j] = la[i]
    out = [c for i, c in enumerate(la) if i not in ax] + [
        c for j, c in enumerate(lb) if j not in bx
    ]
    return einsum(f"{''.join(la)},{''.join(lb)}->{''.join(out)}", x, y)


def _letters(n: int, used: str) -> str:
    pool = [c for c in string.ascii_letters if c not in used]
    return "".join(pool[:n])


def _parse(subscripts: str, ops: Sequence[TracedArray]) -> tuple[list[str], str]:
    """Terms (one label per axis, ellipses expanded) and the output labels of an einsum."""
    s = subscripts.replace(" ", "")
    lhs, arrow, rhs = s.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ops):
        raise ArgumentError(
            at_user(f"einsum {subscripts!r} names {len(terms)} operands, got {len(ops)}")
        )
    for ch in s.replace("...", "").replace(",", "").replace("->", ""):
        if ch not in string.ascii_letters:
            raise ArgumentError(at_user(f"einsum {subscripts!r}: bad character {ch!r}"))
    n_ell = max(
        (
            op.ndim - len(term.replace("...", ""))
            for term, op in zip(terms, ops, strict=True)
            if "..." in term
        ),
        default=0,
    )
    ell = _letters(n_ell, s)
    out_terms = []
    for term, op in zip(terms, ops, strict=True):
        if "..." in term:
            k = op.ndim - len(term.replace("...", ""))
            if k < 0:
                raise ShapeError(
                    at_user(f"einsum term {term!r} has more labels than operand dims {op.shape}")
                )
            term = term.replace("...", ell[n_ell - k :])
        if len(term) != op.ndim:
            raise ShapeError(
                at_user(f"einsum term {term!r} does not match an operand of shape {op.shape}")
            )
        if len(set(term)) != len(term):
            raise UnsupportedError(
                at_user(
                    f"einsum term {term!r} repeats a label (diagonals and traces are not supported)"
                )
            )
        out_terms.append(term)
    if arrow:
        out = rhs.replace("...", ell)
    else:
        counts: dict[str, int] = {}
        for term in out_terms:
            for c in term:
                counts[c] = counts.get(c, 0) + 1
        out = ell + "".join(sorted(c for c, k in counts.items() if k == 1 and c not in ell))
    if len(set(out)) != len(out) or any(c not in "".join(out_terms) for c in out):
        raise ArgumentError(at_user(f"einsum {subscripts!r}: bad output labels {out!r}"))
    return out_terms, out


def _sum_out(x: TracedArray, term: str, keep: set[str]) -> tuple[TracedArray, str]:
    """Sum over the labels of ``term`` not in ``keep``."""
    axes = tuple(i for i, c in enumerate(term) if c not in keep)
    return reduce("sum", x, axes, False), "".join(c for c in term if c in keep)


def _permute(x: TracedArray, term: str, order: str) -> TracedArray:
    return transpose(x, [term.index(c) for c in order])


def _pair(
    a: TracedArray, ta: str, b: TracedArray, tb: str, keep: set[str], size: dict[str, int]
) -> tuple[TracedArray, str]:
    """Contract ``a`` (labels ``ta``) with ``b`` (labels ``tb``), keeping labels in ``keep``."""
    a, ta = _sum_out(a, ta, keep | set(tb))
    b, tb = _sum_out(b, tb, keep | set(ta))
    batch = [c for c in ta if c in tb and c in keep]
    contract = [c for c in ta if c in tb and c not in keep]
    afree = [c for c in ta if c not in tb]
    bfree = [c for c in tb if c not in ta]
    if not contract:  # an outer/elementwise product: broadcast multiply
        out = "".join(batch + afree + bfree)
        xa = reshape(
            _permute(a, ta, "".join(c for c in out if c in ta)),
            tuple(a.shape[ta.index(c)] if c in ta else 1 for c in out),
        )
        xb = reshape(
            _permute(b, tb, "".join(c for c in out if c in tb)),
            tuple(b.shape[tb.index(c)] if c in tb else 1 for c in out),
        )
        return xa * xb, out
    # a contracted label of size 1 on one side broadcasts against the other side
    for c in contract:
        if a.shape[ta.index(c)] != size[c]:
            a = broadcast_to(
                a, tuple(size[c] if l == c else n for l, n in zip(ta, a.shape, strict=True))
            )
        if b.shape[tb.index(c)] != size[c]:
            b = broadcast_to(
                b, tuple(size[c] if l == c else n for l, n in zip(tb, b.shape, strict=True))
            )
    k = math.prod(size[c] for c in contract)
    a_b = tuple(a.shape[ta.index(c)] for c in batch)
    b_b = tuple(b.shape[tb.index(c)] for c in batch)
    a_f = tuple(a.shape[ta.index(c)] for c in afree)
    b_f = tuple(b.shape[tb.index(c)] for c in bfree)
    xa = reshape(_permute(a, ta, "".join(batch + afree + contract)), a_b + (math.prod(a_f), k))
    xb = reshape(_permute(b, tb, "".join(batch + contract + bfree)), b_b + (k, math.prod(b_f)))
    r = xa.tracer.emit("matmul", [xa, xb])
    r = reshape(r, r.shape[:-2] + a_f + b_f)
    return r, "".join(batch + afree + bfree)


def einsum(
    subscripts: Any, *operands: Any, out: Any = None, optimize: Any = False, **kwargs: Any
) -> TracedArray:
    """np.einsum for contractions (no repeated labels within one operand)."""
    if not isinstance(subscripts, str):
        raise UnsupportedError(
            at_user(
                "np.einsum's interleaved (operand, axes) form is not "
                "supported; pass a subscripts string"
            )
        )
    if out is not None or kwargs:
        raise UnsupportedError(at_user(f"np.einsum: out=/{sorted(kwargs)} are not supported"))
    t = tracer_of(*operands)
    ops = [as_traced(o, t) for o in operands]
    if not ops:
        raise ArgumentError(at_user("np.einsum needs at least one operand"))
    terms, out_labels = _parse(subscripts, ops)
    dt = dtypes.result_type(*(o.ir_dtype for o in ops))
    ops = [cast(o, dt) for o in ops]
    size: dict[str, int] = {}
    for term, op in zip(terms, ops, strict=True):
        for c, n in zip(term, op.shape, strict=True):
            if size.get(c, 1) != 1 and n not in (1, size[c]):
                raise ShapeError(at_user(f"einsum: label {c!r} has sizes {size[c]} and {n}"))
            size[c] = max(size.get(c, 1), n)
    cur, cur_t = ops[0], terms[0]
    for i in range(1, len(ops)):
        keep = set(out_labels).union(*terms[i + 1 :])
        cur, cur_t = _pair(cur, cur_t, ops[i], terms[i], keep, size)
    cur, cur_t = _sum_out(cur, cur_t, set(out_labels))
    cur = _permute(cur, cur_t, out_labels)
    want = tuple(size[c] for c in out_labels)
    return broadcast_to(cur, want) if cur.shape != want else cur
