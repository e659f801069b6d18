"""Sweep the GEMM kernels' launch configs on a GPU at the issue's bar shapes, against cuBLAS.

    PYTHONPATH=src python3 benchmarks/sweep_matmul.py --out sweep.json [--extra] [--epilogue]

For each shape (4096^3 and 8192^3 with b [K, N] row-major; the 16 Llama-3-8B projections with
the weight [N, K] passed as w.t()), every candidate of the shape's class (kernels/matmul.py:
TMA_LARGE or TMA_SMALL; ``--extra`` adds exploratory configs) is timed with
triton.testing.do_bench (median, L2 flushed), next to torch.matmul (cuBLAS) on the same
buffers. Every config's output is checked against cuBLAS's. Kernels are compiled first in a
pool of worker processes (Triton's on-disk cache then serves the timing process), since
compiling ~50 variants one after another would take minutes. Prints a table of the best config
per shape and the geometric means; writes every timing to ``--out``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import json
import math
import multiprocessing as mp
import os
import sys
import time

import torch

SQUARE = [4096, 8192]
LLAMA_M = [128, 512, 2048, 8192]
LLAMA_NK = [(4096, 4096), (6144, 4096), (28672, 4096), (4096, 14336)]


def shapes() -> list[tuple[str, int, int, int, bool]]:
    """(label, M, N, K, weight layout)."""
    out = [(f"sq{s}", s, s, s, False) for s in SQUARE]
    out += [(f"llama{m}x{n}x{k}", m, n, k, True) for m in LLAMA_M for n, k in LLAMA_NK]
    return out


def extra_configs(mm, cls: str) -> list:
    """Exploratory configs beyond the shipped candidates (``--extra``)."""
    c = mm._c
    if cls == "large":
        return [
            c(128, 256, 64, 8, 3, ws=True, st=True, g=4),
            c(256, 128, 64, 8, 3, ws=True, st=True),
            c(128, 256, 64, 8, 3, fl=True, st=True, g=4),
            c(128, 256, 64, 8, 3, st=True, g=16),
            c(128, 128, 64, 8, 4, st=True),
        ]
    return [
        c(64, 64, 128, 4, 8),
        c(64, 64, 64, 4, 8, sk=2),
        c(64, 128, 128, 4, 4, sk=2),
        c(128, 128, 64, 8, 6, sk=4),
        c(128, 64, 128, 4, 4, sk=2),
        c(64, 256, 64, 4, 4, sk=2),
    ]


def _tensors(m, n, k, weight, dtype, dev="cuda"):
    a = torch.randn(m, k, device=dev).to(dtype)
    if weight:
        b = (torch.randn(n, k, device=dev) * k**-0.5).to(dtype).t()
    else:
        b = (torch.randn(k, n, device=dev) * k**-0.5).to(dtype)
    return a, b


def _compile_one(job: tuple[dict, bool, bool]) -> str:
    """Worker: compile one (config, layout, epilogue) variant by launching it at 256^3 (the
    same divisibility specialization as the bar shapes)."""
    fields, weight, epilogue = job
    from kernforge.kernels import matmul as mm

    cfg = mm.MatmulConfig(**fields)
    try:
        a, b = _tensors(256, 256, 256, weight, torch.bfloat16)
        out = torch.empty(256, 256, device="cuda", dtype=torch.bfloat16)
        bias = torch.randn(256, device="cuda").to(torch.bfloat16) if epilogue else None
        mm.launch(a, b, out, bias, None, "gelu" if epilogue else None, config=cfg, kernel="tma")
        torch.cuda.synchronize()
        return ""
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"[:300]


_STREAM: dict[str, torch.cuda.Stream] = {}


def _graph(fn) -> torch.cuda.CUDAGraph:
    """``fn`` captured in a CUDA graph (after a warm-up on the capture stream): replays time
    the GPU work alone, without the launch's host time."""
    stream = _STREAM.setdefault("s", torch.cuda.Stream())
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    return graph


