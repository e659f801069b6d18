"""Triton source for one fused kernel (a :class:`~kernforge.passes.fuse.KernelGroup`).

The writer evaluates each root's expression at the kernel's index map, emitting one Triton
statement per (value, index map) and reusing it where it recurs. Every shape is static, so
sizes are literals in the source: the source text is the cache key of the compiled kernel.

Low-precision floats (fp16, bf16) are loaded, computed in fp32 and rounded once, on store;
``cast`` to them rounds where the program asks for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..ir import Node, Value, dtypes
from ..passes.fuse import KernelGroup, Materialize
from .index import ZERO, Affine, Group, Symbols

TL = {
    "bool": "tl.int1", "int8": "tl.int8", "int16": "tl.int16", "int32": "tl.int32",
    "int64": "tl.int64", "uint8": "tl.uint8", "uint16": "tl.uint16", "uint32": "tl.uint32",
    "uint64": "tl.uint64", "float16": "tl.float16", "bfloat16": "tl.bfloat16",
    "float32": "tl.float32", "float64": "tl.float64",
}  # fmt: skip
INT32_MAX = 2**31 - 1

#: Helpers a kernel may call; only those used are written into its source. Written with
#: primitives the interpreter runs too (it has no libdevice).
HELPERS = {
    "_kf_expm1": """
def _kf_expm1(x):
    u = tl.exp(x)
    um1 = u - 1.0
    return tl.where(u == 1.0, x, tl.where(um1 == -1.0, -1.0, um1 * x / tl.log(u)))
""",
    "_kf_log1p": """
def _kf_log1p(x):
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * x / (u - 1.0))
""",
    "_kf_tanh": """
def _kf_tanh(x):
    # |x| >= 0.3: 1 - 2 / (exp(2|x|) + 1), no cancellation to speak of there; below, the
    # odd Taylor series to x**11 (error < 1e-8 relative): one exp and one division in all.
    a = tl.abs(x)
    big = 1.0 - 2.0 / (tl.exp(2.0 * a) + 1.0)
    z = a * a
    p = a * (1.0 + z * (-1.0 / 3 + z * (2.0 / 15 + z * (-17.0 / 315 + z * (62.0 / 2835
        + z * (-1382.0 / 155925))))))
    t = tl.where(a < 0.3, p, big)
    return tl.where(x < 0, -t, t)
""",
    "_kf_pow": """
def _kf_pow(a, b):
    r = tl.exp2(b * tl.log2(tl.abs(a)))
    whole = tl.floor(b) == b
    odd = whole & (tl.floor(b * 0.5) * 2.0 != b)
    r = tl.where(a < 0, tl.where(whole, tl.where(odd, -r, r), float("nan")), r)
    return tl.where(b == 0, 1.0, r)
""",
    "_kf_mul": """
def _kf_mul(a, b):
    return a * b
