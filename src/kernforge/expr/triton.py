"""Triton code generation for expression programs.

:func:`source` writes a Python module with one ``@triton.jit`` kernel per outer rank (0-3,
see :mod:`~kernforge.expr.layout`). A program processes a [BLOCK_M, BLOCK_N] tile of the
[rows, cols] grid; rowwise programs take whole rows (BLOCK_N >= cols) so reductions are
``tl.sum``/``tl.max`` over the tile. Operands are loaded in their own dtype and upcast to fp32
(also what keeps bf16 exact under the interpreter); outputs are stored in their buffer's dtype.

:func:`load` writes the module into ``KERNFORGE_CACHE_DIR/expr/triton/<hash>.py`` (atomically;
``@triton.jit`` reads kernel source from the file) and imports it, once per source text.
"""

from __future__ import annotations

import math
import threading
from types import ModuleType

import torch
import triton

from .. import device
from ..runtime.loader import import_source
from .emit import Emitter
from .layout import MAX_OUTER, Layout
from .program import N, Program
from .snippets import FUNCTIONS
from .tree import Num, Op

#: Bump when the generated code changes meaning, so cached modules are not reused.
VERSION = 1

# Helpers for functions Triton's core language lacks. On the GPU they call libdevice; under
# the interpreter (which has no libdevice) they use core-language formulas.
_HELPERS_GPU = """
@triton.jit
def _kf_tanh(x):
    return libdevice.tanh(x)


@triton.jit
def _kf_log1p(x):
    return libdevice.log1p(x)


@triton.jit
def _kf_expm1(x):
    return libdevice.expm1(x)


@triton.jit
def _kf_pow(a, b):
    return libdevice.pow(a, b)
"""

_HELPERS_INTERPRET = """
@triton.jit
def _kf_tanh(x):
    t = tl.exp(-2.0 * tl.abs(x))
    r = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -r, r)


@triton.jit
def _kf_log1p(x):
    # log(u) * x / (u - 1) with u = 1 + x cancels the rounding of u (Goldberg's trick).
    u = 1.0 + x
    d = u - 1.0
    return tl.where(d == 0.0, x, tl.log(u) * (x / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def _kf_expm1(x):
    u = tl.exp(x)
    d = u - 1.0
    safe = tl.where((d == 0.0) | (u == float("inf")), 1.0, tl.log(u))
    r = tl.where(d == -1.0, -1.0, d * (x / safe))
    return tl.where(d == 0.0, x, tl.where(u == float("inf"), u, r))


@triton.jit
def _kf_pow(a, b):
    r = tl.exp2(b * tl.log2(tl.abs(a)))
    whole = tl.floor(b) == b
    odd = whole & (tl.floor(b * 0.5) * 2.0 != b)
    r = tl.where((a < 0) & odd, -r, r)
    r = tl.where((a < 0) & (tl.floor(b) != b), float("nan"), r)
    return tl.where(b == 0.0, 1.0, r)
"""

_HELPERS_COMMON = """
@triton.jit
def _kf_softplus(x):
    return tl.maximum(x, 0.0) + _kf_log1p(tl.exp(-tl.abs(x)))
"""

_BINARY = {"add": "+", "sub": "-", "mul": "*", "div": "/", "lt": "<", "le": "<=", "gt": ">",
           "ge": ">=", "eq": "==", "ne": "!=", "and": "&", "or": "|"}  # fmt: skip


def number(v: float) -> str:
    """A float constant as Triton source."""
    if math.isinf(v):
        return 'float("inf")' if v > 0 else '(-float("inf"))'
    text = repr(float(v))
    return f"({text})" if v < 0 else text


def _power(base: str, k: int) -> str:
    """``base ** k`` for a small whole ``k`` as products (exact, and no pow call)."""
    if k == 0:
        return "1.0"
    prod = " * ".join([base] * abs(k))
    return prod if k > 0 else f"1.0 / ({prod})"