def host_overhead(mm) -> dict:
    """Host µs per eager call (M=128, N=K=4096): ops.matmul, launch() alone, torch.matmul."""
    from kernforge import ops

    a, b = _tensors(128, 4096, 4096, True, torch.bfloat16)
    out = torch.empty(128, 4096, device="cuda", dtype=torch.bfloat16)
    cfg = mm.DEFAULTS[("tma", "small")]
    fns = {
        "ops.matmul": lambda: ops.matmul(a, b),
        "launch(config)": lambda: mm.launch(a, b, out, config=cfg, kernel="tma"),
        "torch.matmul": lambda: torch.matmul(a, b),
    }
    res = {}
    for name, fn in fns.items():
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(200):
            fn()
        torch.cuda.synchronize()
        res[name] = round((time.perf_counter() - t0) / 200 * 1e6, 1)
    return res


def time_shape(mm, label, m, n, k, weight, cls, cfgs, rep, epilogue) -> dict:
    """Time cuBLAS and every config at one shape; check each config's output."""
    import triton.testing

    dtype = torch.bfloat16
    a, b = _tensors(m, n, k, weight, dtype)
    out = torch.empty(m, n, device="cuda", dtype=dtype)
    bias = torch.randn(n, device="cuda").to(dtype)
    ref = torch.matmul(a, b).float()
    flops = 2 * m * n * k
    bench = dict(warmup=10, rep=rep, return_mode="median")
    cublas = _graph(lambda: torch.matmul(a, b, out=out))
    cublas_ms = triton.testing.do_bench(cublas.replay, **bench)
    row = {"label": label, "m": m, "n": n, "k": k, "weight": weight, "class": cls,
           "cublas_ms": cublas_ms, "cublas_tflops": flops / cublas_ms / 1e9,
           "configs": []}  # fmt: skip
    for cfg in cfgs:
        entry = {"config": dataclasses.asdict(cfg)}
        try:
            out.fill_(float("nan"))
            mm.launch(a, b, out, config=cfg, kernel="tma")
            torch.cuda.synchronize()
            err = float((out.float() - ref).norm() / ref.norm())
            graph = _graph(lambda c=cfg: mm.launch(a, b, out, config=c, kernel="tma"))
            ms = triton.testing.do_bench(graph.replay, **bench)
            entry.update(ms=ms, tflops=flops / ms / 1e9, vs_cublas=cublas_ms / ms, err=err)
            if epilogue:
                graph = _graph(lambda c=cfg: mm.launch(a, b, out, bias, None, "gelu", config=c,
                                                       kernel="tma"))  # fmt: skip
                ms_e = triton.testing.do_bench(graph.replay, **bench)
                entry.update(epi_ms=ms_e)
        except Exception as exc:  # noqa: BLE001
            entry["error"] = f"{type(exc).__name__}: {exc}"[:300]
        row["configs"].append(entry)
    ok = [c for c in row["configs"] if "ms" in c and c["err"] < 1e-2]
    row["best"] = min(ok, key=lambda c: c["ms"]) if ok else None
    return row


