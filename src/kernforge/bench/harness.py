"""Timing, roofline and result files for benchmarks.

Every case races kernforge against the references a user would pick instead (torch eager and
``torch.compile`` of the same computation), all measured in the same run, on random inputs.
On a GPU, times are medians of event-timed runs (``triton.testing.do_bench``, L2 flushed
between runs); bandwidth is compared with this GPU's own device-to-device copy rate, measured
by :func:`copy_bandwidth` in the same run. Without a GPU the same cases run small through
Triton's interpreter, to check correctness only: those times are not performance.
"""

from __future__ import annotations

import datetime
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import config, device
from ..fileio import write_atomic
from ..progress import Progress

#: Reference implementations raced in every case, in report order.
REFERENCES = ("torch", "torch.compile")


def time_fn(fn: Callable[[], object], on_gpu: bool, rep_ms: int = 200) -> float:
    """Median milliseconds of one call of ``fn``: CUDA-event timed on the GPU, else wall clock."""
    if on_gpu:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=50, rep=rep_ms, return_mode="median"))
    return _wall_ms(fn)


def time_graph(fn: Callable[[], object], stream: torch.cuda.Stream, rep_ms: int = 200) -> float:
    """Median milliseconds of ``fn``'s GPU work: ``fn`` captured once in a CUDA graph on
    ``stream``, whose replays are event-timed. Host time per call (Python, dispatch, launch)
    is left out, so every implementation is measured on its kernels alone."""
    with torch.cuda.stream(stream):
        fn()  # warm-up on the capture stream: compilation, autotuning, allocator
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        fn()
    torch.cuda.synchronize()
    return time_fn(graph.replay, True, rep_ms)


def _wall_ms(fn: Callable[[], object]) -> float:
    fn()  # warm-up: first-call tracing and caches stay out of the figure
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(on_gpu: bool, nbytes: int = 1 << 30) -> float:
    """This device's copy bandwidth in TB/s (bytes read plus bytes written, per second)."""
    if not on_gpu:
        nbytes = 1 << 24
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda" if on_gpu else "cpu")
    src.uniform_()
    dst = torch.empty_like(src)
    ms = time_fn(lambda: dst.copy_(src), on_gpu)
    return 2 * nbytes / (ms * 1e-3) / 1e12


@dataclass
class Case:
    """One benchmark: an op at one shape, dtype and direction.

    ``make()`` builds fresh random inputs and returns ``{impl name: zero-argument callable}``
    for "kernforge" and each reference it races (:data:`REFERENCES` for memory-bound ops), and
    a ``check`` callable returning kernforge's relative error against a float32-or-better reference.
    """

    family: str
    op: str
    direction: str  # "fwd" | "bwd"
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int  # fewest bytes the computation must move (inputs read once, outputs written once)
    make: Callable[[], tuple[dict[str, Callable[[], object]], Callable[[], float]]]
    target_tbs: float | None = None  # the bar for kernforge, in TB/s
    flops: int = 0  # floating-point operations of one call (compute-bound cases report TFLOP/s)
    #: The issue's bar as speed-ups: {reference name: least kernforge speed-up over it}.
    target_vs: dict[str, float] | None = None

    @property
    def label(self) -> str:
        dims = "x".join(str(d) for d in self.shape)
        return f"{self.op} {self.direction} [{dims}] {str(self.dtype).replace('torch.', '')}"


@dataclass
class Result:
    """Measured figures of one case."""

    family: str
    op: str
    direction: str
    shape: list[int]
    dtype: str
    bytes: int
    ms: dict[str, float] = field(default_factory=dict)
    tbs: dict[str, float] = field(default_factory=dict)
    rel_err: float = math.nan
    frac_of_copy: float = math.nan
    vs: dict[str, float] = field(default_factory=dict)  # kernforge speed-up over each reference
    target_tbs: float | None = None
    flops: int = 0
    tflops: dict[str, float] = field(default_factory=dict)
    target_vs: dict[str, float] | None = None
    meets_target: bool | None = None
    timing: str = ""  # how the times were taken
    error: str = ""