def spell(n: Op, args: list[str]) -> str:
    """One operation as a Triton expression over argument codes."""
    if n.op in _BINARY:
        return f"{args[0]} {_BINARY[n.op]} {args[1]}"
    if n.op == "neg":
        return f"-{args[0]}"
    if n.op == "not":
        return f"{args[0]} == 0"
    if n.op == "float":
        return f"tl.where({args[0]}, 1.0, 0.0)"
    if n.op == "where":
        return f"tl.where({args[0]}, {args[1]}, {args[2]})"
    if n.op == "pow" and isinstance(n.args[1], Num):
        k = n.args[1].value
        if k == int(k) and abs(k) <= 8:
            return _power(args[0], int(k))
        if k == 0.5:
            return f"tl.sqrt({args[0]})"
        if k == -0.5:
            return f"tl.rsqrt({args[0]})"
        if k != int(k):  # a negative base gives NaN, as torch.pow
            return f"tl.exp2({number(k)} * tl.log2({args[0]}))"
    if n.op == "pow":
        # Both operands as full tiles: the helper combines masks of both (scalars would not).
        return f"_kf_pow({args[0]} + zero, {args[1]} + zero)"
    return FUNCTIONS[n.op].triton.format(*args)


def _assign(name: str, expr: str, is_bool: bool) -> str:
    return f"    {name} = {expr}"


def _kernel(program: Program, rank: int) -> str:
    ops_, rows_ = program.operands, program.row_operands
    nout = len(program.outputs)
    ptrs = [f"X{i}" for i in range(len(ops_))] + [f"R{i}" for i in range(len(rows_))]
    ptrs += [f"O{i}" for i in range(nout)]
    params = [f"p{i}" for i in range(len(program.params))]
    sizes = [f"S{k}" for k in range(1, rank)]
    strides = [f"s{i}_{k}" for i in range(len(ops_)) for k in [*range(rank), "c"]]
    args = ", ".join([*ptrs, *params, "M", "N", "tiles_n", *sizes, *strides])
    head = [
        "@triton.jit",
        f"def kernel_r{rank}(",
        f"    {args},",
        "    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,",
        "):",
        "    pid = tl.program_id(0)",
        "    pid_m = pid // tiles_n",
        "    pid_n = pid - pid_m * tiles_n",
        "    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)",
        "    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)",
        "    rmask = rows < M",
        "    mask = rmask[:, None] & (cols < N)[None, :]",
        "    zero = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)",
    ]
    # The row index as outer coordinates i0 (outermost) .. i{rank-1}.
    if rank >= 1:
        head.append("    q = rows")
        for k in range(rank - 1, 0, -1):
            head.append(f"    i{k} = q % S{k}")
            head.append(f"    q = q // S{k}")
        head.append("    i0 = q")
    names: dict[str, str] = {}
    for i, name in enumerate(ops_):
        outer = " + ".join(f"i{k} * s{i}_{k}" for k in range(rank))
        off = f"({outer})[:, None] + cols[None, :] * s{i}_c" if rank else f"cols[None, :] * s{i}_c"
        head.append(
            f"    x{i} = tl.load(X{i} + {off}, mask=mask, other=0.0).to(tl.float32)"
        )  # fmt: skip
        names[name] = f"x{i}"
    for i, name in enumerate(rows_):
        head.append(
            f"    r{i} = tl.load(R{i} + rows, mask=rmask, other=0.0).to(tl.float32)[:, None]"
        )
        names[name] = f"r{i}"
    for i, name in enumerate(program.params):
        names[name] = f"p{i}"
    em = Emitter(names, spell, number, _assign)
    body: list[str] = []
    n_code = names.get(N, "N")
    for k, r in enumerate(program.reductions):
        v = em.value(r.expr)
        body += em.take(0)
        if r.kind in ("sum", "mean"):
            red = f"tl.sum(tl.where(mask, {v} + zero, 0.0), axis=1)[:, None]"
            if r.kind == "mean":
                red = f"{red} / {n_code}"
        else:
            fill = '-float("inf")' if r.kind == "max" else 'float("inf")'
            red = f"tl.{r.kind}(tl.where(mask, {v} + zero, {fill}), axis=1)[:, None]"
        body.append(f"    a{k} = {red}")
        em.bind(r.name, f"a{k}")
    for i, out in enumerate(program.outputs):
        v = em.value(out)
        body += em.take(0)
        if program.output_per_row(i):
            # Every column holds the row's value: take column 0's.
            val = f"tl.sum(tl.where(cols[None, :] == 0, {v} + zero, 0.0), axis=1)"
            body.append(f"    tl.store(O{i} + rows, {val}.to(O{i}.dtype.element_ty), mask=rmask)")
        else:
            off = "rows[:, None] * N + cols[None, :]"
            body.append(
                f"    tl.store(O{i} + {off}, ({v} + zero).to(O{i}.dtype.element_ty), mask=mask)"
            )
    return "\n".join(head + body)


