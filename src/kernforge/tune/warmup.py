"""Ahead-of-time warm-up: compile (and, when asked, tune) every kernel a model or an op list will
use, in parallel worker processes, into the persistent caches, so no request waits on a compile.

``kernforge warmup --model random:qwen2.5-1.5b`` (or ``--ops rms_norm,matmul --shapes ...``)
splits the work into jobs (one per op and shape, or per batch size and prompt length of a
model), runs them in a ``ProcessPoolExecutor`` of spawned workers and shows a progress bar.
Each job calls the real code once on random inputs: a catalog op, or the LLM runtime's
``generate`` (which runs the first prefill and decode eagerly, then captures their CUDA graphs,
exactly as a served request does). The binaries land in Triton's cache (``TRITON_CACHE_DIR``,
kept under ``KERNFORGE_CACHE_DIR/triton`` unless set; kernforge.config), generated sources and
NVRTC cubins in ``KERNFORGE_CACHE_DIR``; a later process loads them instead of compiling.

Tuning: workers pick configs as the serving process will (remembered, else the shipped table,
kernforge.tune.pretuned) but measure nothing unless ``tune=True``; then the jobs run one at a
time, because timings taken while other processes share the GPU are wrong.

Under the CPU interpreter there is nothing to compile: the jobs still run (through the
interpreter) and the report says so.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .. import config
from ..errors import ArgumentError
from ..progress import Progress

#: Model warm-up shapes (batch x prompt tokens) when none are given: the prefill buckets of a
#: single prompt up to 1k tokens and the decode batch buckets up to 16 rows.
MODEL_SHAPES = ((1, 16), (1, 128), (1, 1024), (2, 16), (4, 16), (8, 16), (16, 16))


# ------------------------------------------------------------------------------ op recipes


@dataclass(frozen=True)
class OpRecipe:
    """How warm-up calls one catalog op at a shape: ``call(shape, dtype, device)``."""

    shapes_help: str
    default_shapes: tuple[tuple[int, ...], ...]
    call: Callable[[tuple[int, ...], torch.dtype, torch.device], object]
    gpu_only: bool = False


def _rand(*shape: int, dtype: torch.dtype, dev: torch.device) -> torch.Tensor:
    return torch.randn(*shape, device=dev).to(dtype)


def _dims(name: str, shape: tuple[int, ...], n: int, help_: str, optional: int = 0):
    if not n - optional <= len(shape) <= n:
        raise ArgumentError(f"warmup: {name} shapes are {help_}, got {'x'.join(map(str, shape))}")
    return shape


def _rms_norm(shape, dtype, dev):
    r, h = _dims("rms_norm", shape, 2, "ROWSxHIDDEN")
    from .. import ops

    ops.rms_norm(_rand(r, h, dtype=dtype, dev=dev), _rand(h, dtype=dtype, dev=dev), 1e-6)


def _layer_norm(shape, dtype, dev):
    r, h = _dims("layer_norm", shape, 2, "ROWSxHIDDEN")
    from .. import ops

    w, b = _rand(h, dtype=dtype, dev=dev), _rand(h, dtype=dtype, dev=dev)
    ops.layer_norm(_rand(r, h, dtype=dtype, dev=dev), w, b, 1e-5)


def _softmax(shape, dtype, dev):
    r, n = _dims("softmax", shape, 2, "ROWSxCOLS")
    from .. import ops

    ops.softmax(_rand(r, n, dtype=dtype, dev=dev))


def _silu_and_mul(shape, dtype, dev):
    r, i = _dims("silu_and_mul", shape, 2, "ROWSxINTERMEDIATE")
    from .. import ops

    ops.silu_and_mul(_rand(r, 2 * i, dtype=dtype, dev=dev))


def _rope(shape, dtype, dev):
    b, s, h, d = _dims("rope", shape, 4, "BATCHxSEQxHEADSxHEAD_DIM")
    from .. import ops

    q, k = _rand(b, s, h, d, dtype=dtype, dev=dev), _rand(b, s, h, d, dtype=dtype, dev=dev)
    ops.rope(q, k, _rand(s, d, dtype=dtype, dev=dev), _rand(s, d, dtype=dtype, dev=dev))


def _matmul(shape, dtype, dev):
    m, n, k = _dims("matmul", shape, 3, "MxNxK")
    from .. import ops

    a = _rand(m, k, dtype=dtype, dev=dev)
    ops.matmul(a, _rand(k, n, dtype=dtype, dev=dev))  # b row-major
    ops.matmul(a, _rand(n, k, dtype=dtype, dev=dev).t())  # an nn.Linear weight, in place


def _linear(shape, dtype, dev):
    m, n, k = _dims("linear", shape, 3, "MxNxK")
    from .. import ops

    ops.linear(_rand(m, k, dtype=dtype, dev=dev), _rand(n, k, dtype=dtype, dev=dev))


def _fp8_matmul(shape, dtype, dev):
    m, n, k = _dims("fp8_matmul", shape, 3, "MxNxK")
    from .. import ops

    a, sa = ops.quantize_fp8(torch.randn(m, k, device=dev), axis=1)
    b, sb = ops.quantize_fp8(torch.randn(n, k, device=dev).t(), axis=0)
    ops.fp8_matmul(a, b, sa, sb, out_dtype=dtype if dtype != torch.float32 else torch.bfloat16)


def _grouped_gemm(shape, dtype, dev):
    t, n, k, g = _dims("grouped_gemm", shape, 4, "TxNxKxG")
    from .. import ops

    sizes = torch.bincount(torch.randint(0, g, (t,), device=dev), minlength=g).to(torch.int32)
    ops.grouped_gemm(_rand(t, k, dtype=dtype, dev=dev), _rand(g, n, k, dtype=dtype, dev=dev), sizes)


def _fmha(shape, dtype, dev):
    b, s, h, d = _dims("fmha", shape, 4, "BATCHxSEQxHEADSxHEAD_DIM")
    from .. import ops

    q, k, v = (_rand(b, s, h, d, dtype=dtype, dev=dev) for _ in range(3))
    ops.fmha(q, k, v, causal=True)


def _fmha_decode(shape, dtype, dev):
    b, ctx, page = (*_dims("fmha_decode", shape, 3, "BATCHxCONTEXT[xPAGE_SIZE]", 1), 0)[:3]
    from .. import ops

    hq, hk, d = (32, 8, 128) if dev.type == "cuda" else (4, 2, 16)
    q = _rand(b, 1, hq, d, dtype=dtype, dev=dev)
    lens = torch.full((b,), ctx, dtype=torch.int32, device=dev)
    if page:
        pages = b * -(-ctx // page)
        k = _rand(pages, page, hk, d, dtype=dtype, dev=dev)
        table = torch.randperm(pages, device=dev).view(b, -1).to(torch.int32)
    else:
        k, table = _rand(b, ctx, hk, d, dtype=dtype, dev=dev), None
    ops.fmha_decode(q, k, torch.randn_like(k), lens, table)


def _cross_entropy(shape, dtype, dev):
    r, v = _dims("cross_entropy", shape, 2, "ROWSxVOCAB")
    from .. import ops

    ops.cross_entropy(_rand(r, v, dtype=dtype, dev=dev), torch.randint(0, v, (r,), device=dev))


#: The ops warm-up knows how to call, with their shape formats and default shapes (GPU sizes:
#: Llama-3-8B projections and norms; tiny ones are used through the CPU interpreter).
OPS: dict[str, OpRecipe] = {
    "rms_norm": OpRecipe("ROWSxHIDDEN", ((1, 4096), (2048, 4096)), _rms_norm),
    "layer_norm": OpRecipe("ROWSxHIDDEN", ((2048, 4096),), _layer_norm),
    "softmax": OpRecipe("ROWSxCOLS", ((2048, 4096),), _softmax),
    "silu_and_mul": OpRecipe("ROWSxINTERMEDIATE", ((1, 14336), (2048, 14336)), _silu_and_mul),
    "rope": OpRecipe("BATCHxSEQxHEADSxHEAD_DIM", ((1, 2048, 32, 128),), _rope),
    "matmul": OpRecipe(
        "MxNxK",
        ((2048, 4096, 4096), (2048, 6144, 4096), (2048, 28672, 4096), (2048, 4096, 14336)),
        _matmul,
    ),  # fmt: skip
    "linear": OpRecipe("MxNxK", ((1, 4096, 4096), (2048, 4096, 4096)), _linear),
    "fp8_matmul": OpRecipe("MxNxK", ((4096, 4096, 4096),), _fp8_matmul, gpu_only=True),
    "grouped_gemm": OpRecipe("TxNxKxG", ((16384, 28672, 4096, 8),), _grouped_gemm),
    "fmha": OpRecipe("BATCHxSEQxHEADSxHEAD_DIM", ((1, 2048, 32, 128),), _fmha),
    "fmha_decode": OpRecipe("BATCHxCONTEXT[xPAGE_SIZE]", ((1, 4096), (16, 4096)), _fmha_decode),
    "cross_entropy": OpRecipe("ROWSxVOCAB", ((2048, 128256),), _cross_entropy),
}


# ------------------------------------------------------------------------------ jobs


@dataclass(frozen=True)
class Job:
    """One unit of warm-up work, sent to a worker process (so: plain, picklable fields).

    ``kind`` "op": ``name`` is a catalog op, ``shape`` its shape. ``kind`` "llm": ``name`` is
    the model (a folder or ``random:<preset>``), ``shape`` (batch, prompt tokens), ``llm`` the
    LLM's keyword arguments (max_seq_len, paged, page_size, num_pages) as pairs.
    """

    kind: str
    name: str
    shape: tuple[int, ...]
    dtype: str
    llm: tuple[tuple[str, object], ...] = ()

    def label(self) -> str:
        """``rms_norm 2048x4096`` / ``prefill+decode 4x16`` for progress and reports."""
        dims = "x".join(map(str, self.shape))
        return f"{self.name} {dims}" if self.kind == "op" else f"batch x prompt {dims}"


@dataclass
class JobResult:
    """What one job did: its time in the worker, the tuner's picks by source (memo, disk,
    pretuned, measured, default), and an error when it failed."""

    job: Job
    seconds: float
    error: str = ""
    picks: dict[str, int] = field(default_factory=dict)
    pid: int = 0
    backends: list[str] = field(default_factory=list)  # "op:backend" of each catalog op run


@dataclass
class WarmupReport:
    """The outcome of :func:`warmup`."""

    results: list[JobResult]
    seconds: float
    workers: int
    interpret: bool
    triton_kernels: tuple[int, int]  # compiled kernels in Triton's cache, before and after
    tune_entries: tuple[int, int]  # remembered tuning choices on disk, before and after

    @property
    def ok(self) -> bool:
        """True when every job ran."""
        return all(not r.error for r in self.results)

    def picks(self) -> dict[str, int]:
        """Tuner picks over all jobs, by where the config came from."""
        total: dict[str, int] = {}
        for r in self.results:
            for k, v in r.picks.items():
                total[k] = total.get(k, 0) + v
        return total

    def summary(self) -> str:
        """A few lines for the terminal."""
        done = sum(1 for r in self.results if not r.error)
        t0, t1 = self.triton_kernels
        e0, e1 = self.tune_entries
        mode = "CPU interpreter: nothing to compile, each job ran through the interpreter" if (
            self.interpret) else f"Triton cache {config.triton_cache_dir()}"  # fmt: skip
        lines = [
            f"warmup: {done}/{len(self.results)} jobs in {self.seconds:.1f} s "
            f"({self.workers} worker process{'es' if self.workers != 1 else ''}); {mode}",
            f"  compiled kernels in the Triton cache: {t0} -> {t1} (+{t1 - t0}); "
            f"tuning entries on disk: {e0} -> {e1}",
            f"  tuner picks: {self.picks() or 'none'}",
        ]
        for r in self.results:
            status = f"FAILED: {r.error.splitlines()[-1]}" if r.error else "ok"
            ran = ", ".join(r.backends) if len(r.backends) <= 4 else f"{len(r.backends)} ops"
            lines.append(f"  {r.job.label():36s} {r.seconds:7.2f} s  {status}  ({ran})")
        return "\n".join(lines)


def op_jobs(ops: Sequence[str], shapes: Sequence[tuple[int, ...]] | None, dtype: str,
            on_gpu: bool) -> list[Job]:  # fmt: skip
    """Jobs for catalog ops at ``shapes`` (each op's default shapes when None). Ops that run
    only on a GPU are skipped without one."""
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        raise ArgumentError(f"warmup: unknown op(s) {', '.join(unknown)}; warm-up knows "
                            f"{', '.join(OPS)}")  # fmt: skip
    jobs = []
    for op in ops:
        recipe = OPS[op]
        if recipe.gpu_only and not on_gpu:
            continue
        for shape in shapes or recipe.default_shapes:
            jobs.append(Job("op", op, tuple(shape), dtype))
    return jobs


def model_jobs(model: str, shapes: Sequence[tuple[int, ...]] | None, dtype: str,
               **llm_kwargs) -> list[Job]:  # fmt: skip
    """Jobs for an LLM (a folder or ``random:<preset>``): one per (batch, prompt tokens) of
    ``shapes`` (default :data:`MODEL_SHAPES`), each running its prefill and first decode."""
    jobs = []
    extra = tuple(sorted((k, v) for k, v in llm_kwargs.items() if v is not None))
    for shape in shapes or MODEL_SHAPES:
        if len(shape) != 2 or min(shape) < 1:
            raise ArgumentError(f"warmup: model shapes are BATCHxPROMPT_TOKENS, got {shape}")
        jobs.append(Job("llm", str(model), tuple(shape), dtype, extra))
    return jobs


# ------------------------------------------------------------------------------ workers

_LLMS: dict[tuple, object] = {}  # per worker process: the model built for its jobs


def _init_worker(env: dict[str, str]) -> None:
    """Worker start-up: this warm-up's settings, then the catalog."""
    os.environ.update(env)
    config.reload()
    import kernforge  # noqa: F401  (registers the catalog)


def _worker_llm(job: Job):
    """The model for ``job``, built once per worker. A folder's weights are not read: the
    kernels depend on the shapes alone, so random weights of its config do (each worker reading
    the full weights would cost their size in memory and time)."""
    key = (job.name, job.dtype, job.llm)
    if key not in _LLMS:
        from ..llm import engine

        dtype = getattr(torch, job.dtype)
        kwargs = dict(job.llm)
        if job.name.startswith("random:"):
            _LLMS[key] = engine.LLM(job.name, dtype=dtype, progress=False, **kwargs)
        else:
            real = engine.load_weights
            engine.load_weights = lambda spec, cfg, dt, dev, progress=True: engine.random_weights(
                cfg, dt, dev
            )
            try:
                _LLMS[key] = engine.LLM(job.name, dtype=dtype, progress=False, **kwargs)
            finally:
                engine.load_weights = real
    return _LLMS[key]


def run_job(job: Job) -> JobResult:
    """Run one job in this process and report (a failure is reported, not raised)."""
    from .. import dispatch
    from . import tuner

    before = dict(tuner.stats)
    ran: dict[str, None] = {}
    select = dispatch.select

    def recording(name, args):  # which backend each op took, for the report
        impl = select(name, args)
        ran[f"{name}:{impl.backend}"] = None
        return impl

    dispatch.select = recording
    start = time.perf_counter()
    error = ""
    try:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = getattr(torch, job.dtype)
        if job.kind == "op":
            OPS[job.name].call(job.shape, dtype, dev)
        else:
            llm = _worker_llm(job)
            batch, tokens = job.shape
            prompts = [[(7 * r + i) % 97 + 1 for i in range(tokens)] for r in range(batch)]
            llm.generate(prompts, max_new_tokens=2, ignore_eos=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
    except Exception:  # noqa: BLE001  (reported per job; the other jobs go on)
        error = traceback.format_exc(limit=4)
    finally:
        dispatch.select = select
    picks = {k: v - before.get(k, 0) for k, v in tuner.stats.items() if v != before.get(k, 0)}
    return JobResult(job, time.perf_counter() - start, error, picks, os.getpid(), list(ran))


def _count_triton() -> int:
    folder = config.triton_cache_dir()
    if not folder.is_dir():
        return 0
    return sum(1 for d in folder.iterdir() if d.is_dir() and any(d.glob("__grp__*.json")))


def _count_tune() -> int:
    root = config.settings.cache_dir / "tune"
    return sum(1 for p in root.glob("*/*.json")) if root.is_dir() else 0


def default_jobs() -> int:
    """Worker processes when none are asked for: up to 4, and at most the CPU count (each
    worker holds a CUDA context and, for a model, its random weights)."""
    return max(1, min(4, os.cpu_count() or 1))


def warmup(
    jobs_list: Sequence[Job],
    workers: int | None = None,
    tune: bool = False,
    progress: bool = True,
) -> WarmupReport:
    """Run ``jobs_list`` (:func:`op_jobs`, :func:`model_jobs`) in ``workers`` spawned worker
    processes (default :func:`default_jobs`; 0 runs them in this process) with a progress bar,
    and report. ``tune``: measure configs not remembered nor shipped (one worker then)."""
    from .. import device

    workers = default_jobs() if workers is None else int(workers)
    if workers < 0:
        raise ArgumentError(f"warmup: jobs={workers}; use 0 (this process) or more")
    if tune and workers > 1:
        workers = 1  # timings need the GPU to themselves
    env = {"KERNFORGE_TUNE": "auto" if tune else "off"}
    # The workers must write where this process (and the ones after it) read.
    env["KERNFORGE_CACHE_DIR"] = str(config.settings.cache_dir)
    env["TRITON_CACHE_DIR"] = str(config.triton_cache_dir())
    triton_before, tune_before = _count_triton(), _count_tune()
    results: list[JobResult] = []
    start = time.perf_counter()
    bar = Progress(len(jobs_list), "warmup") if progress else None
    try:
        if workers == 0:
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            config.reload()
            try:
                for job in jobs_list:
                    results.append(run_job(job))
                    if bar:
                        bar.step(job.label())
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
                config.reload()
        else:
            ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked
            n = min(workers, max(1, len(jobs_list)))
            with cf.ProcessPoolExecutor(n, mp_context=ctx, initializer=_init_worker,
                                        initargs=(env,)) as pool:  # fmt: skip
                futures = {pool.submit(run_job, job): job for job in jobs_list}
                for fut in cf.as_completed(futures):
                    try:
                        res = fut.result()
                    except Exception as exc:  # noqa: BLE001  (a worker died: report the job)
                        res = JobResult(futures[fut], 0.0, f"worker failed: {exc!r}")
                    results.append(res)
                    if bar:
                        bar.step(res.job.label())
            workers = n
    finally:
        if bar:
            bar.__exit__()
    order = {job: i for i, job in enumerate(jobs_list)}
    results.sort(key=lambda r: order.get(r.job, 0))
    return WarmupReport(results, time.perf_counter() - start, workers, device.INTERPRET,
                        (triton_before, _count_triton()), (tune_before, _count_tune()))  # fmt: skip


def warmup_llm(llm, shapes: Sequence[tuple[int, int]] | None = None, workers: int | None = None,
               tune: bool = False, progress: bool = True) -> WarmupReport:  # fmt: skip
    """Warm up a loaded :class:`kernforge.llm.LLM`: compile its prefill and decode kernels for
    ``shapes`` (batch x prompt tokens, default :data:`MODEL_SHAPES` within its max_seq_len) in
    worker processes, then run one short request here, so that its first prefill and decode
    graphs are captured and the first real request starts at once."""
    limit = llm.max_seq_len - 2
    shapes = [s for s in (shapes or MODEL_SHAPES) if s[1] <= limit] or [(1, max(1, limit))]
    kwargs = dict(max_seq_len=llm.max_seq_len, paged=llm.paged or None,
                  page_size=llm.page_size if llm.paged else None,
                  num_pages=llm.num_pages)  # fmt: skip
    jobs = model_jobs(llm.name, shapes, str(llm.dtype).removeprefix("torch."), **kwargs)
    report = warmup(jobs, workers, tune, progress)
    first = shapes[0]
    llm.generate([[1] * first[1]] * first[0], max_new_tokens=2, ignore_eos=True)
    return report
