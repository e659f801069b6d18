"""Typed dimensions from Python: a spec of dimensions, tensors and tiles that generates the C++
types of ``<kernforge/dims.cuh>``, and the ``/*@kf ... @kf*/`` blocks that carry such a spec
inside a CUDA source.

```python
from kernforge.cuda.dims import Dim, Tensor, header

I, K = Dim("I"), Dim("K")
A = Tensor((I(16), K(32)), "float32", name="A")     # row-major, static extents
S = Tensor((K(32), I(32)), "float32", strides=(33, 1), name="S")   # padded: a Buffer type
X = Tensor((I, K), "bfloat16", name="X")            # run-time extents
T = A.tile(I(4), K(8))                              # a 4 x 8 tile type: A_tile_t
print(header(A, S, X, T))
```

The header declares ``KF_DIM(I)`` for each dimension and, per tensor ``NAME``, ``NAME_t`` (a
``kf::View``), plus ``NAME_buf`` (a ``kf::Buffer``, e.g. for ``__shared__``) and
``NAME_size`` when every extent and stride is static; per tile ``NAME_t``.

Block syntax (one statement per line; ``#`` or ``//`` starts a comment)::

    /*@kf
    dim I = 16, K = 32, J          # dimensions; "= N" gives the default static extent
    tensor A[I, K] float32         # axes in order; extents from the dims (J: run time)
    tensor S[K:32, I:32] float32 strides(33, 1)   # explicit extents and strides; ? = run time
    tensor X[I:?, J] bf16          # I forced to a run-time extent
    tile At = A[I:4, K:8]          # a tile type: At_t
    @kf*/

:func:`kernforge.cuda.compile` expands such blocks itself (line numbers after a block stay
those of the original file); :func:`expand` does it by hand.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import ArgumentError, CompileError, DTypeError, ShapeError

_CPP_KEYWORDS = {
    "auto", "bool", "break", "case", "char", "class", "const", "continue", "default", "do",
    "double", "else", "enum", "extern", "float", "for", "if", "int", "long", "namespace", "new",
    "return", "short", "signed", "sizeof", "static", "struct", "switch", "template", "this",
    "typedef", "union", "unsigned", "using", "void", "volatile", "while", "kf",
}  # fmt: skip
_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "f32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16, "f16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64,
    "double": torch.float64, "fp64": torch.float64, "int32": torch.int32, "int": torch.int32,
    "int64": torch.int64, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool,
}  # fmt: skip
C_TYPES: dict[torch.dtype, str] = {
    torch.float32: "float", torch.float16: "__half", torch.bfloat16: "__nv_bfloat16",
    torch.float64: "double", torch.int32: "int", torch.int64: "long long", torch.int16: "short",
    torch.int8: "signed char", torch.uint8: "unsigned char", torch.bool: "bool",
}  # fmt: skip
_INCLUDES = {torch.float16: "cuda_fp16.h", torch.bfloat16: "cuda_bf16.h"}


def _ident(name: str, what: str) -> str:
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_]\w*", name):
        raise ArgumentError(f"{what} name {name!r} is not a C++ identifier")
    if name in _CPP_KEYWORDS or name.startswith("__"):
        raise ArgumentError(f"{what} name {name!r} is reserved in C++; pick another")
    return name


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in C_TYPES:
            raise DTypeError(f"dtype {dtype} has no CUDA C type here; use one of {list(C_TYPES)}")
        return dtype
    d = _DTYPES.get(str(dtype).lower())
    if d is None:
        raise DTypeError(f"unknown dtype {dtype!r}; expected one of {', '.join(_DTYPES)}")
    return d


@dataclass(frozen=True)
class Dim:
    """A named dimension. ``Dim("I", 16)`` has a default static extent; ``I(16)`` gives an
    axis with extent 16; ``I`` alone (in a tensor) takes the default (None: run time)."""

    name: str
    size: int | None = None

    def __post_init__(self):
        _ident(self.name, "dimension")
        if self.size is not None and (not isinstance(self.size, int) or self.size < 1):
            raise ArgumentError(f"dimension {self.name}: size={self.size!r}; expected an int >= 1")

    def __call__(self, size: int | None) -> Extent:
        """This dimension with extent ``size`` (None: known at run time)."""
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
            raise ArgumentError(f"{self.name}({size!r}): an extent must be an int >= 1 or None")
        return Extent(self, size)


@dataclass(frozen=True)
class Extent:
    """A dimension with an extent (None: run time): an axis of a :class:`Tensor`."""

    dim: Dim
    size: int | None


def _axis(a: Dim | Extent) -> Extent:
    if isinstance(a, Extent):
        return a
    if isinstance(a, Dim):
        return Extent(a, a.size)
    raise ArgumentError(f"tensor axis {a!r}: expected a Dim (I) or a Dim with extent (I(16))")


def _cexpr(v: int | None) -> str:
    return "kf::dyn" if v is None else str(v)


@dataclass(frozen=True)
class Tensor:
    """A tensor type over named dimensions: ``Tensor((I(16), K(32)), "float32", name="A")``.

    ``strides``: element strides per axis (None entries: run time); default row-major packed.
    """

    axes: tuple[Extent, ...]
    dtype: torch.dtype
    strides: tuple[int | None, ...] | None = None
    name: str = "T"

    def __init__(self, axes: Sequence[Dim | Extent], dtype: torch.dtype | str = torch.float32,
                 strides: Sequence[int | None] | None = None, name: str = "T"):  # fmt: skip
        axes = tuple(_axis(a) for a in axes)
        if not axes:
            raise ShapeError(f"tensor {name}: needs at least one axis")
        names = [a.dim.name for a in axes]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ShapeError(
                f"tensor {name}: dimension {sorted(dup)} appears twice in {names}; typed indexing "
                "needs one dimension per axis (declare a second Dim, e.g. I and J)"
            )
        if strides is not None:
            strides = tuple(strides)
            if len(strides) != len(axes):
                raise ShapeError(
                    f"tensor {name}: {len(strides)} strides for {len(axes)} axes {names}"
                )
            for s in strides:
                if s is not None and (not isinstance(s, int) or s < 0):
                    raise ShapeError(f"tensor {name}: stride {s!r} must be an int >= 0 or None")
        object.__setattr__(self, "axes", axes)
        object.__setattr__(self, "dtype", _dtype(dtype))
        object.__setattr__(self, "strides", strides)
        object.__setattr__(self, "name", _ident(name, "tensor"))

    @property
    def dims(self) -> tuple[Dim, ...]:
        """The dimensions, in axis order."""
        return tuple(a.dim for a in self.axes)

    @property
    def shape(self) -> tuple[int | None, ...]:
        """Static extents (None where run time)."""
        return tuple(a.size for a in self.axes)

    def static_strides(self) -> tuple[int | None, ...]:
        """Element strides where known statically (packed strides from static extents)."""
        if self.strides is not None:
            return self.strides
        out: list[int | None] = []
        acc: int | None = 1
        for a in reversed(self.axes):
            out.append(acc)
            acc = None if acc is None or a.size is None else acc * a.size
        return tuple(reversed(out))

    @property
    def is_static(self) -> bool:
        """True when every extent and stride is a compile-time constant."""
        return None not in self.shape and None not in self.static_strides()

    def size(self) -> int:
        """Elements spanned by a static layout: ``1 + sum((extent - 1) * stride)``."""
        if not self.is_static:
            raise ShapeError(f"tensor {self.name} has run-time extents or strides; no static size")
        st = self.static_strides()
        return 1 + sum((e - 1) * s for e, s in zip(self.shape, st, strict=True))  # type: ignore[operator]

    def tile(self, *sizes: Extent, name: str | None = None) -> Tile:
        """A tile type of this tensor: ``A.tile(I(4), K(8))`` (any order; every axis once)."""
        return Tile(self, sizes, name=name or f"{self.name}_tile")

    def cpp(self) -> str:
        """The ``kf::View`` type of this tensor."""
        strides = self.strides
        axes = []
        for i, a in enumerate(self.axes):
            if strides is None:
                axes.append(f"kf::Axis<{a.dim.name}, {_cexpr(a.size)}>")
            else:
                axes.append(f"kf::Axis<{a.dim.name}, {_cexpr(a.size)}, {_cexpr(strides[i])}>")
        return f"kf::View<{C_TYPES[self.dtype]}, {', '.join(axes)}>"

    def check(self, t: torch.Tensor) -> None:
        """Raise ``ShapeError``/``DTypeError`` unless ``t`` fits this spec (dtype, static extents
        and strides), e.g. before passing ``t.data_ptr()`` to a kernel that assumes it."""
        if t.dtype != self.dtype:
            raise DTypeError(f"tensor {self.name}: got {t.dtype}, the spec says {self.dtype}")
        if t.dim() != len(self.axes):
            raise ShapeError(
                f"tensor {self.name}: got shape {tuple(t.shape)}, the spec has axes "
                f"{[a.dim.name for a in self.axes]}"
            )
        for a, n in zip(self.axes, t.shape, strict=True):
            if a.size is not None and a.size != n:
                raise ShapeError(
                    f"tensor {self.name}: axis {a.dim.name} is {n}, the spec fixes it at {a.size}"
                )
        if self.strides is not None:
            want = self.strides
        else:  # packed from the actual extents
            want, acc = [], 1
            for n in reversed(t.shape):
                want.append(acc)
                acc *= n
            want = tuple(reversed(want))
        for a, w, s in zip(self.axes, want, t.stride(), strict=True):
            if w is not None and w != s and t.shape[self.axes.index(a)] > 1:
                raise ShapeError(
                    f"tensor {self.name}: axis {a.dim.name} has stride {s}, the spec says {w} "
                    "(pass a .contiguous() tensor or declare the strides)"
                )


@dataclass(frozen=True)
class Tile:
    """A tile type of a tensor: static extents per dimension, the tensor's strides."""

    tensor: Tensor
    sizes: tuple[int, ...]
    name: str

    def __init__(self, tensor: Tensor, sizes: Sequence[Extent], name: str):
        by_dim: dict[str, int] = {}
        for s in sizes:
            if not isinstance(s, Extent) or s.size is None:
                raise ArgumentError(f"tile {name}: {s!r}; give each size as Dim(extent), e.g. I(4)")
            if s.dim.name in by_dim:
                raise ArgumentError(f"tile {name}: dimension {s.dim.name} given twice")
            by_dim[s.dim.name] = s.size
        names = [a.dim.name for a in tensor.axes]
        if set(by_dim) != set(names):
            raise ArgumentError(
                f"tile {name}: sizes for {sorted(by_dim)}, but tensor {tensor.name} has "
                f"dimensions {names}; give one size per dimension"
            )
        object.__setattr__(self, "tensor", tensor)
        object.__setattr__(self, "sizes", tuple(by_dim[n] for n in names))
        object.__setattr__(self, "name", _ident(name, "tile"))

    def cpp(self) -> str:
        """The tile's ``kf::View`` type."""
        return f"{self.tensor.name}_t::tiled<{', '.join(str(s) for s in self.sizes)}>"