def source(program: Program) -> str:
    """The generated module for ``program`` (kernels for every outer rank)."""
    interp = device.INTERPRET
    parts = [
        f'"""Generated by kernforge.expr (triton codegen v{VERSION}); do not edit."""',
        "import triton",
        "import triton.language as tl",
    ]
    if not interp:
        parts.append("from triton.language.extra import libdevice")
    parts.append(_HELPERS_INTERPRET if interp else _HELPERS_GPU)
    parts.append(_HELPERS_COMMON)
    for rank in range(MAX_OUTER + 1):
        parts.append("\n" + _kernel(program, rank) + "\n")
    return "\n".join(parts)


_modules: dict[str, ModuleType] = {}
_by_program: dict[Program, ModuleType] = {}  # skips generating and hashing source per launch
_lock = threading.Lock()


def load(src: str) -> ModuleType:
    """Import generated module source ``src`` (cached in memory and on disk by its hash)."""
    with _lock:
        mod = _modules.get(src)
        if mod is None:
            mod = _modules[src] = import_source(src, "expr/triton")
        return mod


#: Elements per program of elementwise kernels on the GPU (as kernels/glu.py measured), and
#: larger tiles under the interpreter, where programs run one after another.
TILE = 4096
BLOCK_N_MAX = 2048
INTERPRET_TILE = 16384


def _elementwise_launch(m: int, n: int, elem_bytes: int) -> tuple[int, int, int]:
    tile = INTERPRET_TILE if device.INTERPRET else TILE
    block_n = min(triton.next_power_of_2(n), BLOCK_N_MAX if m > 1 else tile)
    block_m = min(triton.next_power_of_2(m), max(1, tile // block_n))
    vec = max(1, 16 // elem_bytes)
    warps = block_m * block_n // (vec * 32 * 2)
    num_warps = max(1, min(8, triton.next_power_of_2(max(warps, 1))))
    return block_m, block_n, num_warps


def launch(
    program: Program,
    layout: Layout,
    operands: list[torch.Tensor],
    row_operands: list[torch.Tensor],
    outputs: list[torch.Tensor],
    params: list[float],
    rowwise: bool,
) -> None:
    """Run ``program`` over ``layout``: ``operands`` read through the layout's strides,
    ``row_operands`` contiguous per row, ``outputs`` contiguous ([rows, cols] or [rows])."""
    if layout.rows == 0 or layout.cols == 0:
        return
    mod = _by_program.get(program)
    if mod is None:
        mod = _by_program[program] = load(source(program))
    kernel = getattr(mod, f"kernel_r{layout.rank}")
    m, n = layout.rows, layout.cols
    elem = min((t.element_size() for t in [*operands, *outputs]), default=4)
    if rowwise:
        from ..kernels.common import row_launch

        cfg = row_launch(n, elem)
        bm, bn, warps = cfg.block_m, cfg.block_n, cfg.num_warps
    else:
        bm, bn, warps = _elementwise_launch(m, n, elem)
    if layout.rank == 0:
        bm = 1
    tiles_n = triton.cdiv(n, bn)
    grid = (triton.cdiv(m, bm) * tiles_n,)
    sizes = list(layout.outer[1:])
    strides = [s for st in layout.strides for s in st]
    kernel[grid](
        *operands, *row_operands, *outputs, *params, m, n, tiles_n, *sizes, *strides,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
    )  # fmt: skip
