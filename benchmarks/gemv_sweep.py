"""GEMV tuning sweep on the GPU (one device call): correctness of every variant, then every
launch config x K split at the bar's shapes, against cuBLAS (F.linear) in the same run.

Run from the repo root: ``PYTHONPATH=src python3 benchmarks/gemv_sweep.py``. Writes
``$OUT/gemv_sweep.json`` (every measurement) and prints the best per shape last.

Timing: each measurement is one CUDA graph of C calls over C copies of the weight (C such that
the copies pass 300 MB, six times the 50 MB L2, so every call reads W from HBM), replayed and
event-timed; the median of the replays over C is one call's time.
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from kernforge.kernels import linear as L

OUT = os.environ.get("OUT", "/tmp")
SHAPES = [(14336, 4096), (4096, 14336), (151936, 1536), (4096, 4096)]
MS = [1, 4, 16]
SPLITS = [1] if os.environ.get("SWEEP_LITE") else [1, 2, 3, 4, 6, 8, 12]
BUDGET_S = float(os.environ.get("SWEEP_BUDGET_S", "200"))
T0 = time.time()


def log(*a):
    print(*a, flush=True)


def rel(out, ref):
    return float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def correctness() -> list[str]:
    """Every config family, forced splits, tails, bias, both dtypes against fp32 matmul."""
    fails = []
    cfgs = [L.GemvConfig(r, u, wn, wk, h, p) for r, u, wn, wk, h, p in
            [(1, 4, 4, 1, 1, 0), (2, 2, 4, 1, 1, 0), (2, 4, 1, 8, 0, 1), (2, 8, 2, 2, 2, 1),
             (1, 8, 1, 4, 1, 1), (1, 2, 2, 4, 1, 0)]]  # fmt: skip
    shapes = [(1, 1, 8), (3, 17, 264), (16, 1000, 4104), (9, 257, 4096), (5, 4096, 1536),
              (16, 33, 14336), (8, 1, 4104)]  # fmt: skip
    for dtype in (torch.bfloat16, torch.float16):
        for (m, n, k), cfg in itertools.product(shapes, cfgs):
            for splits in sorted({1, 3, L.plan(m, n, k, 132, cfg).splits}):
                for has_bias in (False, True):
                    x = torch.randn(m, k, device="cuda").to(dtype)
                    w = (torch.randn(n, k, device="cuda") / k**0.5).to(dtype)
                    b = torch.randn(n, device="cuda").to(dtype) if has_bias else None
                    ref = x.float() @ w.float().t() + (0 if b is None else b.float())
                    out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
                    p = L.plan(m, n, k, 132, cfg, splits=splits)
                    L.gemv(x, w, b, out, p)
                    out2 = torch.full_like(out, float("nan"))
                    L.gemv(x, w, b, out2, p)
                    torch.cuda.synchronize()
                    e = rel(out, ref)
                    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
                    bad = not torch.isfinite(out).all() or e > tol or not torch.equal(out, out2)
                    if bad:
                        fails.append(f"{dtype} {(m, n, k)} {cfg} S={p.splits} bias={has_bias} "
                                     f"err={e:.3g} same={torch.equal(out, out2)}")  # fmt: skip
    log(f"correctness: {len(fails)} failures")
    for f in fails[:20]:
        log("  FAIL", f)
    return fails


def graph_ms(calls, reps=15) -> float:
    """Median ms of one replay of a graph of ``calls``."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in calls:
            c()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=s):
        for c in calls:
            c()
    torch.cuda.synchronize()
    for _ in range(3):
        g.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    del g
    return statistics.median(times)


def configs():
    if os.environ.get("SWEEP_LITE"):  # the robust configs of the full sweep, to re-measure
        picks = [(1, 4, 1, 8), (2, 2, 1, 8), (1, 8, 1, 8), (2, 8, 1, 8), (1, 2, 1, 8)]
        return [L.GemvConfig(r, u, wn, wk) for r, u, wn, wk in picks]
    out = []
    shapes = [(1, 1), (2, 1), (4, 1), (1, 2), (1, 4), (1, 8), (2, 2), (2, 4), (4, 2)]
    for r, u, (wn, wk) in itertools.product((1, 2), (2, 4, 8), shapes):
        out.append(L.GemvConfig(r, u, wn, wk, 1, 0))
    for r, u, (wn, wk) in itertools.product((2,), (2,), [(4, 1), (2, 2), (1, 4)]):
        out.append(L.GemvConfig(r, u, wn, wk, 1, 1))
    for r, u, (wn, wk) in itertools.product((1,), (4,), [(4, 1), (2, 2), (1, 4)]):
        out.append(L.GemvConfig(r, u, wn, wk, 1, 1))
    return out