Decl = Tensor | Tile | Dim


def _collect(decls: Sequence[Decl]) -> tuple[list[Dim], list[Tensor | Tile]]:
    dims: dict[str, Dim] = {}
    items: list[Tensor | Tile] = []
    for d in decls:
        if isinstance(d, Dim):
            dims.setdefault(d.name, d)
            continue
        if isinstance(d, Tile):
            if d.tensor not in items:
                items.append(d.tensor)
            tensor = d.tensor
        elif isinstance(d, Tensor):
            tensor = d
        else:
            raise ArgumentError(f"{d!r} is not a Dim, Tensor or Tile")
        for dim in tensor.dims:
            dims.setdefault(dim.name, dim)
        if d not in items:
            items.append(d)
    names = [i.name for i in items] + list(dims)
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ArgumentError(f"names declared twice: {sorted(dup)}")
    return list(dims.values()), items


def generate(*decls: Decl, pragma_once: bool = False) -> str:
    """C++ declarations for ``decls`` (dimensions of tensors are declared automatically)."""
    dims, items = _collect(decls)
    lines = ["// generated by kernforge.cuda.dims: do not edit"]
    if pragma_once:
        lines.append("#pragma once")
    lines.append("#include <kernforge/dims.cuh>")
    includes = sorted(
        {_INCLUDES[t.dtype] for t in items if isinstance(t, Tensor) and t.dtype in _INCLUDES}
    )
    lines += [f"#include <{h}>" for h in includes]
    for d in dims:
        # Guarded: several generated headers may declare the same dimension.
        lines += [f"#ifndef KF_DIM_{d.name}", f"#define KF_DIM_{d.name}", f"KF_DIM({d.name});",
                  "#endif"]  # fmt: skip
    for it in items:
        if isinstance(it, Tile):
            lines.append(f"using {it.name}_t = {it.cpp()};")
            continue
        lines.append(f"using {it.name}_t = {it.cpp()};")
        if isinstance(it, Tensor) and it.is_static:
            args = it.cpp().removeprefix("kf::View<")
            lines.append(f"using {it.name}_buf = kf::Buffer<{args};")
            lines.append(f"constexpr kf::offset_t {it.name}_size = {it.size()};")
    return "\n".join(lines) + "\n"