""",
}
HELPER_NEEDS: dict[str, tuple[str, ...]] = {}
#: On the GPU the same helpers call CUDA's libdevice (accurate to an ulp or two, and cheaper
#: than the portable forms above, which the interpreter runs instead).
GPU_HELPERS = {
    "_kf_expm1": "def _kf_expm1(x):\n    return libdevice.expm1(x)\n",
    "_kf_log1p": "def _kf_log1p(x):\n    return libdevice.log1p(x)\n",
    "_kf_tanh": "def _kf_tanh(x):\n    return libdevice.tanh(x)\n",
    "_kf_pow": "def _kf_pow(a, b):\n    return libdevice.pow(a, b)\n",
}


def compute_dtype(dt: str) -> str:
    """The dtype a kernel holds a value of IR dtype ``dt`` in."""
    return "float32" if dtypes.is_low_precision(dt) else dt


@dataclass
class Expr:
    name: str
    deps: frozenset[str]  # symbol groups it varies over


@dataclass
class Scope:
    lines: list[str]
    indent: str
    cache: dict = field(default_factory=dict)
    parent: Scope | None = None

    def find(self, key):
        s = self
        while s is not None:
            if key in s.cache:
                return s.cache[key]
            s = s.parent
        return None


@dataclass
class Launch:
    """How to launch a generated kernel."""

    grid: tuple[int, ...]
    num_warps: int
    num_stages: int = 1


@dataclass
class KernelSource:
    """A generated kernel: its source, its entry point, the values it reads and writes (in
    argument order), and its launch."""

    name: str
    source: str
    args: list[Value]
    launch: Launch


def _literal(value, dt: str) -> str:
    if dt == "bool":
        return f"tl.full([], {int(bool(value))}, tl.int1)"
    if dtypes.is_int(dt):
        return f"tl.full([], {int(value)}, {TL[dt]})"
    v = float(value)
    text = repr(v) if math.isfinite(v) else f'float("{v}")'
    return f"tl.full([], {text}, {TL[compute_dtype(dt)]})"


class Writer:
    """Writes one kernel's source; see the module docs."""

    def __init__(
        self, group: KernelGroup, stop: set[int], layouts: dict[int, tuple[tuple, tuple]],
        interpret: bool, name: str,
    ) -> None:  # fmt: skip
        self.group = group
        self.stop = stop  # ids of values read from memory (not the group's own roots)
        self.layouts = layouts  # id(value) -> (shape, strides) of every buffer
        self.interpret = interpret
        self.name = name
        self.syms = Symbols()
        self.args: dict[int, Value] = {}
        self.helpers: set[str] = set()
        self.regs: dict[tuple, Expr] = {}  # (id(node), map) -> computed reduction / matmul
        self.counter = 0
        self.mask_extra: tuple[str, ...] = ()  # concat branches
        self.native_loads = False  # matmul operands keep fp16/bf16 for tl.dot
        self.big = False

    # -- names -----------------------------------------------------------------------------

    def fresh(self, prefix: str = "v") -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def arg(self, v: Value) -> str:
        self.args.setdefault(id(v), v)
        return f"b{v.id}"

    def assign(self, scope: Scope, expr: str, deps: frozenset[str], prefix: str = "v") -> Expr:
        name = self.fresh(prefix)
        scope.lines.append(f"{scope.indent}{name} = {expr}")
        return Expr(name, deps)

    def mask(self, deps: frozenset[str]) -> str | None:
        parts = [
            f"{g}mask" for g in sorted(deps) if g in self.syms.groups and self.syms.groups[g].masked
        ]
        parts += list(self.mask_extra)
        return " & ".join(parts) if parts else None

    # -- evaluation ------------------------------------------------------------------------

    def ev(self, v: Value, ix: tuple[Affine, ...], scope: Scope) -> Expr:
        """Emit (or reuse) ``v`` evaluated at index map ``ix``."""
        key = (id(v), ix, self.mask_extra, self.native_loads)
        hit = scope.find(key)
        if hit is not None:
            return hit
        out = self._ev(v, ix, scope)
        scope.cache[key] = out
        return out

    def load(self, v: Value, ix: tuple[Affine, ...], scope: Scope) -> Expr:
        strides = self.layouts[id(v)][1]
        off = ZERO
        for a, s, n in zip(ix, strides, v.shape, strict=True):
            if n != 1:
                off = off + a.scale(s)
        deps = self.syms.deps(off)
        ptr = self.arg(v)
        offset = self.syms.emit(off)
        # A constant offset is one in-bounds element for every lane: loaded unmasked (a block
        # mask, such as a concat branch's, cannot guard a scalar pointer).
        mask = self.mask(deps) if off.terms else None
        if mask is None:
            expr = f"tl.load({ptr} + {offset})"
        else:
            expr = f"tl.load({ptr} + {offset}, mask={mask}, other=0)"
        cdt = compute_dtype(v.dtype)
        if cdt != v.dtype and not self.native_loads:
            expr += f".to({TL[cdt]})"
        return self.assign(scope, expr, deps, "x")

    def _ev(self, v: Value, ix: tuple[Affine, ...], scope: Scope) -> Expr:
        if id(v) in self.stop:
            return self.load(v, ix, scope)
        node = v.node
        assert node is not None, "graph inputs are always read from memory"
        op = node.op
        kind = node.kind
        if op == "full":
            return Expr(_literal(node.attrs["value"], v.dtype), frozenset())
        if op == "iota":
            a = ix[node.attrs["axis"]]
            deps = self.syms.deps(a)
            base = self.syms.emit(a)
            if not deps:
                return Expr(_literal(a.const, v.dtype), frozenset())
            return self.assign(scope, f"({base}).to({TL[compute_dtype(v.dtype)]})", deps)
        if kind == "elementwise":
            return self.elementwise(node, ix, scope)
        if kind == "view":
            return self.ev(node.inputs[0], view_map(node, ix, self, scope), scope)
        if op == "concat":
            return self.concat(node, ix, scope)
        if op == "take":
            return self.take(node, ix, scope)
        if kind in ("reduce", "matmul"):
            hit = self.regs.get((id(node), ix))
            if hit is not None:
                return hit
            if kind == "reduce" and self.group.kind == "rows" and ix == self.canon_out(node):
                return self.reduce(node, scope)
            raise Materialize(v, f"{op} read at another index")
        raise Materialize(v, f"{op} is not generated inline")

    def broadcast_map(self, u: Value, out_shape, ix) -> tuple[Affine, ...]:
        lead = len(out_shape) - len(u.shape)
        return tuple(ZERO if n == 1 else ix[lead + i] for i, n in enumerate(u.shape))

    def elementwise(self, node: Node, ix, scope: Scope) -> Expr:
        out = node.output
        args = [self.ev(u, self.broadcast_map(u, out.shape, ix), scope) for u in node.inputs]
        deps = frozenset().union(*(a.deps for a in args))
        if node.op == "div" and dtypes.is_float(out.dtype) and args[1].deps < args[0].deps:
            # Dividing a tile by a per-row (or scalar) value: one reciprocal per row, then
            # multiplications (within an ulp of the division, and far cheaper).
            one = _literal(1, out.dtype)
            inv = self.assign(scope, f"{one} / {args[1].name}", args[1].deps)
            return self.assign(scope, f"({args[0].name} * {inv.name})", deps)
        expr = self.op_expr(node, [a.name for a in args])
        return self.assign(scope, expr, deps)

    def op_expr(self, node: Node, a: list[str]) -> str:
        op = node.op
        in_dt = node.inputs[0].dtype if node.inputs else node.output.dtype
        cdt = compute_dtype(in_dt)
        isfloat = dtypes.is_float(in_dt)
        simple = {
            "add": "({0} + {1})", "sub": "({0} - {1})", "mul": "({0} * {1})",
            "div": "({0} / {1})", "eq": "({0} == {1})", "ne": "({0} != {1})",
            "lt": "({0} < {1})", "le": "({0} <= {1})", "gt": "({0} > {1})", "ge": "({0} >= {1})",
            "logical_and": "({0} & {1})", "logical_or": "({0} | {1})",
            "logical_xor": "({0} ^ {1})", "logical_not": "({0} == 0)", "neg": "(-{0})",
            "abs": "tl.abs({0})", "exp": "tl.exp({0})", "exp2": "tl.exp2({0})",
            "log": "tl.log({0})", "log2": "tl.log2({0})", "sqrt": "tl.sqrt({0})",
            "rsqrt": "tl.rsqrt({0})", "sin": "tl.sin({0})", "cos": "tl.cos({0})",
            "sigmoid": "tl.sigmoid({0})", "erf": "tl.erf({0})", "floor": "tl.floor({0})",
            "ceil": "tl.ceil({0})", "isnan": "({0} != {0})",
            "where": "tl.where({0}, {1}, {2})",
        }  # fmt: skip
        if op == "isinf":
            return f"(tl.abs({a[0]}) == float('inf'))" if isfloat else f"({a[0]} != {a[0]})"
        if op in ("logical_and", "logical_or", "logical_xor", "logical_not") and in_dt != "bool":
            a = [f"({x} != 0)" for x in a]
        if op in simple:
            if op == "neg" and in_dt == "bool":
                raise Materialize(node.output, "neg of bool")
            return simple[op].format(*a)
        if op in ("maximum", "minimum"):
            fn = "tl.maximum" if op == "maximum" else "tl.minimum"
            nan = ", propagate_nan=tl.PropagateNan.ALL" if isfloat else ""
            return f"{fn}({a[0]}, {a[1]}{nan})"
        if op in ("expm1", "log1p", "tanh"):
            name = f"_kf_{op}"
            self.helpers.add(name)
            return f"{name}({a[0]})"
        if op == "sign":
            one = _literal(1, in_dt)
            zero = _literal(0, in_dt)
            return f"tl.where({a[0]} > 0, {one}, tl.where({a[0]} < 0, -{one}, {zero}))"
        if op == "cast":
            target = node.attrs["dtype"]
            if target == "bool":
                return f"({a[0]} != 0)"
            t = compute_dtype(target)
            if dtypes.is_low_precision(target):
                return f"{a[0]}.to({TL[target]}).to(tl.float32)"  # round as asked
            return f"{a[0]}.to({TL[t]})"
        if op == "pow":
            self.helpers.add("_kf_pow")
            if isfloat:
                return f"_kf_pow({a[0]}, {a[1]})"
            f = f"_kf_pow({a[0]}.to(tl.float64), {a[1]}.to(tl.float64))"
            return f"tl.where({f} >= 0, tl.floor({f} + 0.5), tl.ceil({f} - 0.5)).to({TL[cdt]})"
        if op in ("floordiv", "mod"):
            x, y = a
            if isfloat:
                fl = f"tl.floor({x} / {y})"
                return fl if op == "floordiv" else f"({x} - {y} * {fl})"
            # Either rounding of Triton's integer division (interpreter and GPU differ), fixed
            # to NumPy's floor semantics.
            q, r = f"({x} // {y})", f"({x} - ({x} // {y}) * {y})"
            fix = f"(({r} != 0) & (({r} < 0) != ({y} < 0)))"
            if op == "floordiv":
                return f"({q} - {fix}.to({TL[cdt]}))"
            return f"({r} + tl.where({fix}, {y}, 0))"
        raise Materialize(node.output, f"no Triton for {op}")

    def concat(self, node: Node, ix, scope: Scope) -> Expr:
        axis = node.attrs["axis"]
        pos = ix[axis]
        pos_expr = self.syms.emit(pos)
        deps = self.syms.deps(pos)
        start = 0
        result: Expr | None = None
        pieces = []
        for u in node.inputs:
            n = u.shape[axis]
            if n == 0:
                continue
            sub = ix[:axis] + (pos + (-start),) + ix[axis + 1 :]
            cond = f"(({pos_expr}) >= {start}) & (({pos_expr}) < {start + n})"
            saved = self.mask_extra
            self.mask_extra = (*saved, cond)
            e = self.ev(u, sub, scope)
            self.mask_extra = saved
            pieces.append((cond, e))
            start += n
        result = pieces[-1][1]
        for cond, e in reversed(pieces[:-1]):
            result = self.assign(
                scope, f"tl.where({cond}, {e.name}, {result.name})", deps | e.deps | result.deps
            )
        return result

    def take(self, node: Node, ix, scope: Scope) -> Expr:
        x, idx = node.inputs
        axis = node.attrs["axis"]
        k = idx.ndim
        i = self.ev(idx, tuple(ix[axis : axis + k]), scope)
        n = x.shape[axis]
        wrapped = self.assign(scope, f"tl.where({i.name} < 0, {i.name} + {n}, {i.name})", i.deps)
        self.syms.opaque[wrapped.name] = wrapped.deps
        sub = ix[:axis] + (Affine.of(wrapped.name),) + ix[axis + k :]
        return self.ev(x, sub, scope)

    # -- rows kernels ----------------------------------------------------------------------

    def canon_out(self, node: Node) -> tuple[Affine, ...]:
        """The index map at which a reduction's output lines up with the row symbols."""
        keep = node.attrs.get("keepdims", False)
        out = []
        kept = iter(self.kept_map)
        for i in range(len(self.group.shape)):
            if i in self.group.axes:
                if keep:
                    out.append(ZERO)
            else:
                out.append(next(kept))
        return tuple(out)

    def reduce(self, node: Node, scope: Scope) -> Expr:
        """Single pass: the whole reduced extent is in this tile."""
        x = self.ev(node.inputs[0], self.in_map, scope)
        e = self.reduce_tile(node, x, scope)
        self.regs[(id(node), self.canon_out(node))] = e
        return e

    def neutral(self, node: Node) -> str:
        dt = compute_dtype(node.inputs[0].dtype)
        op = node.op
        if op == "sum":
            return _literal(0, dt)
        if op == "prod":
            return _literal(1, dt)
        big = "float('inf')" if dtypes.is_float(dt) else str(_int_max(dt))
        small = "-float('inf')" if dtypes.is_float(dt) else str(_int_min(dt))
        if dt == "bool":
            big, small = "1", "0"
        return small if op in ("max", "argmax") else big

    def reduce_tile(self, node: Node, x: Expr, scope: Scope) -> Expr:
        op = node.op
        full = frozenset({"r", "c"})
        v = self.assign(scope, f"tl.where(mask, {x.name}, {self.neutral(node)})", full)
        if op in ("argmax", "argmin"):
            best = "tl.max" if op == "argmax" else "tl.min"
            m = self.assign(scope, f"{best}({v.name}, axis=1, keep_dims=True)", frozenset({"r"}))
            hit = f"tl.where(({v.name} == {m.name}) & mask, cols, {2**31 - 1})"
            return self.assign(
                scope, f"tl.min({hit}, axis=1, keep_dims=True).to(tl.int64)", frozenset({"r"})
            )
        return self.assign(scope, self.row_reduce(op, v.name), frozenset({"r"}), "red")

    def row_reduce(self, op: str, tile: str) -> str:
        """``tile`` reduced along its columns by sum, prod, max or min (kept as [rows, 1])."""
        if op == "prod":
            self.helpers.add("_kf_mul")
            return f"tl.reduce({tile}, 1, _kf_mul, keep_dims=True)"
        fn = {"sum": "tl.sum", "max": "tl.max", "min": "tl.min"}[op]
        return f"{fn}({tile}, axis=1, keep_dims=True)"


