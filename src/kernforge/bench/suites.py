"""Benchmark cases of the catalog families, at the sizes the performance bar names.

On a GPU: bf16 at [32768, 4096] and [4096, 14336] (rows x features; for silu_and_mul the
output is that size, for rope it is [tokens, heads*128] of q and of k), forward and backward,
with the bar of >= 2.7 TB/s forward and >= 2.4 TB/s backward. Without a GPU: small shapes
through the interpreter, as a correctness smoke test.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch._functorch.config as functorch_config

from .. import ops
from ..dispatch import backend
from ..kernels.glu import silu_and_mul_torch
from ..kernels.layer_norm import layer_norm_torch
from ..kernels.rms_norm import rms_norm_torch
from ..kernels.rope import rope_torch
from .harness import Case

GPU_SHAPES = [(32768, 4096), (4096, 14336)]
CPU_SHAPES = [(64, 256), (16, 1024)]
TARGET = {"fwd": 2.7, "bwd": 2.4}
HEAD_DIM = 128  # rope: features = heads * HEAD_DIM

#: Why a family misses its bar, written after measuring (kept here so a re-run keeps them).
#: Tuning history and the method: benchmarks/results/NOTES.md.
NOTES: dict[str, str] = {
    "rms_norm": (
        "Backward at [4096, 14336] misses 2.4 TB/s (~2.2; still ~1.4x torch.compile): the "
        "persistent backward holds a 14336-wide row of x and dy in fp32 plus w and the fp32 "
        "dweight accumulator, 4 x 16384 values = the whole 64K-register file of an SM, so one "
        "row is in flight per SM and its load latency is exposed. Tried and measured slower: "
        "dweight partials in L2 instead of registers, re-reading w per row, 2 rows per "
        "program. Forward at [4096, 14336] runs at ~92% of copy bandwidth, within ~1% of "
        "torch.compile (run-to-run spread)."
    ),
    "layer_norm": (
        "Backward misses at both shapes: it carries one more accumulator (dbias) than rms_norm. "
        "At [32768, 4096] it is within ~1% of 2.4 TB/s and ~1.15x torch.compile. At "
        "[4096, 14336] the registers overflow (see rms_norm); dbias is summed outside the "
        "kernel there (one more read of dy, counted against us). Forward at [4096, 14336] "
        "ties torch.compile (~90% of copy): two row reductions per row."
    ),
    "softmax": (
        "Backward at [32768, 4096] runs at ~100% of copy bandwidth: a tie with torch.compile "
        "within noise (<1%). At [4096, 14336] the backward runs at ~96% of copy, 1-1.5% under "
        "torch.compile: a miss by the letter, about the run-to-run spread."
    ),
    "glu": "",
    "gemv": (
        "TB/s counts the weight bytes read (x and y are under 0.5%). Each timed call runs the "
        "GEMV over ceil(1 GiB / W) weight copies (10 at 14336x4096 and 4096x14336, 3 at "
        "151936x1536, 32 at 4096x4096) so that W always comes from HBM, never L2. The "
        "harness flushes L2 (a 256 MB memset) before each replay; kernforge's GEMV loses "
        "11-27% after that flush and cuBLAS 1-3% (benchmarks/gemv_final.py part A, same "
        "graphs): replayed back to back, kernforge vs cuBLAS is 2.78 vs 2.80 TB/s at "
        "1x14336x4096, 2.82 vs 2.71 at 16x151936x1536, 2.58 vs 2.57 at 16x4096x14336, and "
        "the sweep (benchmarks/gemv_sweep.py, back to back, gemv.sweep.json) had the best "
        "config per shape at 2.54-3.02 TB/s, 1.00-1.28x cuBLAS, at all 12 shapes (the shipped "
        "configs, one per M <= 8 and M <= 16: 1.95-2.88 TB/s, 0.85-1.21x). Why the flush hurts "
        "this kernel more is not yet known (dirty-line write-back against 8 warps per row "
        "group each streaming its own K slice is the lead). The bar's 1.2x cuBLAS at M=1 "
        "cannot be met at three shapes: cuBLAS reads 2.59-2.76 TB/s there, and 1.2x of that "
        "is above this GPU's 3.0 TB/s copy bandwidth (the 2.13 TB/s cuBLAS figure the bar "
        "came from was likely taken on the first call after an L2 flush). At 4096x4096 "
        "kernforge is 1.08x cuBLAS here (1.18-1.20x back to back), and both are far under "
        "2.6 TB/s: 32 MB is read in ~15 us, launch and ramp-up included."
    ),
    "rope": (
        "Forward runs at 93-98% of copy bandwidth but 2-4% under torch.compile. A program "
        "handles one token of q or of k, so each cos/sin row is read twice (the bytes count it "
        "once); handling q and k of a token in one program is the next thing to try. Backward "
        "ties torch.compile within ~1%."
    ),
}


def notes_for(family: str, env: dict) -> str:
    """The notes written with ``family``'s results: :data:`NOTES`, the figures a run records
    beside its table (kf.jit's host time and first-call time), and the ``NOTES`` of the
    family's case modules."""
    parts = [NOTES.get(family, "")]
    if family == "trace":
        from .jit_cases import notes

        parts.append(notes(env))
    parts += [getattr(module, "NOTES", "") for module in _modules(family)]  # cases modules' own
    return "\n\n".join(t for t in parts if t)


#: Arguments that are constants, not trained (rope's cos/sin tables): no gradient is asked.
CONSTANT_ARGS: dict[str, set[int]] = {"rope": {2, 3}}

# An op spec: (name, build(shape, dtype, device) -> (args, grad-needing arg indices),
#              kernforge fn, torch fn, bytes(shape, elem_bytes, direction))
Spec = tuple[str, Callable, Callable, Callable, Callable]


def _rand(shape, dtype, dev, scale=1.0):
    return (torch.randn(shape, device=dev) * scale).to(dtype)


def _rows(shape, dtype, dev):
    return [_rand(shape, dtype, dev)]


def _norm_args(with_bias: bool, with_res: bool):
    def build(shape, dtype, dev):
        args = [_rand(shape, dtype, dev), 1 + 0.1 * _rand(shape[-1:], dtype, dev)]
        if with_bias:
            args.append(0.1 * _rand(shape[-1:], dtype, dev))
        if with_res:
            args.append(_rand(shape, dtype, dev))
        return args

    return build


def _glu_args(shape, dtype, dev):
    m, n = shape
    return [_rand((m, 2 * n), dtype, dev)]


def _rope_args(shape, dtype, dev):
    m, n = shape
    q = _rand((1, m, n // HEAD_DIM, HEAD_DIM), dtype, dev)
    k = _rand((1, m, n // HEAD_DIM, HEAD_DIM), dtype, dev)
    angle = torch.rand(m, HEAD_DIM // 2, device=dev) * 6.28
    angle = torch.cat([angle, angle], dim=-1)
    return [q, k, angle.cos().to(dtype), angle.sin().to(dtype)]


def _specs() -> dict[str, list[Spec]]:
    """Per family: the ops benchmarked, how to build inputs, the three implementations, bytes."""
    mn = lambda s: s[0] * s[1]  # noqa: E731
    return {
        "rms_norm": [
            ("rms_norm", _norm_args(False, False),
             lambda x, w: ops.rms_norm(x, w, 1e-6),
             lambda x, w: rms_norm_torch(x, w, 1e-6, None),
             lambda s, e, d: (2 if d == "fwd" else 3) * mn(s) * e),
            ("rms_norm+residual", _norm_args(False, True),
             lambda x, w, r: ops.rms_norm(x, w, 1e-6, residual=r),
             lambda x, w, r: rms_norm_torch(x, w, 1e-6, r),
             lambda s, e, d: 4 * mn(s) * e),
        ],
        "layer_norm": [
            ("layer_norm", _norm_args(True, False),
             lambda x, w, b: ops.layer_norm(x, w, b, 1e-5),
             lambda x, w, b: layer_norm_torch(x, w, b, 1e-5),
             lambda s, e, d: (2 if d == "fwd" else 3) * mn(s) * e),
        ],
        "softmax": [
            ("softmax", _rows, lambda x: ops.softmax(x, -1), lambda x: torch.softmax(x, -1),
             lambda s, e, d: (2 if d == "fwd" else 3) * mn(s) * e),
            ("log_softmax", _rows, lambda x: ops.log_softmax(x, -1),
             lambda x: torch.log_softmax(x, -1),
             lambda s, e, d: (2 if d == "fwd" else 3) * mn(s) * e),
        ],
        "glu": [
            ("silu_and_mul", _glu_args, ops.silu_and_mul, silu_and_mul_torch,
             lambda s, e, d: (3 if d == "fwd" else 5) * mn(s) * e),
        ],
        "rope": [
            ("rope", _rope_args,
             lambda q, k, c, s: ops.rope(q, k, c, s),
             lambda q, k, c, s: rope_torch(q, k, c, s, None, "bshd"),
             lambda s, e, d: 4 * mn(s) * e + 2 * s[0] * HEAD_DIM * e),
        ],
    }  # fmt: skip


FAMILIES: tuple[str, ...] = tuple(_specs())
#: Families whose cases live in modules of their own (``bench/cases_<name>.py``), each with
#: ``cases(on_gpu, quick) -> list[Case]`` and ``bars(results) -> list[Bar]``.
CASE_MODULES: dict[str, tuple[str, ...]] = {
    "gemm": ("cases_matmul", "cases_fp8_grouped", "cases_moe"),
    "attention": ("cases_attention", "cases_decode"),
    "losses": ("cases_losses",),
    "conv": ("cases_conv",),
}
#: Families run only when named (``kernforge bench gemv``): their own shapes and bars.
EXTRA_FAMILIES: tuple[str, ...] = ("gemv", "trace", *CASE_MODULES)


def _modules(family: str) -> list:
    import importlib

    return [importlib.import_module(f".{m}", __package__) for m in CASE_MODULES.get(family, ())]


def bars_for(family: str, results: list) -> list:
    """The family-level bars (:class:`~.harness.Bar`) of ``family``'s results."""
    return [bar for module in _modules(family) for bar in module.bars(results)]


#: Decode GEMV (ops.linear, M <= 16): (N, K) of W, rows M of x, the bar in TB/s of W read.
GEMV_SHAPES = [(14336, 4096), (4096, 14336), (151936, 1536), (4096, 4096)]
GEMV_CPU_SHAPES = [(64, 256), (100, 264)]
GEMV_MS = (1, 4, 16)
GEMV_TARGET = 2.6
#: Bytes of weight copies one timed call reads (each GEMV on its own copy): W never sits in
#: the 50 MB L2, and the write-back of the dirty lines that the harness's L2 flush leaves is
#: spread over many GEMVs instead of charged to one.
GEMV_ROTATE_BYTES = 1 << 30


def _gemv_make(m, n, k, dtype, dev, copies, with_compile):
    import torch.nn.functional as F

    from ..kernels import linear

    def make():
        ws = [(torch.randn(n, k, device=dev) * k**-0.5).to(dtype) for _ in range(copies)]
        x = torch.randn(m, k, device=dev).to(dtype)
        if dev.type == "cuda":
            reason = linear._supports_cuda(x, ws[0])
            if reason is not None:
                raise RuntimeError(f"the CUDA GEMV cannot run this case: {reason}")

        def kernforge():
            with backend("cuda" if dev.type == "cuda" else "torch"):
                return [ops.linear(x, w) for w in ws]

        impls = {"kernforge": kernforge, "torch": lambda: [F.linear(x, w) for w in ws]}
        if with_compile:
            compiled = torch.compile(lambda x, w: F.linear(x, w), dynamic=False)
            impls["torch.compile"] = lambda: [compiled(x, w) for w in ws]
        ref_dtype = torch.float32 if dev.type == "cuda" else torch.float64

        def check():
            want = x.to(ref_dtype) @ ws[0].to(ref_dtype).t()
            return _rel_err((kernforge()[0],), (want,))

        return impls, check

    return make


def _gemv_cases(on_gpu: bool, with_compile: bool, quick: bool) -> list[Case]:
    """ops.linear at the decode shapes; bytes are those of W (x and y are under 0.5%)."""
    dtype = torch.bfloat16
    dev = torch.device("cuda" if on_gpu else "cpu")
    shapes, ms = (GEMV_SHAPES, GEMV_MS) if on_gpu else (GEMV_CPU_SHAPES, (1, 3))
    if quick:
        shapes, ms = shapes[:1], ms[:1]
    cases = []
    for n, k in shapes:
        wbytes = n * k * dtype.itemsize
        copies = max(2, -(-GEMV_ROTATE_BYTES // wbytes)) if on_gpu else 2
        for m in ms:
            make = _gemv_make(m, n, k, dtype, dev, copies, with_compile)
            cases.append(Case("gemv", "linear", "fwd", (m, n, k), dtype, copies * wbytes,
                              make, GEMV_TARGET))  # fmt: skip
    return cases


#: kf.jit (issue 3): traced NumPy functions at one shape, bar 85% of a 3.0 TB/s copy.
TRACE_SHAPE, TRACE_CPU_SHAPE, TRACE_TARGET = (32768, 4096), (16, 256), 0.85 * 3.0


def _trace_cases(on_gpu: bool, with_compile: bool) -> list[Case]:
    """Each NumPy function of :mod:`.jit_cases` (one fused kernel) against torch and
    torch.compile of the same function written in torch."""
    from .jit_cases import specs

    dtype = torch.bfloat16
    dev = torch.device("cuda" if on_gpu else "cpu")
    shape = TRACE_SHAPE if on_gpu else TRACE_CPU_SHAPE
    cases = []
    for name, build, kf_fn, torch_fn, nbytes in specs():
        make = _make(name, build, kf_fn, torch_fn, shape, dtype, dev, "fwd", with_compile)
        cases.append(Case("trace", name, "fwd", shape, dtype, nbytes(shape, dtype.itemsize, "fwd"),
                          make, TRACE_TARGET))  # fmt: skip
    return cases


def _as_tuple(out) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def _rel_err(outs, refs) -> float:
    num = sum(float((o.double() - r.double()).norm()) ** 2 for o, r in zip(outs, refs, strict=True))
    den = sum(float(r.double().norm()) ** 2 for r in refs)
    return (num / max(den, 1e-30)) ** 0.5


def _make(name, build, kf_fn, torch_fn, shape, dtype, dev, direction, with_compile):
    constant = CONSTANT_ARGS.get(name, set())

    def needs_grad(i: int, a: torch.Tensor) -> bool:
        return a.is_floating_point() and i not in constant

    def make():
        args = build(shape, dtype, dev)

        def kernforge(*a):
            with backend("triton"):
                return kf_fn(*a)

        impls = {"kernforge": kernforge, "torch": torch_fn}
        if with_compile:
            # Donated buffers forbid the retain_graph=True that repeated backward timing needs.
            functorch_config.donated_buffer = False
            # Static shapes: a second shape must not make the reference a slower dynamic kernel.
            impls["torch.compile"] = torch.compile(torch_fn, dynamic=False)
        # Correctness of kernforge against the torch reference on float32 (float64 on CPU) copies.
        ref_dtype = torch.float32 if dev.type == "cuda" else torch.float64
        ref_args = [a.detach().to(ref_dtype) for a in args]
        if direction == "fwd":
            calls = {impl: (lambda f=f: f(*args)) for impl, f in impls.items()}

            def check():
                return _rel_err(_as_tuple(kernforge(*args)), _as_tuple(torch_fn(*ref_args)))

            return calls, check
        calls, gouts = {}, {}
        for impl, f in impls.items():
            leaves = [a.detach().requires_grad_(needs_grad(i, a)) for i, a in enumerate(args)]
            outs = _as_tuple(f(*leaves))
            gouts[impl] = [torch.randn_like(o) for o in outs]
            diff = [x for x in leaves if x.requires_grad]
            calls[impl] = (lambda o=outs, d=diff, g=gouts[impl]:
                           torch.autograd.grad(o, d, g, retain_graph=True))  # fmt: skip
        ref_leaves = [a.requires_grad_(needs_grad(i, a)) for i, a in enumerate(ref_args)]
        ref_outs = _as_tuple(torch_fn(*ref_leaves))

        def check():
            ref_gouts = [g.to(ref_dtype) for g in gouts["kernforge"]]
            diff = [a for a in ref_leaves if a.requires_grad]
            want = torch.autograd.grad(ref_outs, diff, ref_gouts)
            return _rel_err(calls["kernforge"](), want)

        return calls, check

    return make


def cases_for(families: list[str] | None = None, quick: bool = False, on_gpu: bool | None = None,
              with_compile: bool | None = None) -> list[Case]:  # fmt: skip
    """The benchmark cases of ``families`` (default: all), quick = one shape, forward only."""
    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    with_compile = on_gpu if with_compile is None else with_compile
    specs = _specs()
    unknown = sorted(set(families or []) - set(specs) - set(EXTRA_FAMILIES))
    if unknown:
        raise ValueError(f"unknown benchmark families {unknown}; choose from {', '.join(specs)}")
    shapes = GPU_SHAPES if on_gpu else CPU_SHAPES
    directions = ("fwd", "bwd")
    if quick:
        shapes, directions = shapes[:1], ("fwd",)
    dtype = torch.bfloat16
    dev = torch.device("cuda" if on_gpu else "cpu")
    cases = []
    for family in families or list(specs):
        if family == "gemv":
            cases += _gemv_cases(on_gpu, with_compile, quick)
            continue
        if family == "trace":
            cases += _trace_cases(on_gpu, with_compile)
            continue
        if family in CASE_MODULES:
            cases += [c for module in _modules(family) for c in module.cases(on_gpu, quick)]
            continue
        for name, build, kf_fn, torch_fn, nbytes in specs[family]:
            for shape in shapes:
                for direction in directions:
                    make = _make(
                        name, build, kf_fn, torch_fn, shape, dtype, dev, direction, with_compile
                    )
                    cases.append(Case(family, name, direction, shape, dtype,
                                      nbytes(shape, dtype.itemsize, direction), make,
                                      TARGET[direction]))  # fmt: skip
    return cases