def header(*decls: Decl) -> str:
    """A header (with ``#pragma once``) declaring ``decls``; pass it to
    ``kcuda.compile(..., headers={"name.cuh": text})`` or write it to a file."""
    return generate(*decls, pragma_once=True)


# ---------------------------------------------------------------------------------------------
# The /*@kf ... @kf*/ block language.

_BLOCK = re.compile(r"/\*@kf(.*?)@kf\*/", re.S)


def parse(text: str, *, filename: str = "<kf>", first_line: int = 1) -> list[Decl]:
    """Parse the statements of a ``/*@kf`` block into declarations (see the module docstring).

    Errors raise ``CompileError`` naming ``filename`` and the line.
    """
    dims: dict[str, Dim] = {}
    tensors: dict[str, Tensor] = {}
    out: list[Decl] = []

    def fail(n: int, line: str, why: str):
        raise CompileError(
            f"{filename}({first_line + n}): error in @kf block: {why}\n  > {line.strip()}\n"
            "Statements: 'dim I = 16, K', 'tensor A[I, K:32] float32 strides(32, 1)', "
            "'tile At = A[I:4, K:8]'"
        )

    def axis_of(n: int, line: str, spec: str) -> Extent:
        name, _, size = (p.strip() for p in spec.partition(":"))
        if name not in dims:
            fail(n, line, f"dimension {name!r} is not declared (add 'dim {name}')")
        if not size:
            return dims[name](dims[name].size)
        if size == "?":
            return dims[name](None)
        if not size.isdigit() or int(size) < 1:
            fail(n, line, f"extent {size!r} of {name} must be a positive integer or ?")
        return dims[name](int(size))

    for n, raw in enumerate(text.split("\n")):
        line = re.sub(r"(#|//).*", "", raw).strip()
        if not line:
            continue
        try:
            if m := re.fullmatch(r"dim\s+(.+)", line):
                for part in m.group(1).split(","):
                    name, eq, size = (p.strip() for p in part.partition("="))
                    if eq and not size.isdigit():
                        fail(n, raw, f"extent {size!r} of dim {name} must be a positive integer")
                    d = Dim(name, int(size) if eq else None)
                    if name in dims:
                        fail(n, raw, f"dim {name} declared twice")
                    dims[name] = d
                    out.append(d)
            elif m := re.fullmatch(
                r"tensor\s+(\w+)\s*\[([^\]]*)\]\s*(\w+)(?:\s+strides\s*\(([^)]*)\))?", line
            ):
                name, axes_s, dt, strides_s = m.groups()
                axes = [axis_of(n, raw, a) for a in axes_s.split(",") if a.strip()]
                strides = None
                if strides_s is not None:
                    strides = []
                    for s in strides_s.split(","):
                        s = s.strip()
                        if s == "?":
                            strides.append(None)
                        elif s.isdigit():
                            strides.append(int(s))
                        else:
                            fail(n, raw, f"stride {s!r} must be a non-negative integer or ?")
                if name in tensors:
                    fail(n, raw, f"tensor {name} declared twice")
                t = Tensor(axes, dt, strides=strides, name=name)
                tensors[name] = t
                out.append(t)
            elif m := re.fullmatch(r"tile\s+(\w+)\s*=\s*(\w+)\s*\[([^\]]*)\]", line):
                name, src, sizes_s = m.groups()
                if src not in tensors:
                    fail(n, raw, f"tile of undeclared tensor {src!r}")
                sizes = []
                for a in sizes_s.split(","):
                    ext = axis_of(n, raw, a)
                    if ext.size is None:
                        fail(n, raw, f"tile size of {ext.dim.name} must be a number (I:4)")
                    sizes.append(ext)
                out.append(Tile(tensors[src], sizes, name=name))
            else:
                fail(n, raw, "not a dim, tensor or tile statement")
        except (ArgumentError, ShapeError, DTypeError) as exc:
            fail(n, raw, str(exc))
    return out


