"""Index arithmetic for generated kernels: affine index expressions over named loop symbols,
and how a kernel's symbols turn into Triton expressions.

A value is evaluated "at an index map": one :class:`Affine` per dimension of its shape, in
terms of the kernel's symbols. View ops compose maps (transpose permutes, slice scales and
shifts, broadcast drops), so they cost no memory traffic. A load's offset is the map dotted
with the buffer's strides; :meth:`Symbols.offset` writes it with as few divisions as it can
(contiguous runs of dimensions collapse into the flat index they came from).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Affine:
    """``const + sum(coeff * symbol)``; symbols are names of kernel symbols or of emitted
    integer expressions (opaque)."""

    terms: tuple[tuple[str, int], ...] = ()
    const: int = 0

    @staticmethod
    def of(sym: str, coeff: int = 1) -> Affine:
        return Affine(((sym, coeff),)) if coeff else Affine()

    def __add__(self, other: Affine | int) -> Affine:
        if isinstance(other, int):
            return Affine(self.terms, self.const + other)
        acc = dict(self.terms)
        for s, c in other.terms:
            acc[s] = acc.get(s, 0) + c
        return Affine(tuple(sorted((s, c) for s, c in acc.items() if c)), self.const + other.const)

    def scale(self, k: int) -> Affine:
        if k == 0:
            return Affine()
        return Affine(tuple((s, c * k) for s, c in self.terms), self.const * k)

    @property
    def symbols(self) -> set[str]:
        return {s for s, _ in self.terms}


ZERO = Affine()


@dataclass
class Group:
    """Symbols that unravel one flat index ``flat`` (row-major over ``extents``)."""

    name: str  # e.g. "p", "r", "c": also the name of its mask, f"{name}mask"
    flat: str  # the Triton variable holding the flat index
    syms: list[str]
    extents: list[int]
    masked: bool = True


@dataclass
class Symbols:
    """The symbols of one kernel, grouped by the flat index they come from."""

    groups: dict[str, Group] = field(default_factory=dict)
    sym_group: dict[str, str] = field(default_factory=dict)
    #: opaque symbol -> the groups its expression depends on
    opaque: dict[str, frozenset[str]] = field(default_factory=dict)

    def add_group(self, g: Group) -> list[Affine]:
        self.groups[g.name] = g
        for s in g.syms:
            self.sym_group[s] = g.name
        return [Affine.of(s) for s in g.syms]

    def deps(self, a: Affine) -> frozenset[str]:
        out: set[str] = set()
        for s in a.symbols:
            out |= self.opaque.get(s, frozenset({self.sym_group.get(s, s)}))
        return frozenset(out)

    def dim(self, sym: str) -> str:
        """A Triton expression for one symbol's own index."""
        gname = self.sym_group.get(sym)
        if gname is None:
            return sym  # opaque: already a variable
        g = self.groups[gname]
        i = g.syms.index(sym)
        inner = math.prod(g.extents[i + 1 :])
        expr = g.flat if inner == 1 else f"({g.flat} // {inner})"
        return expr if i == 0 else f"({expr} % {g.extents[i]})"

    def emit(self, a: Affine) -> str:
        """A Triton expression for ``a``, with contiguous runs of a group's symbols collapsed
        into its flat index."""
        coeff = dict(a.terms)
        parts: list[str] = []
        done: set[str] = set()
        for g in self.groups.values():
            cs = [coeff.get(s, 0) for s in g.syms]
            if not any(cs):
                continue
            n = len(cs)
            s = cs[-1]
            j = n  # smallest j with dims j.. contiguous (size-1 dims never matter)
            for i in range(n - 1, -1, -1):
                if g.extents[i] == 1 or cs[i] == s * math.prod(g.extents[i + 1 :]):
                    j = i
                else:
                    break
            if s and j < n:
                span = math.prod(g.extents[j:])
                flat = g.flat if j == 0 else f"({g.flat} % {span})"
                parts.append(_times(flat, s))
            for i in range(min(j, n)):
                if cs[i] and g.extents[i] != 1:
                    parts.append(_times(self.dim(g.syms[i]), cs[i]))
            done.update(g.syms)
        for sym, c in a.terms:
            if sym not in done:
                parts.append(_times(self.dim(sym), c))
        if a.const or not parts:
            parts.append(str(a.const))
        return " + ".join(parts)


def _times(expr: str, k: int) -> str:
    return expr if k == 1 else f"{expr} * {k}"