def _int_max(dt: str) -> int:
    bits = 8 * dtypes.ITEMSIZE[dt]
    return 2 ** (bits - 1) - 1 if not dt.startswith("u") else 2**bits - 1


def _int_min(dt: str) -> int:
    bits = 8 * dtypes.ITEMSIZE[dt]
    return -(2 ** (bits - 1)) if not dt.startswith("u") else 0


def view_map(node: Node, ix: tuple[Affine, ...], w: Writer, scope: Scope) -> tuple[Affine, ...]:
    """The index map of a view's input, given the map of its output."""
    src = node.inputs[0]
    op = node.op
    if op == "transpose":
        perm = node.attrs["perm"]
        out = [ZERO] * len(perm)
        for d, p in enumerate(perm):
            out[p] = ix[d]
        return tuple(out)
    if op == "broadcast_to":
        return w.broadcast_map(src, node.output.shape, ix)
    if op == "slice":
        return tuple(
            a.scale(step) + start
            for a, start, step in zip(ix, node.attrs["starts"], node.attrs["steps"], strict=True)
        )
    assert op == "reshape"
    return reshape_map(src.shape, node.output.shape, ix, w, scope)


def reshape_map(src_shape, out_shape, ix, w: Writer, scope: Scope) -> tuple[Affine, ...]:
    """Input map of a reshape: dimension groups of equal size map affinely when the input side
    of a group is one dimension; otherwise through one flat index and divisions."""
    out: list[Affine] = []
    i = j = 0
    while i < len(src_shape) or j < len(out_shape):
        # Size-1 input dims take index 0; size-1 output dims contribute nothing.
        if i < len(src_shape) and src_shape[i] == 1:
            out.append(ZERO)
            i += 1
            continue
        if j < len(out_shape) and out_shape[j] == 1:
            j += 1
            continue
        i0, j0 = i, j
        pi, pj = src_shape[i], out_shape[j]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj:
                pi *= src_shape[i]
                i += 1
            else:
                pj *= out_shape[j]
                j += 1
        flat = ZERO
        for d in range(j0, j):
            flat = flat + ix[d].scale(math.prod(out_shape[d + 1 : j]))
        if i - i0 == 1:
            out.append(flat)
            continue
        deps = w.syms.deps(flat)
        name = w.assign(scope, w.syms.emit(flat), deps, "f").name
        for d in range(i0, i):
            inner = math.prod(src_shape[d + 1 : i])
            expr = name if inner == 1 else f"({name} // {inner})"
            if d > i0:
                expr = f"({expr} % {src_shape[d]})"
            sub = w.assign(scope, expr, deps, "f").name
            w.syms.opaque[sub] = deps
            out.append(Affine.of(sub))
    return tuple(out)