def expand(source: str, *, filename: str = "kernel.cu") -> tuple[str, dict[str, str]]:
    """Replace every ``/*@kf ... @kf*/`` block of ``source`` with its generated C++.

    Returns ``(text, generated)``: ``#line`` directives keep the original file's line numbers
    after each block and name the generated code ``FILENAME@kfN`` (``generated`` maps those
    names to their text, for error messages).
    """
    generated: dict[str, str] = {}
    pieces: list[str] = []
    pos = 0
    for i, m in enumerate(_BLOCK.finditer(source)):
        start_line = source.count("\n", 0, m.start()) + 1
        end_line = source.count("\n", 0, m.end()) + 1
        decls = parse(m.group(1), filename=filename, first_line=start_line)
        code = generate(*decls)  # KF_DIM guards let a later block name a dimension again
        vname = f"{filename}@kf{i}"
        generated[vname] = code
        pieces.append(source[pos : m.start()])
        pieces.append(f'\n#line 1 "{vname}"\n{code}#line {end_line} "{filename}"\n')
        pos = m.end()
    pieces.append(source[pos:])
    return "".join(pieces), generated


def write_header(path: str, *decls: Decl) -> str:
    """Write :func:`header` of ``decls`` to ``path``; returns the text."""
    text = header(*decls)
    with open(path, "w") as f:
        f.write(text)
    return text