def run_case(case: Case, on_gpu: bool, copy_tbs: float, with_compile: bool) -> Result:
    """Time one case's implementations and compare them."""
    dtype = str(case.dtype).replace("torch.", "")
    res = Result(case.family, case.op, case.direction, list(case.shape), dtype, case.nbytes,
                 target_tbs=case.target_tbs, flops=case.flops,
                 target_vs=case.target_vs)  # fmt: skip
    try:
        if on_gpu:
            # Inputs and the forward that a backward case differentiates run on the stream the
            # graphs are captured on, so autograd's backward kernels are captured too.
            stream = torch.cuda.Stream()
            with torch.cuda.stream(stream):
                impls, check = case.make()
            torch.cuda.synchronize()
        else:
            impls, check = case.make()
        res.rel_err = float(check())
        timed = {n: f for n, f in impls.items() if with_compile or n != "torch.compile"}
        try:
            res.ms = {n: time_graph(f, stream) if on_gpu else _wall_ms(f) for n, f in timed.items()}
            res.timing = "cuda-graph replay" if on_gpu else "wall clock"
        except RuntimeError as exc:  # not capturable: time every implementation with events
            res.timing = f"events (graph capture failed: {str(exc)[:80]})"
            res.ms = {n: time_fn(f, on_gpu) for n, f in timed.items()}
        res.tbs = {n: case.nbytes / (ms * 1e-3) / 1e12 for n, ms in res.ms.items()}
        if case.flops:
            res.tflops = {n: case.flops / (ms * 1e-3) / 1e12 for n, ms in res.ms.items()}
    except Exception as exc:  # a failing case is reported, not fatal to the whole run
        res.error = f"{type(exc).__name__}: {exc}"[:500]
        return res
    finally:
        if on_gpu:
            torch.cuda.empty_cache()
    kf_ms = res.ms.get("kernforge")
    if kf_ms:
        res.frac_of_copy = res.tbs["kernforge"] / copy_tbs
        res.vs = {name: ms / kf_ms for name, ms in res.ms.items() if name != "kernforge"}
        if on_gpu and (case.target_tbs is not None or case.target_vs):
            res.meets_target = _meets(res)
    return res


def _meets(r: Result) -> bool:
    """A bandwidth bar (with >= 1.0x torch.compile, where it was raced) and each speed-up bar."""
    ok = True
    if r.target_tbs is not None:
        ok = r.tbs["kernforge"] >= r.target_tbs and r.vs.get("torch.compile", 1.0) >= 1.0
    return ok and all(r.vs.get(ref, 0.0) >= least for ref, least in (r.target_vs or {}).items())


@dataclass
class Bar:
    """A family-level bar over several results (a geometric mean of speed-ups, say)."""

    name: str
    value: float
    target: float
    unit: str = "x"

    @property
    def met(self) -> bool:
        return self.value >= self.target


def geomean(values: list[float]) -> float:
    """Geometric mean (NaN for no values)."""
    if not values:
        return math.nan
    return math.exp(sum(math.log(v) for v in values) / len(values))


def run_cases(cases: list[Case], on_gpu: bool | None = None, with_compile: bool | None = None,
              copy_tbs: float | None = None) -> tuple[list[Result], float]:  # fmt: skip
    """Run ``cases`` with a progress bar; returns the results and the copy bandwidth (TB/s)."""
    on_gpu = device.cuda_available() if on_gpu is None else on_gpu
    with_compile = on_gpu if with_compile is None else with_compile
    copy_tbs = copy_bandwidth(on_gpu) if copy_tbs is None else copy_tbs
    results = []
    with Progress(len(cases), "bench") as bar:
        for case in cases:
            results.append(run_case(case, on_gpu, copy_tbs, with_compile))
            bar.step(case.label)
    return results, copy_tbs