def empty_launch_us() -> float:
    """Time per launch of an empty kernel in a CUDA graph of 50 launches (132 x 128 threads)."""
    from kernforge import cuda as kcuda

    k = kcuda.compile('extern "C" __global__ void kf_empty(int n) {}', "kf_empty")
    return graph_ms([lambda: k.launch(0, grid=132, block=128)] * 50) / 50 * 1e3


def main() -> int:
    torch.manual_seed(0)
    fails = correctness()
    results = {"fails": fails, "cases": [], "empty_launch_us": empty_launch_us()}
    log(f"empty kernel in a graph: {results['empty_launch_us']:.2f} us per launch")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cfgs = configs()
    attrs = {}
    for cfg in cfgs:
        for mt in (8, 16):
            a = L.gemv_kernel(torch.bfloat16, mt, cfg).attributes()
            attrs[f"{cfg}/{mt}"] = a
            if a["local_size_bytes"]:
                log("SPILL", cfg, mt, a)
    results["attrs"] = attrs
    summary = []
    for (n, k), m in itertools.product(SHAPES, MS):
        wbytes = n * k * 2
        copies = max(1, -(-300_000_000 // wbytes))
        ws = [(torch.randn(n, k, device="cuda") / k**0.5).to(torch.bfloat16) for _ in range(copies)]
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        outs = [torch.empty(m, n, device="cuda", dtype=torch.bfloat16) for _ in ws]
        t_ref = graph_ms([lambda w=w, x=x: F.linear(x, w) for w in ws]) / copies
        case = {
            "m": m,
            "n": n,
            "k": k,
            "copies": copies,
            "cublas_ms": t_ref,
            "cublas_tbs": wbytes / t_ref / 1e9,
            "runs": [],
        }
        log(
            f"\n[{m}x{n}x{k}] cublas {t_ref * 1e3:.1f} us {case['cublas_tbs']:.2f} TB/s "
            f"({time.time() - T0:.0f}s)"
        )
        over = time.time() - T0 > BUDGET_S
        todo = []
        for cfg in cfgs if not over else [L.DEFAULT]:
            seen = set()
            for s in SPLITS + [L.plan(m, n, k, sms, cfg).splits]:
                p = L.plan(m, n, k, sms, cfg, splits=s)
                if p.splits in seen or (p.splits > 1 and p.kchunk < 128 * cfg.wk):
                    continue
                seen.add(p.splits)
                todo.append(p)
        for p in todo:
            calls = [
                lambda w=w, o=o, p=p, x=x: L.gemv(x, w, None, o, p)
                for w, o in zip(ws, outs, strict=True)
            ]
            t = graph_ms(calls) / copies
            case["runs"].append({"cfg": list(vars(p.config).values()), "splits": p.splits,
                                 "ms": t, "tbs": wbytes / t / 1e9})  # fmt: skip
        top = sorted(case["runs"], key=lambda r: r["ms"])
        pick = L.plan(m, n, k, sms)
        pick_runs = [r for r in case["runs"] if r["cfg"] == list(vars(pick.config).values())
                     and r["splits"] == pick.splits]  # fmt: skip
        for r in top[:6]:
            log(
                f"  {r['cfg']} S={r['splits']}: {r['ms'] * 1e3:.1f} us {r['tbs']:.2f} TB/s "
                f"x{t_ref / r['ms']:.2f}"
            )
        if pick_runs:
            pr = pick_runs[0]
            log(
                f"  plan pick {pr['cfg']} S={pr['splits']}: {pr['tbs']:.2f} TB/s "
                f"x{t_ref / pr['ms']:.2f}"
            )
        summary.append((m, n, k, case["cublas_tbs"], top[0]["tbs"], t_ref / top[0]["ms"],
                        top[0]["cfg"], top[0]["splits"]))  # fmt: skip
        results["cases"].append(case)
        del ws, outs
        torch.cuda.empty_cache()
        with open(os.path.join(OUT, "gemv_sweep.json"), "w") as f:
            json.dump(results, f)
    log("\n| M | N | K | cuBLAS TB/s | best TB/s | x cuBLAS | cfg | S |")
    for row in summary:
        m, n, k, c, b, ratio, cfg, s = row
        log(f"| {m} | {n} | {k} | {c:.2f} | {b:.2f} | {ratio:.2f} | {cfg} | {s} |")
    log(f"total {time.time() - T0:.0f}s, correctness failures: {len(fails)}")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
