"""How a kernel walks its operands: broadcasting, dimension coalescing and strides.

Kernels see the output as [rows, cols]: ``cols`` is the innermost dimension, and a row index
splits into up to :data:`MAX_OUTER` outer dimensions. Each operand is read through its own
strides, so broadcast (stride 0), padded, transposed and sliced inputs are read in place.
Adjacent dimensions that every operand walks as one (stride[i] == stride[i+1] * size[i+1])
merge first, so a contiguous tensor of any rank is one long row. Outputs are contiguous.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: Outer dimensions a generated kernel decomposes a row index into (more: operands are copied).
MAX_OUTER = 3


@dataclass(frozen=True)
class Layout:
    """The [rows, cols] walk of one kernel launch."""

    shape: tuple[int, ...]  # the broadcast output shape
    rows: int
    cols: int
    outer: tuple[int, ...]  # outer dimension sizes, outermost first (product: rows)
    strides: tuple[tuple[int, ...], ...]  # per operand: one stride per outer dim, then cols'

    @property
    def rank(self) -> int:
        """Outer dimensions (0: a single row)."""
        return len(self.outer)


def _coalesce(sizes: list[int], strides: list[list[int]]) -> tuple[list[int], list[list[int]]]:
    keep = [i for i, s in enumerate(sizes) if s != 1]
    sizes = [sizes[i] for i in keep]
    strides = [[st[i] for i in keep] for st in strides]
    out_sizes: list[int] = []
    out_strides: list[list[int]] = [[] for _ in strides]
    for i, size in enumerate(sizes):
        if out_sizes and all(
            out_st[-1] == st[i] * size for out_st, st in zip(out_strides, strides, strict=True)
        ):
            out_sizes[-1] *= size
            for out_st, st in zip(out_strides, strides, strict=True):
                out_st[-1] = st[i]
        else:
            out_sizes.append(size)
            for out_st, st in zip(out_strides, strides, strict=True):
                out_st.append(st[i])
    return out_sizes, out_strides


def plan(
    tensors: list[torch.Tensor], shape: tuple[int, ...], keep_last: bool
) -> tuple[Layout, list[torch.Tensor]]:
    """The layout for reading ``tensors`` broadcast to ``shape`` (and the tensors to pass,
    copied only when they need more than :data:`MAX_OUTER` outer dimensions). With
    ``keep_last``, the last dimension stays the row (rowwise kernels reduce along it)."""
    shape = tuple(shape) or (1,)
    views = [t.expand(shape) if tuple(t.shape) != shape else t for t in tensors]
    all_strides = [list(v.stride()) for v in views]
    if keep_last:
        outer, outer_st = _coalesce(list(shape[:-1]), [st[:-1] for st in all_strides])
        cols, col_st = shape[-1], [st[-1] for st in all_strides]
    else:
        sizes, sts = _coalesce(list(shape), all_strides)
        if not sizes:  # every dimension has size 1
            sizes, sts = [1], [[0] for _ in all_strides]
        outer, outer_st = sizes[:-1], [st[:-1] for st in sts]
        cols, col_st = sizes[-1], [st[-1] for st in sts]
    if len(outer) > MAX_OUTER:
        dense = [v.contiguous() for v in views]
        return plan(dense, shape, keep_last)
    rows = math.prod(outer)
    strides = tuple((*o, c) for o, c in zip(outer_st, col_st, strict=True))
    return Layout(shape, rows, cols, tuple(outer), strides), views