def host_us_per_call(on_gpu: bool, calls: int = 300) -> dict[str, float]:
    """Host time of one op call (µs) on a tiny input, forward and forward+backward.

    When a kernel's GPU time is below this, event timings measure the host, not the kernel;
    recorded with every result so that such figures can be told apart.
    """
    from .. import ops
    from ..dispatch import backend

    dev = "cuda" if on_gpu else "cpu"
    x = torch.randn(8, 128, device=dev, requires_grad=True)
    w = torch.randn(128, device=dev, requires_grad=True)

    def per_call(fn) -> float:
        fn()
        if on_gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        if on_gpu:
            torch.cuda.synchronize()
        return round((time.perf_counter() - t0) / calls * 1e6, 1)

    with backend("triton"):
        fwd = per_call(lambda: ops.rms_norm(x, w))
        both = per_call(lambda: torch.autograd.grad(ops.rms_norm(x, w).sum(), [x, w]))
    return {"rms_norm_fwd": fwd, "rms_norm_fwd_bwd": both}


def environment(copy_tbs: float, on_gpu: bool) -> dict:
    """Device, versions and settings recorded with every result file."""
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": device.describe(),
        "settings": config.settings.describe(),
        "copy_tbs": round(copy_tbs, 4),
        "host_us_per_op_call": host_us_per_call(on_gpu) if on_gpu else {},
        "timing": "median of CUDA-event timed replays of a CUDA graph of one call "
        "(triton.testing.do_bench, L2 flushed): kernel time without host overhead"
        if on_gpu
        else "CPU wall clock through Triton's interpreter: NOT performance figures",
    }


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}g}"


#: At or above this fraction of the copy bandwidth, a kernel is at the memory roofline: a
#: reference within TIE_RATIO of it there is a tie within measurement noise, not a loss.
ROOFLINE_FRAC = 0.97
TIE_RATIO = 0.98


def verdict(r: Result) -> str:
    """The bar's verdict for one result: met, a tie at the roofline, or MISSED by how much."""
    if r.meets_target is None:
        return "-"
    if r.target_vs:
        vs = {ref: r.vs.get(ref, 0.0) for ref in r.target_vs}
        short = [f"{vs[ref]:.3f}x {ref} < {least}x"
                 for ref, least in r.target_vs.items() if not vs[ref] >= least]  # fmt: skip
        if r.target_tbs is None or short:
            return "met" if not short else "MISSED: " + ", ".join(short)
    kf = r.tbs["kernforge"]
    vs = r.vs.get("torch.compile", 1.0)
    if kf >= r.target_tbs and vs >= 1.0:
        return "met"
    if kf >= r.target_tbs and r.frac_of_copy >= ROOFLINE_FRAC and vs >= TIE_RATIO:
        return f"tie: both at the copy roofline ({vs:.3f}x compile)"
    short = []
    if kf < r.target_tbs:
        short.append(f"{r.target_tbs - kf:.2f} TB/s under {r.target_tbs}")
    if vs < 1.0:
        short.append(f"{vs:.3f}x compile")
    return "MISSED: " + ", ".join(short)


def implementations(results: list[Result]) -> list[str]:
    """kernforge, then every reference raced in ``results``, in the order first seen."""
    names = ["kernforge"]
    for r in results:
        names += [n for n in r.ms if n not in names]
    return names


def _rate(r: Result) -> tuple[dict[str, float], str]:
    """The figure a result is judged by: TFLOP/s for compute-bound cases, else TB/s."""
    return (r.tflops, "TFLOP/s") if r.flops else (r.tbs, "TB/s")


