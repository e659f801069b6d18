"""CUDA C++ code generation for expression programs, compiled and launched by kernforge.cuda.

Elementwise programs: a grid-stride loop over the flattened [rows, cols] output, one element
per thread per step. Rowwise programs: one thread block per row (grid-stride over rows); each
reduction is a loop over the row's columns into a per-thread partial, combined with warp
shuffles and shared memory; per-row values are computed once per row outside the loops. Inputs
are read through their strides and converted to fp32 (``kf_ld``), outputs converted to their
buffer's type (``kf_st``).

The source depends on the program, the outer rank and the operand/output dtypes (pointer
types are part of the C signature); kernforge.cuda caches the cubins.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .. import device
from .emit import Emitter
from .layout import Layout
from .program import N, Program
from .snippets import FUNCTIONS
from .tree import Node, Num, Op

#: Bump when the generated code changes meaning (part of the source, so of the cache key).
VERSION = 1
KERNEL = "kf_expr"

CTYPES = {torch.float32: "float", torch.float16: "__half", torch.bfloat16: "__nv_bfloat16"}

_PRELUDE = r"""#include <cuda_fp16.h>
#include <cuda_bf16.h>

__device__ __forceinline__ float kf_ld(const float* p) { return *p; }
__device__ __forceinline__ float kf_ld(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float kf_ld(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void kf_st(float* p, float v) { *p = v; }
__device__ __forceinline__ void kf_st(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void kf_st(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ float kf_inf() { return __int_as_float(0x7f800000); }
__device__ __forceinline__ float kf_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
__device__ __forceinline__ float kf_softplus(float x) {
  return fmaxf(x, 0.0f) + log1pf(expf(-fabsf(x)));
}
__device__ __forceinline__ float kf_relu(float x) { return x > 0.0f ? x : 0.0f; }
__device__ __forceinline__ float kf_sign(float x) {
  return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : 0.0f);
}
"""

_BLOCK_REDUCE = r"""
struct KfSum { __device__ float operator()(float a, float b) const { return a + b; } };
struct KfMax { __device__ float operator()(float a, float b) const { return fmaxf(a, b); } };
struct KfMin { __device__ float operator()(float a, float b) const { return fminf(a, b); } };

// Combine one value per thread over the block (blockDim.x a multiple of 32, at most 1024);
// every thread gets the result.
template <typename Op>
__device__ __forceinline__ float kf_block_reduce(float v, float identity, float* smem) {
  Op op;
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;
  __syncthreads();  // smem may still be read by the previous reduction
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = lane < warps ? smem[lane] : identity;
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
"""

_BINARY = {"add": "+", "sub": "-", "mul": "*", "div": "/", "lt": "<", "le": "<=", "gt": ">",
           "ge": ">=", "eq": "==", "ne": "!=", "and": "&&", "or": "||"}  # fmt: skip


def number(v: float) -> str:
    """A float constant as CUDA C++ source."""
    if math.isinf(v):
        return "kf_inf()" if v > 0 else "(-kf_inf())"
    text = repr(float(v))
    if "e" not in text and "." not in text:
        text += ".0"
    return f"({text}f)" if v < 0 else f"{text}f"


def spell(n: Op, args: list[str]) -> str:
    """One operation as a CUDA C++ expression over argument codes."""
    if n.op in _BINARY:
        return f"{args[0]} {_BINARY[n.op]} {args[1]}"
    if n.op == "neg":
        return f"-{args[0]}"
    if n.op == "not":
        return f"!{args[0]}"
    if n.op == "float":
        return f"({args[0]} ? 1.0f : 0.0f)"
    if n.op == "where":
        return f"({args[0]} ? {args[1]} : {args[2]})"
    if n.op == "pow" and isinstance(n.args[1], Num):
        k = n.args[1].value
        if k == int(k) and abs(k) <= 8:
            if k == 0:
                return "1.0f"
            prod = " * ".join([args[0]] * abs(int(k)))
            return prod if k > 0 else f"1.0f / ({prod})"
        if k == 0.5:
            return f"sqrtf({args[0]})"
        if k == -0.5:
            return f"rsqrtf({args[0]})"
    return FUNCTIONS[n.op].cuda.format(*args)


def _signature(program: Program, rank: int, dtypes: list[torch.dtype]) -> list[str]:
    """Kernel parameters; ``dtypes``: operands, row operands, then outputs."""
    nops, nrows = len(program.operands), len(program.row_operands)
    params = []
    for i, dt in enumerate(dtypes):
        ct = CTYPES[dt]
        if i < nops:
            params.append(f"const {ct}* __restrict__ X{i}")
        elif i < nops + nrows:
            params.append(f"const {ct}* __restrict__ R{i - nops}")
        else:
            params.append(f"{ct}* __restrict__ O{i - nops - nrows}")
    params += [f"float p{i}" for i in range(len(program.params))]
    params += ["long long M", "long long N"]
    params += [f"long long S{k}" for k in range(1, rank)]
    params += [f"long long s{i}_{k}" for i in range(nops) for k in [*range(rank), "c"]]
    return params


def _row_coords(rank: int, indent: str) -> list[str]:
    if rank == 0:
        return []
    lines = [f"{indent}long long q = row;"]
    for k in range(rank - 1, 0, -1):
        lines.append(f"{indent}const long long i{k} = q % S{k};")
        lines.append(f"{indent}q /= S{k};")
    lines.append(f"{indent}const long long i0 = q;")
    return lines


def _base(i: int, rank: int) -> str:
    return " + ".join(f"i{k} * s{i}_{k}" for k in range(rank)) if rank else "0"


class _Gen:
    def __init__(self, program: Program) -> None:
        self.p = program
        names = {name: f"p{i}" for i, name in enumerate(program.params)}
        names.setdefault(N, "(float)N")
        self.em = Emitter(names, spell, number, self._assign, self._level)
        self.element_vars = set(program.operands)
        self.row_vars = set(program.row_operands) | {r.name for r in program.reductions}

    @staticmethod
    def _assign(name: str, expr: str, is_bool: bool) -> str:
        return f"{'bool' if is_bool else 'float'} {name} = {expr};"

    def _level(self, n: Node) -> int:
        if self.p.element_level(n):
            return 2
        return 1 if self.p.row_level(n) else 0

    def operands_in(self, *nodes: Node) -> list[int]:
        from .tree import names

        used = set(names(*nodes))
        return [i for i, x in enumerate(self.p.operands) if x in used]


def _indent(lines: list[str], pad: str) -> list[str]:
    return [pad + line for line in lines]


def _elementwise_body(g: _Gen, rank: int) -> list[str]:
    p, em = g.p, g.em
    for i, name in enumerate(p.operands):
        em.bind(name, f"x{i}")
    em.push()  # scope 1: unused (no row values); scope 2: the element loop
    em.push()
    outs = [em.value(o) for o in p.outputs]
    loop = em.pop()
    em.pop()
    prelude = em.take(0)
    lines = [*prelude, "const long long total = M * N;",
             "const long long step = (long long)gridDim.x * blockDim.x;",
             "for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total; "
             "e += step) {"]  # fmt: skip
    inner = []
    if rank:
        inner += ["const long long row = e / N;", "const long long col = e - row * N;"]
        inner += _row_coords(rank, "")
    else:
        inner += ["const long long col = e;"]
    for i in g.operands_in(*p.outputs):
        inner.append(f"const float x{i} = kf_ld(X{i} + ({_base(i, rank)}) + col * s{i}_c);")
    inner += loop
    inner += [f"kf_st(O{i} + e, {v});" for i, v in enumerate(outs)]
    return [*lines, *_indent(inner, "  "), "}"]


_IDENTITY = {"sum": "0.0f", "mean": "0.0f", "max": "(-kf_inf())", "min": "kf_inf()"}
_COMBINE = {"sum": "{a} += {v};", "mean": "{a} += {v};", "max": "{a} = fmaxf({a}, {v});",
            "min": "{a} = fminf({a}, {v});"}  # fmt: skip
_OP = {"sum": "KfSum", "mean": "KfSum", "max": "KfMax", "min": "KfMin"}


def _rowwise_body(g: _Gen, rank: int) -> list[str]:
    p, em = g.p, g.em
    body: list[str] = []
    row_names = {name: f"r{i}" for i, name in enumerate(p.row_operands)}
    for name, code in row_names.items():
        em.bind(name, code)
    for i, name in enumerate(p.operands):
        em.bind(name, f"x{i}")
    em.push()  # scope 1: the row
    row_head = _row_coords(rank, "")
    row_head += [f"const long long b{i} = {_base(i, rank)};" for i in range(len(p.operands))]
    row_head += [f"const float r{i} = kf_ld(R{i} + row);" for i in range(len(p.row_operands))]

    def loop(exprs: list[Node], tail: Callable[[list[str]], list[str]]) -> list[str]:
        em.push()  # scope 2: the loop over the row's columns
        values = [em.value(x) for x in exprs]
        inner = em.pop()
        before = em.take(1)
        loads = [f"const float x{i} = kf_ld(X{i} + b{i} + col * s{i}_c);"
                 for i in g.operands_in(*exprs)]  # fmt: skip
        tail_lines = tail(values)
        return [*before, "for (long long col = threadIdx.x; col < N; col += blockDim.x) {",
                *_indent([*loads, *inner, *tail_lines], "  "), "}"]  # fmt: skip

    for k, r in enumerate(p.reductions):
        if p.element_level(r.expr):
            body.append(f"float acc{k} = {_IDENTITY[r.kind]};")
            combine = _COMBINE[r.kind]

            def tail(v: list[str], k: int = k, combine: str = combine) -> list[str]:
                return [combine.format(a=f"acc{k}", v=v[0])]

            body += loop([r.expr], tail)
            red = f"kf_block_reduce<{_OP[r.kind]}>(acc{k}, {_IDENTITY[r.kind]}, kf_smem)"
            if r.kind == "mean":
                red = f"{red} / (float)N"
        else:  # a per-row value: every column contributes the same
            v = em.value(r.expr)
            body += em.take(1)
            red = f"(float)N * {v}" if r.kind == "sum" else v
        body.append(f"const float a{k} = {red};")
        em.bind(r.name, f"a{k}")
    per_row = [i for i in range(len(p.outputs)) if p.output_per_row(i)]
    per_elem = [i for i in range(len(p.outputs)) if i not in per_row]
    if per_row:
        vals = [em.value(p.outputs[i]) for i in per_row]
        body += em.take(1)
        body.append("if (threadIdx.x == 0) {")
        body += [f"  kf_st(O{i} + row, {v});" for i, v in zip(per_row, vals, strict=True)]
        body.append("}")
    if per_elem:
        exprs = [p.outputs[i] for i in per_elem]

        def store(vals: list[str]) -> list[str]:
            pairs = zip(per_elem, vals, strict=True)
            return [f"kf_st(O{i} + row * N + col, {v});" for i, v in pairs]

        body += loop(exprs, store)
    em.pop()
    prelude = em.take(0)
    return [*prelude, "__shared__ float kf_smem[32];",
            "for (long long row = blockIdx.x; row < M; row += gridDim.x) {",
            *_indent([*row_head, *body], "  "), "}"]  # fmt: skip


def source(program: Program, rank: int, dtypes: list[torch.dtype], rowwise: bool) -> str:
    """CUDA C++ source of ``program`` for ``rank`` outer dimensions; ``dtypes``: operands,
    row operands, then outputs (float32, float16 or bfloat16)."""
    g = _Gen(program)
    body = _rowwise_body(g, rank) if rowwise else _elementwise_body(g, rank)
    params = _signature(program, rank, dtypes)
    head = [f"// Generated by kernforge.expr (cuda codegen v{VERSION}); do not edit.", _PRELUDE]
    if rowwise:
        head.append(_BLOCK_REDUCE)
    sig = ",\n    ".join(params)
    return "\n".join([*head, f'extern "C" __global__ void {KERNEL}(\n    {sig}) {{',
                      *_indent(body, "  "), "}", ""])  # fmt: skip


def row_block(n: int) -> int:
    """Threads per block of a rowwise kernel: wide rows get more threads."""
    for limit, threads in ((1024, 128), (4096, 256), (16384, 512)):
        if n <= limit:
            return threads
    return 1024


_kernels: dict[tuple, object] = {}  # skips generating and hashing source per launch


def compile_program(
    program: Program, rank: int, dtypes: list[torch.dtype], rowwise: bool, arch: str | None = None
):
    """Generate and compile; returns the kernforge.cuda Kernel."""
    from .. import cuda as kcuda

    key = (program, rank, tuple(dtypes), rowwise, arch)
    kernel = _kernels.get(key)
    if kernel is None:
        src = source(program, rank, dtypes, rowwise)
        kernel = _kernels[key] = kcuda.compile(src, KERNEL, arch=arch)
    return kernel


def launch_config(
    layout: Layout,
    operands: list[torch.Tensor],
    row_operands: list[torch.Tensor],
    outputs: list[torch.Tensor],
    params: list[float],
    rowwise: bool,
    sms: int,
) -> tuple[list, int, int]:
    """``(kernel arguments, grid, block)`` of a launch over ``layout``."""
    m, n = layout.rows, layout.cols
    if rowwise:
        block = row_block(n)
        grid = max(1, min(m, sms * max(1, 2048 // block)))
    else:
        block = 256
        grid = max(1, min(-(-m * n // block), sms * 32))
    sizes = list(layout.outer[1:])
    strides = [s for st in layout.strides for s in st]
    args = [*operands, *row_operands, *outputs, *params, m, n, *sizes, *strides]
    return args, grid, block


def launch(
    program: Program,
    layout: Layout,
    operands: list[torch.Tensor],
    row_operands: list[torch.Tensor],
    outputs: list[torch.Tensor],
    params: list[float],
    rowwise: bool,
) -> None:
    """Run ``program`` over ``layout`` (arguments as :func:`kernforge.expr.triton.launch`)."""
    if layout.rows == 0 or layout.cols == 0:
        return
    dtypes = [t.dtype for t in [*operands, *row_operands, *outputs]]
    kernel = compile_program(program, layout.rank, dtypes, rowwise)
    sms = device.num_sms(outputs[0].device.index or 0)
    args, grid, block = launch_config(layout, operands, row_operands, outputs, params, rowwise,
                                      sms)  # fmt: skip
    kernel.launch(*args, grid=grid, block=block)
