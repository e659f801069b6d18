"""Final GEMV check on the GPU (one device call): (A) the same graphs timed back to back and
by the harness's method (triton do_bench: L2 flushed before each replay), for cuBLAS and
kernforge; (B) a few configs per mma tile height timed by the harness's method at the bar's
shapes, best kept; (C) the official ``gemv`` bench with the chosen configs, results to $OUT.

    PYTHONPATH=src python3 benchmarks/gemv_final.py
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton.testing

from kernforge import ops
from kernforge.bench import cases_for, run_cases, write_results
from kernforge.bench.harness import environment, table
from kernforge.bench.suites import GEMV_MS, GEMV_ROTATE_BYTES, GEMV_SHAPES, NOTES
from kernforge.kernels import linear as L

OUT = Path(os.environ.get("OUT", "/tmp"))
T0 = time.time()
LOG = []


def log(*a):
    line = " ".join(str(x) for x in a)
    LOG.append(line)
    print(line, flush=True)


def graph_of(calls):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in calls:
            c()
        for c in calls:
            c()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=s):
        for c in calls:
            c()
    torch.cuda.synchronize()
    return g


def back_to_back_ms(g, reps=20):
    for _ in range(3):
        g.replay()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def harness_ms(g):
    return triton.testing.do_bench(g.replay, warmup=25, rep=100, return_mode="median")


def weights(n, k):
    copies = max(2, -(-GEMV_ROTATE_BYTES // (n * k * 2)))
    return [(torch.randn(n, k, device="cuda") * k**-0.5).to(torch.bfloat16) for _ in range(copies)]


def diagnose():
    rows = []
    for m, n, k in [(1, 14336, 4096), (16, 151936, 1536), (16, 4096, 14336)]:
        ws = weights(n, k)
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        gb = n * k * 2 / 1e9
        impls = {
            "cublas": [lambda w=w, x=x: F.linear(x, w) for w in ws],
            "ops.linear": [lambda w=w, x=x: ops.linear(x, w) for w in ws],
        }
        outs = [torch.empty(m, n, device="cuda", dtype=torch.bfloat16) for _ in ws]
        p = L.plan(m, n, k, 132)
        impls["gemv direct"] = [
            lambda w=w, o=o, x=x, p=p: L.gemv(x, w, None, o, p)
            for w, o in zip(ws, outs, strict=True)
        ]
        for name, calls in impls.items():
            g = graph_of(calls)
            t1 = back_to_back_ms(g) / len(ws)
            t2 = harness_ms(g) / len(ws)
            t3 = back_to_back_ms(g) / len(ws)
            rows.append((m, n, k, name, gb / t1, gb / t2, gb / t3))
            log(f"A {m}x{n}x{k} {name:12s} back-to-back {gb / t1:.2f} / do_bench {gb / t2:.2f} "
                f"/ back-to-back {gb / t3:.2f} TB/s")  # fmt: skip
        del ws
        torch.cuda.empty_cache()
    return rows


CANDIDATES = [(1, 4, 1, 8), (1, 2, 1, 8), (2, 2, 1, 8), (2, 4, 1, 8), (1, 8, 1, 8), (2, 8, 1, 8),
              (4, 2, 1, 8), (4, 4, 1, 8), (2, 4, 1, 4)]  # fmt: skip


def choose():
    """Per tile height, the candidate with the best mean do_bench rate over the bar's shapes."""
    score = {8: {}, 16: {}}
    for n, k in GEMV_SHAPES:
        ws = weights(n, k)
        gb = n * k * 2 / 1e9
        for m in GEMV_MS:
            mt = 8 if m <= 8 else 16
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            outs = [torch.empty(m, n, device="cuda", dtype=torch.bfloat16) for _ in ws]
            line = []
            for c in CANDIDATES:
                cfg = L.GemvConfig(*c)
                p = L.plan(m, n, k, 132, cfg)
                calls = [lambda w=w, o=o, p=p, x=x: L.gemv(x, w, None, o, p)
                         for w, o in zip(ws, outs, strict=True)]  # fmt: skip
                tbs = gb / (harness_ms(graph_of(calls)) / len(ws))
                score[mt].setdefault(c, []).append(tbs)
                line.append(f"{''.join(map(str, c))}:{tbs:.2f}")
            log(f"B {m}x{n}x{k} " + " ".join(line))
        del ws
        torch.cuda.empty_cache()
    picks = {}
    for mt, by in score.items():
        best = max(by, key=lambda c: sum(by[c]) / len(by[c]))
        picks[mt] = best
        log(f"B pick mt={mt}: {best} mean {sum(by[best]) / len(by[best]):.3f} TB/s "
            f"(default {sum(by[CANDIDATES[0]]) / len(by[CANDIDATES[0]]):.3f})")  # fmt: skip
    return picks, {mt: {"".join(map(str, c)): v for c, v in by.items()} for mt, by in score.items()}


def main():
    result = {"diagnose": diagnose()}
    log(f"({time.time() - T0:.0f}s)")
    picks, scores = choose()
    result.update(picks={str(k): v for k, v in picks.items()}, scores=scores)
    log(f"({time.time() - T0:.0f}s)")
    for mt, c in picks.items():
        L.DEFAULTS[mt] = L.GemvConfig(*c)
    cases = cases_for(["gemv"], on_gpu=True, with_compile=True)
    results, copy_tbs = run_cases(cases, on_gpu=True)
    env = environment(copy_tbs, on_gpu=True)
    env["gemv_configs"] = {str(mt): str(c) for mt, c in L.DEFAULTS.items()}
    write_results("gemv", results, env, OUT, NOTES.get("gemv", ""))
    log(table(results, True))
    log(f"copy {copy_tbs:.3f} TB/s; total {time.time() - T0:.0f}s")
    (OUT / "final.json").write_text(json.dumps(result, indent=1))
    (OUT / "final.log").write_text("\n".join(LOG) + "\n")


if __name__ == "__main__":
    main()