def table(results: list[Result], on_gpu: bool) -> str:
    """A Markdown table of results: each implementation's TB/s (TFLOP/s for compute-bound
    cases), kernforge's fraction of the copy bandwidth, and its speed-up over each reference."""
    names = implementations(results)
    refs = names[1:]
    unit = "TFLOP/s" if results and all(r.flops for r in results) else "TB/s"
    if not on_gpu:
        unit += " (CPU, not performance)"
    copy_col = not all(r.flops for r in results)
    head = ["case", *(f"{n} {unit}" for n in names), *(["% copy"] if copy_col else []),
            *(f"x {n}" for n in refs), "rel err", "verdict"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    scale = 1.0 if on_gpu else 1e3
    for r in results:
        dims = "x".join(map(str, r.shape))
        name = f"{r.op} {r.direction} [{dims}] {r.dtype}"
        if r.error:
            lines.append(f"| {name} | error: {r.error} |" + " |" * (len(head) - 2))
            continue
        rate, _ = _rate(r)
        cells = [name, *(_fmt(rate[n] * scale) if n in rate else "-" for n in names)]
        if copy_col:
            cells.append(_fmt(100 * r.frac_of_copy))
        cells += [_fmt(r.vs.get(n)) for n in refs]
        cells += [_fmt(r.rel_err, 2), verdict(r)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bars_table(bars: list[Bar]) -> str:
    """A Markdown table of family-level bars."""
    lines = ["| bar | measured | target | verdict |", "|---|---|---|---|"]
    for b in bars:
        cells = (b.name, f"{_fmt(b.value)}{b.unit}", f"{_fmt(b.target)}{b.unit}",
                 "met" if b.met else "MISSED")  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load_results(path: Path) -> tuple[str, list[Result], dict]:
    """Read a ``<family>.json`` written by :func:`write_results`: (family, results, env)."""
    data = json.loads(Path(path).read_text())
    return data["family"], [Result(**r) for r in data["results"]], data["environment"]


def write_results(family: str, results: list[Result], env: dict, out_dir: Path,
                  notes: str = "", bars: list[Bar] | None = None) -> list[Path]:  # fmt: skip
    """Write ``<family>.json``, ``<family>.md`` and (with matplotlib) ``<family>.png``;
    ``bars`` are the family-level bars, computed from ``results``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    on_gpu = env["device"].get("gpu", "none") != "none"
    bars = bars or []
    payload = {"family": family, "environment": env, "notes": notes,
               "bars": [{**asdict(b), "met": b.met} for b in bars],
               "results": [asdict(r) for r in results]}  # fmt: skip
    paths = [out_dir / f"{family}.json", out_dir / f"{family}.md"]
    write_atomic(paths[0], json.dumps(payload, indent=1) + "\n")
    dev = env["device"]
    md = [
        f"# {family} benchmark",
        "",
        f"{env['date']} on {dev.get('gpu')} ({dev.get('arch')}), torch {dev['torch']}, "
        f"triton {dev['triton']}. Copy bandwidth measured in this run: {env['copy_tbs']:.3g} TB/s.",
        f"Timing: {env['timing']}.",
        f"Host time per op call (tiny input; µs): {env['host_us_per_op_call'] or 'n/a'}.",
        "Verdict: a case's bar is a kernforge bandwidth (TB/s, with >= 1.0x torch.compile) "
        "and/or least speed-ups over named references; a 'tie' is >= "
        f"{ROOFLINE_FRAC:.0%} of the copy bandwidth and within {1 - TIE_RATIO:.0%} of "
        "torch.compile, where both sit at the roofline.",
        "",
        table(results, on_gpu),
        "",
    ]
    if bars:
        md += ["## Family bars", "", bars_table(bars), ""]
    if notes:
        md += ["## Notes", "", notes, ""]
    write_atomic(paths[1], "\n".join(md))
    png = plot(family, results, env, out_dir / f"{family}.png")
    if png is not None:
        paths.append(png)
    return paths


def plot(family: str, results: list[Result], env: dict, path: Path) -> Path | None:
    """Bar plot of achieved bandwidth per case and implementation, with the copy roofline."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ok = [r for r in results if not r.error]
    if not ok:
        return None
    names = implementations(ok)
    unit = "TFLOP/s" if all(r.flops for r in ok) else "TB/s"
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(ok) + 2), 4.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [j + i * width for j in range(len(ok))]
        ax.bar(xs, [_rate(r)[0].get(name, 0.0) for r in ok], width, label=name)
    if unit == "TB/s":
        ax.axhline(env["copy_tbs"], color="k", linestyle="--", linewidth=1,
                   label=f"copy roofline {env['copy_tbs']:.2f} TB/s")  # fmt: skip
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(ok))])
    ax.set_xticklabels([f"{r.op} {r.direction}\n{'x'.join(map(str, r.shape))}" for r in ok],
                       fontsize=7, rotation=20, ha="right")  # fmt: skip
    ax.set_ylabel(f"achieved {unit}")
    ax.set_title(f"kernforge {family} on {env['device'].get('gpu')}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