# -- kernel assembly -------------------------------------------------------------------------


def unit_dims(ix: tuple[Affine, ...], shape) -> tuple[Affine, ...]:
    """``ix`` with index 0 on dims of size 1: one spelling per map, so that maps reached
    through broadcasting compare equal to the kernel's own."""
    return tuple(ZERO if n == 1 else a for a, n in zip(ix, shape, strict=True))


def _next_pow2(n: int) -> int:
    return 1 << max(0, (max(n, 1) - 1).bit_length())


def _store(w: Writer, root: Value, e: Expr, off: Affine | str, deps, scope: Scope) -> None:
    """Store ``e`` to ``root`` at ``off``, over the tile of the symbol groups ``deps`` (the
    pointer gets the tile's full shape even where the offset does not vary over a group)."""
    mask = w.mask(deps)
    value = e.name
    if isinstance(off, str):
        offset = off
    else:
        offset = w.syms.emit(off)
        for g in sorted(deps - w.syms.deps(off)):
            offset += f" + 0 * {w.syms.groups[g].flat}"
    if compute_dtype(root.dtype) != root.dtype or dtypes.is_int(root.dtype) or root.dtype == "bool":
        value = f"{value}.to({TL[root.dtype]})"
    m = f", mask={mask}" if mask else ""
    scope.lines.append(f"{scope.indent}tl.store({w.arg(root)} + {offset}, {value}{m})")