def smoke(mm) -> None:
    """Compile and check a few configs of each code path (stream-K, 4-chunk epilogue, warp
    specialization, the SFU gelu) before the sweep, printing any failure in full."""
    import traceback

    a, b = _tensors(512, 4096, 4096, True, torch.bfloat16)
    bias = torch.randn(4096, device="cuda").to(torch.bfloat16)
    z = a.float() @ b.float()
    c = mm._c
    for cfg in (c(128, 256, 64, 8, 3, st=4, sk=2), c(64, 128, 64, 4, 6, sk=4),
                c(128, 256, 64, 8, 4, st=4), c(128, 256, 64, 8, 3, ws=True, st=4)):  # fmt: skip
        for act in (None, "gelu"):
            out = torch.full((512, 4096), float("nan"), device="cuda", dtype=torch.bfloat16)
            try:
                mm.launch(a, b, out, bias if act else None, None, act, config=cfg, kernel="tma")
                ref = torch.nn.functional.gelu(z + bias.float(), approximate="tanh") if act else z
                err = float((out.float() - ref).norm() / ref.norm())
                print(f"smoke ok   {act} {cfg}: rel err {err:.2e}", flush=True)
            except Exception:  # noqa: BLE001
                print(f"smoke FAIL {act} {cfg}:\n{traceback.format_exc()[-1500:]}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="sweep_matmul.json")
    parser.add_argument("--extra", action="store_true", help="add exploratory configs")
    parser.add_argument("--epilogue", action="store_true", help="also time bias+gelu fused")
    parser.add_argument("--workers", type=int, default=min(14, os.cpu_count() or 1))
    parser.add_argument("--rep", type=int, default=40, help="do_bench rep (ms)")
    parser.add_argument("--only", default="", help="comma-separated shape labels")
    parser.add_argument("--smoke", action="store_true", help="check each code path first")
    args = parser.parse_args()

    from kernforge.kernels import matmul as mm

    if args.smoke:
        smoke(mm)

    plan = []
    for label, m, n, k, weight in shapes():
        if args.only and label not in args.only.split(","):
            continue
        cls = mm.shape_class(m, n)
        cfgs = list(mm.TMA_LARGE if cls == "large" else mm.TMA_SMALL)
        if args.extra:
            cfgs += [c for c in extra_configs(mm, cls) if c not in cfgs]
        plan.append((label, m, n, k, weight, cls, cfgs))

    t0 = time.time()
    jobs = sorted({(tuple(sorted(dataclasses.asdict(c).items())), w, e)
                   for _, _, _, _, w, _, cfgs in plan for c in cfgs
                   for e in ((False, True) if args.epilogue else (False,))})  # fmt: skip
    errors = {}
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(args.workers, mp_context=ctx) as pool:
        work = [(dict(j[0]), j[1], j[2]) for j in jobs]
        for job, err in zip(jobs, pool.map(_compile_one, work), strict=True):
            if err:
                errors[job] = err
    print(f"compiled {len(jobs)} variants in {time.time() - t0:.0f} s; {len(errors)} failed",
          flush=True)  # fmt: skip
    for job, err in errors.items():
        print(f"  FAILED {dict(job[0])} weight={job[1]} epi={job[2]}: {err}", flush=True)

    results = []
    for label, m, n, k, weight, cls, cfgs in plan:
        row = time_shape(mm, label, m, n, k, weight, cls, cfgs, args.rep, args.epilogue)
        results.append(row)
        best = row["best"]
        if best:
            print(f"{label:24s} cuBLAS {row['cublas_tflops']:6.1f}  best {best['tflops']:6.1f} "
                  f"({best['vs_cublas']:.3f}x) {best['config']}", flush=True)  # fmt: skip
        else:
            print(f"{label:24s} no config ran", flush=True)
        torch.cuda.empty_cache()

    host = host_overhead(mm)
    print(f"host us per eager call at 128x4096x4096 (GPU ~15-25 us): {host}")
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "host_us": host, "results": results},
                  f, indent=1)  # fmt: skip
    llama = [r["best"]["vs_cublas"] for r in results
             if r["label"].startswith("llama") and r["best"]]  # fmt: skip
    if llama:
        g = math.exp(sum(map(math.log, llama)) / len(llama))
        print(f"Llama geomean x cuBLAS (best config per shape): {g:.3f}")
    # Per class: the config with the best geometric mean over the class's shapes.
    for cls in ("large", "small"):
        rows = [r for r in results if r["class"] == cls]
        if not rows:
            continue
        scores = {}
        for r in rows:
            for c in r["configs"]:
                if "ms" in c:
                    key = json.dumps(c["config"], sort_keys=True)
                    scores.setdefault(key, []).append(c["vs_cublas"])
        full = {k: v for k, v in scores.items() if len(v) == len(rows)}
        for key, v in sorted(full.items(), key=lambda kv: -sum(map(math.log, kv[1])))[:4]:
            g = math.exp(sum(map(math.log, v)) / len(v))
            print(f"class {cls}: geomean {g:.3f}x cuBLAS over {len(v)} shapes: {key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
