"""Sweep flash-attention launch configs on the GPU (how kernforge.kernels.attention's tables
were chosen), then optionally run the attention benchmark cases and GPU tests.

    PYTHONPATH=src python3 benchmarks/attention_sweep.py --out DIR [--stages sweep,bench,tests]

Every candidate (forward; dK/dV and dQ backward kernels timed alone) is compiled first in
parallel worker processes (they fill Triton's on-disk cache; the timing process then loads the
binaries), then timed one after another by CUDA-graph replay at [B, H, S, D] = [4, 16k/D.., 4096,
D] bf16, beside SDPA's flash and cuDNN backends. Results: DIR/sweep.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
import traceback
from dataclasses import asdict

SEQ = 4096
#: Also time SDPA in the sweep (the bench stage does anyway).
REFS = False
COMPILE_BUDGET_S = 150
#: A candidate whose outputs differ more from the trusted config's is ruled out.
MAX_ERR = 2e-2
HEADS = {128: 16, 64: 32, 256: 8}

# (kind, head dim, causal, config args): compiled locally for sm_90a first (no spills, fits
# shared memory); kinds: fwd (FwdConfig args), dkdv and dq (KernelConfig args).
FWD = {
    128: [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 8, 3),
          (128, 128, 8, 3, True), (128, 64, 8, 3, True), (64, 64, 4, 3, True)],
    64: [(128, 64, 8, 3), (128, 64, 4, 3), (128, 64, 8, 2), (256, 64, 16, 3), (256, 64, 8, 3),
         (64, 64, 4, 3), (128, 64, 4, 3, True), (256, 64, 16, 3, True)],
    256: [(128, 64, 8, 2, True), (64, 64, 4, 2, True), (64, 32, 8, 2)],
}  # fmt: skip
DKDV = {
    128: [(32, 64, 4, 3, True), (32, 64, 4, 2, True), (32, 64, 4, 3), (32, 64, 4, 2)],
    64: [(32, 128, 4, 3, True), (32, 64, 4, 3, True), (64, 64, 4, 2), (32, 64, 4, 3)],
    256: [(32, 32, 4, 2), (32, 64, 8, 2, True)],
}  # fmt: skip
DQ = {
    128: [(128, 64, 8, 3, True), (128, 64, 8, 4, True), (64, 64, 4, 2, True), (128, 64, 8, 3)],
    64: [(128, 64, 8, 3, True), (64, 64, 4, 3, True), (64, 64, 4, 2), (128, 64, 8, 3)],
    256: [(32, 32, 4, 2, True), (32, 32, 4, 2)],
}  # fmt: skip
#: Sequence lengths swept (batch * seq = 16k tokens): forward at each, backward at these.
FWD_SEQS = (1024, 4096, 16384)
BWD_SEQS = (1024, 16384)
#: Trusted pointer-load configs every candidate's output is compared with (by head dim).
REF_FWD = {128: (128, 64, 8, 3), 64: (128, 64, 8, 3), 256: (64, 32, 8, 2)}
REF_BWD = {128: ((32, 64, 4, 2), (64, 64, 4, 2)), 64: ((32, 64, 4, 2), (64, 64, 4, 2)),
           256: ((32, 32, 4, 2), (32, 32, 4, 2))}  # fmt: skip


def jobs(dims=(128, 64, 256)) -> list[tuple]:
    """(kind, head dim, causal, config args, seq) of every candidate."""
    out = []
    for d in dims:
        for causal in (False, True):
            if d == 256 and causal:
                continue
            for seq in FWD_SEQS if d != 256 else (4096,):
                out += [("fwd", d, causal, c, seq) for c in FWD[d]]
            for seq in BWD_SEQS if d != 256 else (4096,):
                out += [("dkdv", d, causal, c, seq) for c in DKDV[d]]
                out += [("dq", d, causal, c, seq) for c in DQ[d]]
    return out


def _cfg(kind, c):
    from kernforge.kernels import attention as A

    if kind == "fwd":
        return A.FwdConfig(*c)
    return A.KernelConfig(*c)


def _inputs(d: int, causal: bool, grad: bool, seq: int = SEQ):
    import torch

    from kernforge.kernels import attention as A

    h, b = HEADS[d], 16384 // seq
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, h, seq, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    right = 0 if causal else -1
    args = (None, None, 0, 0, d**-0.5, -1, right, 0.0, "bhsd")
    if not grad:
        return q, k, v, args, None, None, None
    with A.force_config(fwd=A.FwdConfig(128, 64, 8, 2, True) if d <= 128 else A.FwdConfig(
            64, 64, 8, 2, True)):  # fmt: skip
        out, lse = A.forward(q, k, v, *args)
    do = torch.randn_like(out)
    return q, k, v, args, out, lse, do


def _runner(job, check: bool = False):
    """A zero-argument callable launching ``job``'s kernel once (``check``: with what it needs
    to produce comparable outputs, i.e. the delta kernel before a backward kernel)."""
    from kernforge.kernels import attention as A

    kind, d, causal, c, seq = job
    cfg = _cfg(kind, c)
    q, k, v, args, out, lse, do = _inputs(d, causal, kind != "fwd", seq)
    if kind == "fwd":

        def run():
            with A.force_config(fwd=cfg):
                return A.forward(q, k, v, *args)

        return run
    bwd = A.BwdConfig(cfg, cfg)
    parts = ("delta", kind) if check else (kind,)

    def run():
        with A.force_config(bwd=bwd):
            return A.backward(do, q, k, v, out, lse, *args, parts=parts)

    return run


def _reference(kind, d, causal, seq):
    """Outputs of the trusted config for this (kind, d, causal, seq)."""
    from kernforge.kernels import attention as A

    if kind == "fwd":
        return _runner(("fwd", d, causal, REF_FWD[d], seq))()[0]
    q, k, v, args, out, lse, do = _inputs(d, causal, True, seq)
    kv, qc = REF_BWD[d]
    with A.force_config(bwd=A.BwdConfig(A.KernelConfig(*kv), A.KernelConfig(*qc))):
        return A.backward(do, q, k, v, out, lse, *args)


def _error(kind, got, ref) -> float:
    """Largest |got - ref| over max |ref| of the outputs ``kind`` writes (inf for NaN)."""
    import torch

    if kind == "fwd":
        pairs = [(got[0], ref)]
    elif kind == "dkdv":
        pairs = [(got[1], ref[1]), (got[2], ref[2])]
    else:
        pairs = [(got[0], ref[0])]
    worst = 0.0
    for g, r in pairs:
        if not torch.isfinite(g).all():
            return float("inf")
        worst = max(worst, ((g.float() - r.float()).abs().max() / r.float().abs().max()).item())
    return worst


def _compile_worker(job):
    try:
        import torch

        run = _runner(job)
        run()
        torch.cuda.synchronize()
        return job, ""
    except Exception as exc:  # noqa: BLE001
        return job, f"{type(exc).__name__}: {str(exc)[:300]}"


def flops(d: int, causal: bool, kind: str, seq: int = SEQ) -> float:
    h, b = HEADS[d], 16384 // seq
    f = 4 * b * h * seq * seq * d / (2 if causal else 1)
    # Backward kernels: dK/dV does 3 of the 5 backward matmuls (+ recompute), dQ 2 (+ 2).
    return {"fwd": f, "dkdv": f * 2.0, "dq": f * 1.5, "bwd": f * 2.5}[kind]


def sweep(out_dir: str, workers: int, dims) -> dict:
    import torch

    from kernforge.bench.harness import time_graph

    todo = jobs(dims)
    t0 = time.time()
    ctx = mp.get_context("spawn")
    errors = {}
    done = set()
    with ctx.Pool(workers) as pool:
        it = pool.imap_unordered(_compile_worker, todo)
        deadline = time.time() + COMPILE_BUDGET_S
        try:
            for _ in todo:
                job, err = it.next(timeout=max(1.0, deadline - time.time()))
                done.add(job)
                if err:
                    errors[job] = err
        except mp.TimeoutError:
            pool.terminate()  # a hung launch or a slow compile: skip what is left
    for job in todo:
        if job not in done:
            errors[job] = "not compiled within the budget"
    print(f"compiled {len(todo)} jobs in {time.time() - t0:.0f}s, {len(errors)} failed", flush=True)
    stream = torch.cuda.Stream()
    rows = []
    refs_out: dict = {}
    for job in todo:
        kind, d, causal, c, seq = job
        row = {"kind": kind, "d": d, "causal": causal, "seq": seq, "cfg": asdict(_cfg(kind, c))}
        if job in errors:
            row["error"] = errors[job]
        else:
            try:
                ref_key = (kind, d, causal, seq)
                if ref_key not in refs_out:
                    refs_out.clear()  # one reference held at a time (16k-token tensors)
                    refs_out[ref_key] = _reference(kind, d, causal, seq)
                row["err"] = _error(kind, _runner(job, check=True)(), refs_out[ref_key])
                ms = time_graph(_runner(job), stream, rep_ms=100)
                row["ms"] = ms
                row["tflops"] = flops(d, causal, kind, seq) / (ms * 1e-3) / 1e12
            except Exception as exc:  # noqa: BLE001
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        rows.append(row)
        torch.cuda.empty_cache()
    refs = reference_times(stream, dims) if REFS else {}
    best = {}
    for row in rows:
        if "ms" not in row or not row.get("err", 1.0) < MAX_ERR:
            continue
        key = f"{row['kind']} d{row['d']} {'causal' if row['causal'] else 'full'} {row['seq']}"
        if key not in best or row["ms"] < best[key]["ms"]:
            best[key] = row
    result = {"rows": rows, "best": best, "refs": refs, "seq": SEQ, "device":
              torch.cuda.get_device_name()}  # fmt: skip
    with open(os.path.join(out_dir, "sweep.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"{'kind':5} {'d':>4} {'causal':>6} {'seq':>6} {'cfg':22} {'ms':>8} {'TF/s':>6} max err")
    for row in sorted(rows, key=lambda r: (r["kind"], r["d"], r["causal"], r["seq"],
                                           r.get("ms", 1e9))):  # fmt: skip
        cfg = ",".join(str(int(v)) if isinstance(v, bool) else str(v) for v in row["cfg"].values())
        ms = f"{row['ms']:.3f}" if "ms" in row else row.get("error", "")[:60]
        tf = f"{row['tflops']:.0f}" if "tflops" in row else ""
        err = f"{row['err']:.1e}" if "err" in row else ""
        head = f"{row['kind']:5} {row['d']:>4} {row['causal']!s:>6} {row['seq']:>6}"
        print(f"{head} {cfg:22} {ms:>8} {tf:>6} {err}")
    print("references (TFLOP/s):", json.dumps(refs))
    print("best:", json.dumps({k: (v["cfg"], round(v["tflops"])) for k, v in best.items()}))
    return result


def reference_times(stream, dims) -> dict:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kernforge.bench.harness import time_graph

    out = {}
    for d in dims:
        if d == 256:
            continue
        for causal in (False, True):
            for name, be in (("flash", SDPBackend.FLASH_ATTENTION),
                             ("cudnn", SDPBackend.CUDNN_ATTENTION)):  # fmt: skip
                q, k, v = (torch.randn(16384 // SEQ, HEADS[d], SEQ, d, device="cuda",
                                       dtype=torch.bfloat16, requires_grad=True)
                           for _ in range(3))  # fmt: skip

                def fwd(q=q, k=k, v=v, be=be, causal=causal):
                    with sdpa_kernel([be]):
                        return torch.nn.functional.scaled_dot_product_attention(
                            q, k, v, is_causal=causal
                        )

                key = f"{name} d{d} {'causal' if causal else 'full'}"
                try:
                    with torch.cuda.stream(stream):
                        o = fwd()
                    torch.cuda.synchronize()
                    ms = time_graph(fwd, stream, rep_ms=100)
                    with torch.cuda.stream(stream):
                        o = fwd()
                        do = torch.randn_like(o)
                    torch.cuda.synchronize()
                    msb = time_graph(lambda o=o, do=do, q=q, k=k, v=v: torch.autograd.grad(
                        o, (q, k, v), do, retain_graph=True), stream, rep_ms=100)  # fmt: skip
                    out[key] = {"fwd": flops(d, causal, "fwd") / ms / 1e9,
                                "bwd": flops(d, causal, "bwd") / msb / 1e9}  # fmt: skip
                except Exception as exc:  # noqa: BLE001
                    out[key] = {"error": str(exc)[:200]}
    return out


def bench(out_dir: str, sweep_result: dict | None, quick: bool) -> None:
    """The attention benchmark cases (bench/cases_attention.py), with the sweep's best configs
    when given, written as DIR/attention.{json,md}."""
    from pathlib import Path

    from kernforge.bench import cases_attention
    from kernforge.bench.harness import environment, run_cases, write_results
    from kernforge.kernels import attention as A

    if sweep_result:
        best = sweep_result["best"]
        for d in (64, 128, 256):
            for causal in (False, True):
                for seq in (1024, 4096, 16384):
                    tag = f"d{d} {'causal' if causal else 'full'} {seq}"
                    key = (d, causal, seq) if d != 256 else (d, causal)
                    if f"fwd {tag}" in best:
                        A.FWD_CONFIGS[key] = A.FwdConfig(**best[f"fwd {tag}"]["cfg"])
                    if f"dkdv {tag}" in best and f"dq {tag}" in best:
                        A.BWD_CONFIGS[key] = A.BwdConfig(
                            A.KernelConfig(**best[f"dkdv {tag}"]["cfg"]),
                            A.KernelConfig(**best[f"dq {tag}"]["cfg"]))  # fmt: skip
    print("configs:", A.FWD_CONFIGS, A.BWD_CONFIGS, flush=True)
    results, copy = run_cases(cases_attention.cases(True, quick=quick))
    env = environment(copy, True)
    write_results("attention", results, env, Path(out_dir))
    for r in results:
        tf = {k: round(v) for k, v in r.tflops.items()}
        vs = {k: round(v, 2) for k, v in r.vs.items()}
        print(f"{r.op:20} {r.direction} {r.shape} TFLOP/s {tf} vs {vs} err {r.rel_err:.2g} "
              f"{r.error[:200]}", flush=True)  # fmt: skip
    for bar in cases_attention.bars(results):
        verdict = "met" if bar.met else "MISSED"
        print(f"BAR {bar.name}: {bar.value:.3f} (target {bar.target}) {verdict}")


def tests(out_dir: str, timeout: int) -> None:
    cmd = [sys.executable, "-m", "pytest", "-q", "tests/kernels/test_attention.py", "-n", "8",
           "-p", "no:cacheprovider"]  # fmt: skip
    with open(os.path.join(out_dir, "tests.log"), "w") as log:
        try:
            subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            log.write("\nTIMEOUT\n")
    with open(os.path.join(out_dir, "tests.log")) as log:
        print(log.read()[-3000:], flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--stages", default="sweep,bench,tests")
    ap.add_argument("--workers", type=int, default=14)
    ap.add_argument("--dims", default="128,64,256")
    ap.add_argument("--test-timeout", type=int, default=150)
    ap.add_argument("--sweep-json", default="")
    ap.add_argument("--quick", action="store_true", help="bench: seq 4k only")
    a = ap.parse_args()
    stages = a.stages.split(",")
    dims = tuple(int(x) for x in a.dims.split(","))
    res = None
    if a.sweep_json:
        with open(a.sweep_json) as f:
            res = json.load(f)
    for stage in stages:  # in the order given
        t0 = time.time()
        try:
            if stage == "sweep":
                res = sweep(a.out, a.workers, dims)
            elif stage == "bench":
                bench(a.out, res, a.quick)
            elif stage == "tests":
                tests(a.out, a.test_timeout)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
        print(f"== stage {stage}: {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