def _source(w: Writer, body: list[str], params: list[str] | None = None) -> str:
    order = sorted(w.args.values(), key=lambda v: v.id)
    w.ordered_args = order
    names = [f"b{v.id}" for v in order]
    helpers = set(w.helpers)
    for h in list(helpers):
        helpers.update(HELPER_NEEDS.get(h, ()))
    parts = ["import triton", "import triton.language as tl"]
    table = HELPERS if w.interpret else {**HELPERS, **GPU_HELPERS}
    if not w.interpret and any(h in GPU_HELPERS for h in helpers):
        parts.append("from triton.language.extra import libdevice")
    parts.append("")
    parts += [table[h].strip() + "\n" for h in sorted(helpers)]
    parts.append(f"def {w.name}({', '.join(names + (params or []))}):")
    parts += body
    return "\n".join(parts) + "\n"


def _roots_in_order(group: KernelGroup) -> list[Value]:
    return sorted(group.roots, key=lambda v: v.id)


def pointwise_launch(n: int, interpret: bool) -> tuple[int, int]:
    """(elements per program, warps) of a pointwise kernel over ``n`` elements: 16 elements
    per thread on the GPU; big tiles under the interpreter, which runs programs one after
    another."""
    block = min(4096 if interpret else 2048, _next_pow2(n))
    # Measured on the H100 (benchmarks/sweep_jit.py, gelu at [32768, 4096] bf16): 2048
    # elements over 4 warps, 2.96 TB/s; over 8 warps, 2.87.
    return block, 1 if block <= 128 else 4


def rows_launch(R: int, C: int, esize: int, single: bool, interpret: bool) -> tuple[int, int, int]:
    """(rows per program, columns per tile, warps) of a rows kernel with ``R`` rows of ``C``
    reduced elements of ``esize`` bytes; ``single``: the whole row in one tile."""
    from ..kernels.common import row_launch

    if single:
        lc = row_launch(C, min(esize, 4))
        bm, bc, warps = lc.block_m, lc.block_n, lc.num_warps
        if interpret:
            bm = max(1, min(_next_pow2(R), (1 << 14) // bc))
    else:
        bm, bc, warps = 1, 8192 if interpret else 4096, 8
    return min(bm, _next_pow2(R)), bc, warps


def pointwise(w: Writer) -> tuple[str, Launch]:
    shape = w.group.shape
    n = math.prod(shape)
    w.big = n > INT32_MAX or _max_offset(w) > INT32_MAX
    block, warps = pointwise_launch(n, w.interpret)
    syms = w.syms.add_group(Group("p", "offs", [f"p{i}" for i in range(len(shape))], list(shape)))
    body = ["    pid = tl.program_id(0)"]
    pid = "pid.to(tl.int64)" if w.big else "pid"
    body += [f"    offs = {pid} * {block} + tl.arange(0, {block})", f"    pmask = offs < {n}"]
    scope = Scope(body, "    ")
    for root in _roots_in_order(w.group):
        e = w.ev(root, unit_dims(tuple(syms), shape), scope)
        _store(w, root, e, "offs", frozenset({"p"}), scope)
    return _source(w, body), Launch((-(-n // block),), warps)


def _max_offset(w: Writer) -> int:
    """Largest element offset into any buffer the kernel may touch (64-bit indices above
    2**31)."""
    return max(
        (
            sum(abs(s) * (n - 1) for s, n in zip(st, sh, strict=True))
            for sh, st in w.layouts.values()
        ),
        default=0,
    )


def rows(w: Writer, single_max: int) -> tuple[str, Launch]:
    g = w.group
    shape, axes = g.shape, g.axes
    kept = [i for i in range(len(shape)) if i not in axes]
    R = math.prod(shape[i] for i in kept)
    C = math.prod(shape[i] for i in axes)
    w.big = R * max(C, 1) > INT32_MAX or _max_offset(w) > INT32_MAX
    # Tiles are sized by the bytes of the stored results: intermediates (an fp32 upcast for
    # accumulation) live in registers either way.
    esize = max(dtypes.ITEMSIZE[v.dtype] for v in g.roots)
    single = _next_pow2(C) <= single_max
    bm, bc, warps = rows_launch(R, C, esize, single, w.interpret)
    w.bm = bm
    rsyms = w.syms.add_group(
        Group("r", "rows", [f"k{i}" for i in range(len(kept))], [shape[i] for i in kept])
    )
    csyms = w.syms.add_group(
        Group("c", "cols", [f"a{i}" for i in range(len(axes))], [shape[i] for i in axes])
    )
    w.kept_map = unit_dims(tuple(rsyms), [shape[i] for i in kept])
    in_map: list[Affine] = [ZERO] * len(shape)
    for i, s in zip(kept, rsyms, strict=True):
        in_map[i] = s
    for i, s in zip(axes, csyms, strict=True):
        in_map[i] = s
    w.in_map = unit_dims(tuple(in_map), shape)
    pid = "tl.program_id(0).to(tl.int64)" if w.big else "tl.program_id(0)"
    body = [
        f"    rows = {pid} * {bm} + tl.arange(0, {bm})[:, None]",
        f"    rmask = rows < {R}",
    ]
    outer = Scope(body, "    ")
    full_roots = [r for r in _roots_in_order(g) if r.shape == shape]
    row_roots = [r for r in _roots_in_order(g) if r.shape != shape]
    if single:
        _columns(body, "    ", bc, C)
        for red in g.reductions:
            if (id(red), w.canon_out(red)) not in w.regs:
                w.reduce(red, outer)
        inner = outer
    else:
        for red in g.reductions:
            _looped_reduction(w, red, outer, bc, C)
        inner = None
    for root in row_roots:
        e = w.ev(root, _root_map(w, root), outer)
        _store(w, root, e, _contig(_root_map(w, root), root.shape), frozenset({"r"}), outer)
    if full_roots:
        if inner is None:
            inner = _column_loop(outer, bc, C)
        for root in full_roots:
            e = w.ev(root, w.in_map, inner)
            _store(w, root, e, _contig(w.in_map, shape), frozenset({"r", "c"}), inner)
    return _source(w, body), Launch((-(-R // bm),), warps)


def _columns(lines: list[str], indent: str, bc: int, C: int, start: str = "") -> None:
    """Define the column tile: ``cols``, its mask, and the tile's mask."""
    lines += [
        f"{indent}cols = {start}tl.arange(0, {bc})[None, :]",
        f"{indent}cmask = cols < {C}",
        f"{indent}mask = rmask & cmask",
    ]


def _column_loop(outer: Scope, bc: int, C: int) -> Scope:
    """Open a loop over the row's column tiles; returns the loop body's scope."""
    outer.lines.append(f"    for c0 in range(0, {C}, {bc}):")
    _columns(outer.lines, "        ", bc, C, "c0 + ")
    return Scope(outer.lines, "        ", parent=outer)


def _root_map(w: Writer, root: Value) -> tuple[Affine, ...]:
    g = w.group
    if root.ndim == len(g.shape):  # keepdims shape
        return tuple(ZERO if i in g.axes else w.in_map[i] for i in range(len(g.shape)))
    return w.kept_map


def _contig(ix: tuple[Affine, ...], shape) -> Affine:
    """The flat row-major offset of map ``ix`` into a contiguous array of ``shape``."""
    off = ZERO
    for d, a in enumerate(ix):
        off = off + a.scale(math.prod(shape[d + 1 :]))
    return off


def _looped_reduction(w: Writer, red: Node, outer: Scope, bc: int, C: int) -> None:
    """A reduction over a row too wide for one tile: a loop of tiles into a vector
    accumulator, then one reduction of the accumulator."""
    op = red.op
    dt = TL[compute_dtype(red.inputs[0].dtype)]
    acc = w.fresh("acc")
    lines = outer.lines
    init = w.neutral(red)
    lines.append(f"    {acc} = tl.full([{w.bm}, {bc}], {init}, {dt})")
    if op in ("argmax", "argmin"):
        lines.append(f"    {acc}_i = tl.zeros([{w.bm}, {bc}], tl.int64)")
    inner = _column_loop(outer, bc, C)
    x = w.ev(red.inputs[0], w.in_map, inner)
    v = f"tl.where(mask, {x.name}, {init})"
    if op == "sum":
        lines.append(f"        {acc} = {acc} + {v}")
    elif op == "prod":
        lines.append(f"        {acc} = {acc} * {v}")
    elif op in ("max", "min"):
        fn = "tl.maximum" if op == "max" else "tl.minimum"
        lines.append(f"        {acc} = {fn}({acc}, {v})")
    else:
        better = ">" if op == "argmax" else "<"
        lines += [
            f"        t = {v}",
            f"        better = t {better} {acc}",
            f"        {acc}_i = tl.where(better, cols.to(tl.int64), {acc}_i)",
            f"        {acc} = tl.where(better, t, {acc})",
        ]
    if op in ("argmax", "argmin"):
        fn = "tl.max" if op == "argmax" else "tl.min"
        m = w.assign(outer, f"{fn}({acc}, axis=1, keep_dims=True)", frozenset({"r"}))
        hit = f"tl.where({acc} == {m.name}, {acc}_i, {2**62})"
        e = w.assign(outer, f"tl.min({hit}, axis=1, keep_dims=True)", frozenset({"r"}), "red")
    else:
        e = w.assign(outer, w.row_reduce(op, acc), frozenset({"r"}), "red")
    w.regs[(id(red), w.canon_out(red))] = e


def matmul(w: Writer) -> tuple[str, Launch]:
    """A tiled ``tl.dot`` kernel with fp32 accumulation; operands are read through their
    views (a transposed weight costs nothing), roots are the product and its elementwise
    epilogue."""
    node = w.group.node
    assert node is not None
    a, b = node.inputs
    out = node.output.shape
    M, N, K = out[-2], out[-1], a.shape[-1]
    batch = out[:-2]
    w.big = _max_offset(w) > INT32_MAX or math.prod(out) > INT32_MAX
    cap = 64 if w.interpret else 128
    bm = min(cap, max(16, _next_pow2(M)))
    bn = min(cap, max(16, _next_pow2(N)))
    bk = min(64 if not w.interpret else 32, max(16, _next_pow2(K)))
    warps = 8 if bm * bn >= 128 * 128 else 4
    bsyms = w.syms.add_group(
        Group("b", "bidx", [f"b{i}" for i in range(len(batch))], list(batch), masked=False)
    )
    (m,) = w.syms.add_group(Group("m", "rm", ["m"], [M]))
    (n,) = w.syms.add_group(Group("n", "rn", ["n"], [N]))
    (ka,) = w.syms.add_group(Group("ka", "rka", ["ka"], [K]))
    (kb,) = w.syms.add_group(Group("kb", "rkb", ["kb"], [K]))
    gm, gn = -(-M // bm), -(-N // bn)
    body = [
        "    pid = tl.program_id(0)",
        f"    group = pid // {8 * gn}",  # 8 row-tiles share columns of b: L2 reuse
        "    first = group * 8",
        f"    size = tl.minimum({gm} - first, 8)",
        "    pid_m = first + (pid % size)",
        f"    pid_n = (pid % {8 * gn}) // size",
        "    bidx = tl.program_id(1)" + (".to(tl.int64)" if w.big else ""),
        f"    rm = pid_m * {bm} + tl.arange(0, {bm})[:, None]",
        f"    rn = pid_n * {bn} + tl.arange(0, {bn})[None, :]",
        f"    mmask = rm < {M}",
        f"    nmask = rn < {N}",
        f"    acc = tl.zeros([{bm}, {bn}], tl.float32)",
        f"    for k0 in range(0, {K}, {bk}):",
        f"        rka = k0 + tl.arange(0, {bk})[None, :]",
        f"        rkb = k0 + tl.arange(0, {bk})[:, None]",
        f"        kamask = rka < {K}",
        f"        kbmask = rkb < {K}",
    ]
    outer = Scope(body, "    ")
    inner = Scope(body, "        ", parent=outer)

    def operand(v: Value, last2: tuple[Affine, Affine]) -> str:
        lead = len(batch) - (v.ndim - 2)
        bmap = tuple(ZERO if n == 1 else bsyms[lead + i] for i, n in enumerate(v.shape[:-2]))
        w.native_loads = not w.interpret
        e = w.ev(v, bmap + last2, inner)
        w.native_loads = False
        return e.name

    x, y = operand(a, (m, ka)), operand(b, (kb, n))
    if w.interpret or a.dtype == "float32":
        dot = f"tl.dot({x}.to(tl.float32), {y}.to(tl.float32), input_precision='ieee')"
    else:
        dot = f"tl.dot({x}.to({TL[a.dtype]}), {y}.to({TL[b.dtype]}))"
    body.append(f"        acc += {dot}")
    canon = unit_dims((*bsyms, m, n), out)
    w.regs[(id(node), canon)] = Expr("acc", frozenset({"b", "m", "n"}))
    for root in _roots_in_order(w.group):
        e = w.ev(root, canon, outer)
        _store(w, root, e, _contig(canon, out), frozenset({"m", "n"}), outer)
    grid = (gm * gn, max(1, math.prod(batch)))
    return _source(w, body), Launch(grid, warps, 1 if w.interpret else 3)


def generate(
    group: KernelGroup, stop: set[int], layouts, interpret: bool, name: str,
    single_max: int = 16384,
) -> KernelSource:  # fmt: skip
    """Triton source for ``group`` (raises :class:`Materialize` when a value it needs must be
    stored first)."""
    w = Writer(group, stop, layouts, interpret, name)
    if group.kind == "pointwise":
        src, launch = pointwise(w)
    elif group.kind == "rows":
        src, launch = rows(w, single_max)
    else:
        src, launch = matmul(w)
    return KernelSource(name, src, w.ordered_args, launch)
