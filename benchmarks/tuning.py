"""Tuning without the wait (issue 10): exhaustive search against the learned model's top-k.

For the TMA matmul (bf16, x @ W^T) and the attention forward (bf16, D 64/128, causal or not),
every config of the family's wide space (kernforge.tune.space) is measured on every shape: ~90
LLM/CNN-like shapes per family, a fixed random 30 of them held out. That is the dataset (the
measurement store, copied to OUT). The model (kernforge.tune.model) is trained on the other
shapes only, then for each held-out shape it ranks the space and "measures" its top 5 (the
times already taken): a hit when their best is within 3% of the exhaustive best.

Tuning wall time per held-out shape, both ways: exhaustive = for every config, its compile
time for that shape's specialization (measured in the compile workers) plus one tuner
measurement (``kernforge.tune.tuner._time``'s wall time, calibrated on a few configs in this
run); model = the same for the configs the model measured, plus the model's prediction time.

Compilation: every (config, specialization) is compiled first in parallel worker processes
that fill Triton's on-disk cache; the timing process then loads the binaries. Timing: one CUDA
graph of R launches (R so that a replay lasts >= 0.15 ms), median of 5 event-timed replays;
outputs checked against torch (relative error < 2e-2) or the config is ruled out.

    PYTHONPATH=src python3 benchmarks/tuning.py --out DIR [--quick] [--budget-s 420]

Writes DIR/tuning.json, DIR/tuning.md, DIR/measurements_<family>.jsonl and a log on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

# Before kernforge is imported: a private cache (store, tuner entries, Triton binaries) that
# the compile workers share.
os.environ.setdefault("KERNFORGE_CACHE_DIR", "/tmp/kf_tuning_cache")
os.environ.setdefault("TRITON_CACHE_DIR", "/tmp/kf_tuning_cache/triton")

K = 5
TOLERANCE = 1.03
MAX_ERR = 2e-2
SEED = 0
FAMILIES = {"matmul": "matmul_tma", "attention": "attention_fwd"}

# ---------------------------------------------------------------------------------- shapes

#: (N, K) of LLM projections (Llama-3-8B, Qwen2.5-1.5B / 7B, BERT/ViT-B) and CNN layers as
#: GEMMs (ResNet-50 convolutions by im2col: N = output channels, K = in channels x 3 x 3 or 1).
MM_NK = [
    (6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336),
    (2048, 1536), (1536, 1536), (17920, 1536), (1536, 8960),
    (4608, 3584), (3584, 3584), (37888, 3584), (3584, 18944),
    (3072, 768), (768, 3072), (2304, 768),
    (64, 576), (128, 1152), (256, 2304), (512, 4608), (256, 64), (1024, 256), (2048, 512),
]  # fmt: skip
MM_M = [64, 128, 256, 512, 1024, 2048, 4096, 8192, 77, 200, 333, 777, 1000, 1500, 3000, 5000,
        392, 1568, 6272, 25088]  # fmt: skip
#: Largest GEMM measured (FLOPs): ~2 ms on an H100, so that the space fits the time budget.
MM_MAX_FLOPS = 1.2e12
MM_MIN_FLOPS = 2e8

ATT_SEQ = [256, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192]
ATT_BATCH = [1, 2, 4, 8, 16, 32]
ATT_HQ = [16, 32, 48, 64]
ATT_GROUP = [2, 4, 8]
ATT_MAX_FLOPS = 0.6e12
ATT_MIN_FLOPS = 2e9


def matmul_shapes(n: int, rng: random.Random) -> list[tuple]:
    """``n`` distinct (M, N, K) within the FLOP window."""
    out: set[tuple] = set()
    while len(out) < n:
        m = rng.choice(MM_M)
        nn, kk = rng.choice(MM_NK)
        f = 2.0 * m * nn * kk
        if MM_MIN_FLOPS <= f <= MM_MAX_FLOPS:
            out.add((m, nn, kk))
    return sorted(out)


def attention_shapes(n: int, rng: random.Random) -> list[tuple]:
    """``n`` distinct (batch, hq, hk, seq, d, causal) within the FLOP window (GQA, heads a
    multiple of 16: a few Triton specializations, so the compile phase stays short)."""
    out: set[tuple] = set()
    while len(out) < n:
        d = rng.choice((64, 128))
        causal = rng.random() < 0.5
        b, s, hq, g = (rng.choice(ATT_BATCH), rng.choice(ATT_SEQ), rng.choice(ATT_HQ),
                       rng.choice(ATT_GROUP))  # fmt: skip
        f = 4.0 * b * hq * s * s * d / (2 if causal else 1)
        if ATT_MIN_FLOPS <= f <= ATT_MAX_FLOPS:
            out.add((b, hq, hq // g, s, d, int(causal)))
    return sorted(out)


def split(shapes: list[tuple], n_test: int, rng: random.Random) -> tuple[list, list]:
    """(train, test): a fixed random ``n_test`` held out."""
    test = set(rng.sample(range(len(shapes)), n_test))
    return ([s for i, s in enumerate(shapes) if i not in test],
            [s for i, s in enumerate(shapes) if i in test])  # fmt: skip


# ---------------------------------------------------------------------------------- kernels


def family_key(family: str, shape: tuple) -> tuple:
    """The store key of a shape (exact sizes, in the tuner key's layout)."""
    if family == "matmul":
        m, n, k = shape
        return (m, n, k, "bfloat16", 0, 1, 1, 0)
    b, hq, hk, s, d, causal = shape
    return (b, hq, hk, s, s, d, causal, "bfloat16")


def signature(family: str, shape: tuple) -> tuple:
    """What Triton specializes the kernel on, for this benchmark's shapes: compile once per
    (config, signature)."""
    if family == "matmul":
        return (shape[0] % 16 == 0,)
    return (shape[4], shape[5])  # head dim, causal (sequences and heads are multiples of 16)


def make_runner(family: str, shape: tuple):
    """``(run(cfg), check(out) -> rel err)`` on fresh random bf16 inputs of ``shape``."""
    import torch

    torch.manual_seed(0)
    if family == "matmul":
        from kernforge.kernels import matmul as M

        m, n, k = shape
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / math.sqrt(k)
        out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        ref = (a.float() @ w.float().t()).bfloat16()

        def run(cfg):
            M.launch(a, w.t(), out, config=cfg, kernel="tma")
            return out

        def check():
            return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()

        return run, check
    from kernforge.kernels import attention as A

    b, hq, hk, s, d, causal = shape
    q = torch.randn(b, s, hq, d, device="cuda", dtype=torch.bfloat16)
    kk, vv = (torch.randn(b, s, hk, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    right = 0 if causal else -1
    res: list = []

    def run(cfg):
        with A.force_config(fwd=cfg):
            o, _ = A.forward(q, kk, vv, None, None, 0, 0, d**-0.5, -1, right, 0.0, "bshd")
        res[:] = [o]
        return o

    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2), is_causal=bool(causal),
        enable_gqa=True,
    ).transpose(1, 2)  # fmt: skip

    def check():
        o = res[0]
        if not torch.isfinite(o).all():
            return float("inf")
        return ((o.float() - ref.float()).abs().max() / ref.float().abs().max()).item()

    return run, check


def space_of(family: str, shape: tuple) -> list:
    from kernforge.tune import space

    fam = space.get(FAMILIES[family])
    return fam.candidates(family_key(family, shape))


# ---------------------------------------------------------------------------------- compile


def _compile_job(job):
    """Worker (one per job: a kernel that faults poisons its CUDA context, so a fresh
    process per config): launch one config once at each given shape, one per
    specialization (compiles into Triton's disk cache). Returns [(sig, seconds, error)]."""
    family, idx, shapes = job
    out = []
    poisoned = ""
    for shape in shapes:
        sig = signature(family, shape)
        if poisoned:
            out.append((sig, 0.0, poisoned))
            continue
        try:
            import torch

            cfg = space_of(family, shape)[idx]
            run, _ = make_runner(family, shape)
            t0 = time.perf_counter()
            run(cfg)
            torch.cuda.synchronize()
            out.append((sig, time.perf_counter() - t0, ""))
        except Exception as exc:  # noqa: BLE001
            err = f"{type(exc).__name__}: {str(exc)[:200]}"
            if "CUDA error" in err or "AcceleratorError" in err:
                poisoned = err  # the context is gone: the config is ruled out everywhere
            out.append((sig, 0.0, err))
    return family, idx, out


def compile_all(jobs: list, workers: int, budget_s: float) -> dict:
    """Compile every job in ``workers`` processes; {(family, idx, sig): (seconds, error)}."""
    ctx = mp.get_context("spawn")
    out: dict = {}
    t0 = time.time()
    with ctx.Pool(workers, maxtasksperchild=1) as pool:
        it = pool.imap_unordered(_compile_job, jobs)
        try:
            for n in range(len(jobs)):
                family, idx, results = it.next(timeout=max(1.0, t0 + budget_s - time.time()))
                for sig, sec, err in results:
                    out[(family, idx, sig)] = (sec, err)
                if n % 25 == 0:
                    print(f"  compiled {n + 1}/{len(jobs)} ({time.time() - t0:.0f}s)", flush=True)
        except mp.TimeoutError:
            pool.terminate()
    print(f"compile: {len(out)} (config, specialization) pairs of {len(jobs)} configs in "
          f"{time.time() - t0:.0f}s ({sum(1 for v in out.values() if v[1])} failed)",
          flush=True)  # fmt: skip
    for (family, idx, sig), (_, err) in sorted(out.items(), key=str):
        if err:
            print(f"  failed: {family} #{idx} {sig}: {err[:120]}", flush=True)
    return out


# ---------------------------------------------------------------------------------- timing


def time_config(run, cfg, stream) -> float:
    """Median ms of one launch of ``run(cfg)``: a CUDA graph of R launches (a replay >= 0.15
    ms), 5 event-timed replays."""
    import torch

    run(cfg)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=stream):
        run(cfg)
    g.replay()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    g.replay()
    e1.record()
    torch.cuda.synchronize()
    est = max(e0.elapsed_time(e1), 1e-3)
    reps = max(1, min(32, math.ceil(0.15 / est)))
    if reps > 1:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=stream):
            for _ in range(reps):
                run(cfg)
        g.replay()
    samples = []
    for _ in range(5):
        e0.record()
        g.replay()
        e1.record()
        e1.synchronize()
        samples.append(e0.elapsed_time(e1) / reps)
    del g
    return statistics.median(samples)


#: Set when a kernel faulted in this process (its CUDA context is unusable afterwards).
_dead: list[str] = []


def measure_shape(family: str, shape: tuple, compiled: dict, stream) -> list[dict]:
    """Every config of the space at ``shape``: store records (with bench fields)."""
    import dataclasses

    import torch

    from kernforge.kernels import matmul as M
    from kernforge.tune import space, store

    fam = space.get(FAMILIES[family])
    key = family_key(family, shape)
    feats = fam.features(key)
    if family == "matmul":
        tuner = M.TUNERS[("tma", M.shape_class(shape[0], shape[1]))]
    else:
        tuner = space.attention_fwd_tuner()
    run, check = make_runner(family, shape)
    sig = signature(family, shape)
    recs = []
    for idx, cfg in enumerate(fam.candidates(key)):
        comp_s, comp_err = compiled.get((family, idx, sig), (None, "not compiled in time"))
        if _dead:
            comp_err = comp_err or f"not measured: {_dead[0]}"
        t0 = time.perf_counter()
        ms, err = None, comp_err
        if not comp_err:
            try:
                ms = time_config(run, cfg, stream)
                e = check()
                if not e < MAX_ERR:
                    ms, err = None, f"wrong result (relative error {e:.3g})"
            except Exception as exc:  # noqa: BLE001
                ms, err = None, f"{type(exc).__name__}: {str(exc)[:200]}"
                if "CUDA error" in err or "AcceleratorError" in err:
                    _dead.append(f"{cfg} faulted at {shape}: {err[:100]}")
                    print(f"CUDA context lost: {_dead[0]}; measuring stops", flush=True)
        rec = store.make_record(fam.name, tuner.name, tuner.version, list(key),
                                dataclasses.asdict(cfg), ms, err, features=feats,
                                dtype="bfloat16")  # fmt: skip
        rec["bench"] = {"shape": list(shape), "compile_s": comp_s,
                        "wall_s": time.perf_counter() - t0}  # fmt: skip
        recs.append(rec)
    torch.cuda.empty_cache()
    return recs


def calibrate_tuner(family: str, shapes: list[tuple], n_cfg: int = 3) -> float:
    """Mean wall seconds of one ``kernforge.tune`` measurement (tuner._time: graph capture +
    do_bench), binaries already loaded, over a few configs of a few shapes."""
    import torch

    from kernforge.tune import tuner as T

    walls = []
    for shape in shapes:
        run, _ = make_runner(family, shape)
        for cfg in space_of(family, shape)[:n_cfg]:
            try:
                run(cfg)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                T._time(run, cfg)
                walls.append(time.perf_counter() - t0)
            except Exception:  # noqa: BLE001
                continue
    return statistics.fmean(walls) if walls else float("nan")


# ---------------------------------------------------------------------------------- evaluate


def evaluate(family: str, records: list[dict], train: list[tuple], test: list[tuple],
             tuner_s: float) -> dict:  # fmt: skip
    """Train on ``train`` shapes, score top-K on ``test``; wall times both ways."""
    from kernforge.tune import model, space

    fam = space.get(FAMILIES[family])
    ds = model.Dataset.from_records(fam, records)
    kt = lambda shape: json.dumps(list(family_key(family, shape)), separators=(",", ":"))  # noqa: E731
    tr = [kt(s) for s in train if kt(s) in ds.times]
    te = [kt(s) for s in test if kt(s) in ds.times]
    t0 = time.perf_counter()
    ranker = model.fit(fam, ds, [k for k in tr if k in ds.trainable()])
    train_s = time.perf_counter() - t0
    comp: dict[tuple[str, str], float] = {}
    for r in records:
        comp[(json.dumps(r["key"], separators=(",", ":")), model._cfg_text(r["config"]))] = (
            r["bench"]["compile_s"] or 0.0)  # fmt: skip
    rows = []
    by_k: dict[int, list[bool]] = {1: [], 3: [], 5: [], 10: []}
    for key in te:
        if key not in ds.trainable():
            continue
        t0 = time.perf_counter()
        cfgs = list(ds.times[key])
        order = ranker.order(ds.features[key], [ds.configs[c] for c in cfgs])
        predict_s = time.perf_counter() - t0
        for kk in by_k:
            by_k[kk].append(model.select(ranker, ds, key, kk).hit)
        pick = model.select(ranker, ds, key, K)
        measured = [cfgs[i] for i in order[: pick.measured]]
        compile_all_s = sum(comp.get((key, c), 0.0) for c in cfgs)
        compile_model_s = sum(comp.get((key, c), 0.0) for c in measured)
        rows.append({
            "shape": json.loads(key), "configs": pick.total, "measured": pick.measured,
            "best_ms": pick.best_ms, "model_ms": pick.chosen_ms,
            "slowdown": pick.chosen_ms / pick.best_ms, "hit": pick.hit,
            "exhaustive_s": compile_all_s + pick.total * tuner_s,
            "model_s": compile_model_s + pick.measured * tuner_s + predict_s,
            "exhaustive_timing_s": pick.total * tuner_s,
            "model_timing_s": pick.measured * tuner_s + predict_s,
            "predict_s": predict_s,
        })  # fmt: skip
    if not rows:
        return {"error": "no held-out shape measured"}
    n = len(rows)
    return {
        "space": statistics.fmean(r["configs"] for r in rows),
        "train_shapes": len(tr), "test_shapes": n, "records": len(records),
        "train_records": ranker.n_records, "train_s": train_s,
        "hit_rate": sum(r["hit"] for r in rows) / n,
        "hit_rate_at": {str(kk): sum(v) / len(v) for kk, v in by_k.items() if v},
        "fraction_measured": sum(r["measured"] for r in rows) / sum(r["configs"] for r in rows),
        "mean_slowdown": statistics.fmean(r["slowdown"] for r in rows),
        "worst_slowdown": max(r["slowdown"] for r in rows),
        "tuner_measure_s": tuner_s,
        "exhaustive_s_mean": statistics.fmean(r["exhaustive_s"] for r in rows),
        "model_s_mean": statistics.fmean(r["model_s"] for r in rows),
        "exhaustive_timing_s_mean": statistics.fmean(r["exhaustive_timing_s"] for r in rows),
        "model_timing_s_mean": statistics.fmean(r["model_timing_s"] for r in rows),
        "bars": {"hit_rate>=0.9": sum(r["hit"] for r in rows) / n >= 0.9,
                 "fraction<=0.1": sum(r["measured"] for r in rows)
                 / sum(r["configs"] for r in rows) <= 0.1},  # fmt: skip
        "per_shape": rows,
    }  # fmt: skip


def markdown(result: dict) -> str:
    lines = ["# Tuning: learned model top-5 vs exhaustive search", "",
             f"Device: {result['device']}; torch {result['torch']}, triton {result['triton']}; "
             f"{result['when']}", "",
             "| family | space | train shapes | held-out | hit rate (top-5 within 3%) | "
             "fraction measured | mean / worst slowdown | tuning s/shape exhaustive | model | "
             "timing only: exhaustive | model |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in result["families"].items():
        if "error" in r:
            lines.append(f"| {name} | {r['error']} |")
            continue
        lines.append(
            f"| {name} | {r['space']:.0f} | {r['train_shapes']} | {r['test_shapes']} | "
            f"{r['hit_rate']:.2f} | {r['fraction_measured']:.3f} | {r['mean_slowdown']:.3f} / "
            f"{r['worst_slowdown']:.3f} | {r['exhaustive_s_mean']:.1f} | {r['model_s_mean']:.1f}"
            f" | {r['exhaustive_timing_s_mean']:.1f} | {r['model_timing_s_mean']:.2f} |"
        )
    lines += ["", "Top-k hit rates: " + "; ".join(
        f"{n}: " + ", ".join(f"k={k} {v:.2f}" for k, v in r.get("hit_rate_at", {}).items())
        for n, r in result["families"].items()), "",  # fmt: skip
        "Bars (H100): hit rate >= 0.90 with <= 10% of the configs measured.", "",
        "Tuning wall time per held-out shape in a fresh process: exhaustive = every config's "
        "compile time for the shape plus one tuner measurement each; model = the same for "
        "the configs the model measured plus its prediction. 'timing only': binaries already "
        "cached.", ""]  # fmt: skip
    for name, r in result["families"].items():
        if "per_shape" not in r:
            continue
        lines += [f"## {name}: held-out shapes", "",
                  "| shape | best ms | model's ms | slowdown | measured | hit |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for row in r["per_shape"]:
            lines.append(f"| {row['shape']} | {row['best_ms']:.4f} | {row['model_ms']:.4f} | "
                         f"{row['slowdown']:.3f} | {row['measured']}/{row['configs']} | "
                         f"{'yes' if row['hit'] else 'NO'} |")  # fmt: skip
        lines.append("")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--quick", action="store_true", help="smoke test: few shapes and configs")
    ap.add_argument("--families", default="matmul,attention")
    ap.add_argument("--shapes", type=int, default=90, help="shapes per family")
    ap.add_argument("--test", type=int, default=30, help="held-out shapes per family")
    ap.add_argument("--workers", type=int, default=max(1, min(15, (os.cpu_count() or 4) - 1)))
    ap.add_argument("--compile-budget-s", type=float, default=150)
    ap.add_argument("--budget-s", type=float, default=420, help="stop measuring after this")
    args = ap.parse_args()
    t_start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(os.environ["KERNFORGE_CACHE_DIR"] + "/tune", ignore_errors=True)

    import torch
    import triton

    import kernforge  # noqa: F401
    from kernforge.tune import store

    families = [f for f in args.families.split(",") if f]
    rng = random.Random(SEED)
    plan: dict[str, tuple[list, list]] = {}
    for fam in families:
        n, n_test = (8, 3) if args.quick else (args.shapes, args.test)
        shapes = matmul_shapes(n, rng) if fam == "matmul" else attention_shapes(n, rng)
        plan[fam] = split(shapes, n_test, rng)
        print(f"{fam}: {len(shapes)} shapes ({n_test} held out), space "
              f"{len(space_of(fam, shapes[0]))} configs", flush=True)  # fmt: skip

    # One compile job per config (each of its specializations), over both families.
    jobs = []
    for fam in families:
        train, test = plan[fam]
        reps: dict[tuple, tuple] = {}
        for shape in train + test:
            reps.setdefault(signature(fam, shape), shape)
        by_idx: dict[int, list] = {}
        for shape in reps.values():
            n_space = len(space_of(fam, shape))
            for idx in range(n_space if not args.quick else min(n_space, 12)):
                by_idx.setdefault(idx, []).append(shape)
        jobs += [(fam, idx, shapes) for idx, shapes in by_idx.items()]
    # Slow compiles (large attention tiles, warp specialization) first keep the pool busy.
    rng.shuffle(jobs)
    compiled = compile_all(jobs, args.workers, args.compile_budget_s)
    comp_s = [v[0] for v in compiled.values() if not v[1]]
    print(f"compile seconds per job: mean {statistics.fmean(comp_s or [0]):.2f}, "
          f"total {sum(comp_s):.0f} (serial)", flush=True)  # fmt: skip

    stream = torch.cuda.Stream()
    records: dict[str, list[dict]] = {f: [] for f in families}
    # Interleave train and held-out shapes, both families, so a cut at the budget keeps both.
    order = []
    for fam in families:
        train, test = plan[fam]
        for i, shape in enumerate(sorted(train + test, key=lambda s: rng.random())):
            order.append((i, fam, shape))
    order.sort(key=lambda t: t[0])
    t_meas = time.time()
    done = 0
    for _, fam, shape in order:  # noqa: SIM113  (done counts measured shapes only)
        if time.time() - t_start > args.budget_s:
            print(f"budget reached after {done} shapes: stopping", flush=True)
            break
        if _dead:
            break
        recs = measure_shape(fam, shape, compiled, stream)
        if args.quick:
            recs = [r for r in recs if r["bench"]["compile_s"] is not None]
        records[fam] += recs
        store.append(FAMILIES[fam], recs)
        done += 1  # noqa: SIM113
        ok = [r["ms"] for r in recs if r["ms"] is not None]
        print(f"[{time.time() - t_start:5.0f}s] {fam} {shape}: {len(ok)}/{len(recs)} ok, best "
              f"{min(ok) if ok else float('nan'):.4f} ms, "
              f"{sum(r['bench']['wall_s'] for r in recs):.2f}s", flush=True)  # fmt: skip
    meas_s = time.time() - t_meas
    n_meas = sum(len(v) for v in records.values())
    print(f"measured {n_meas} configs in {meas_s:.0f}s ({meas_s / max(n_meas, 1) * 1e3:.1f} ms "
          "each)", flush=True)  # fmt: skip

    result = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "triton": triton.__version__, "when": store.now(), "k": K, "tolerance": TOLERANCE,
        "quick": args.quick, "compile_jobs": len(jobs),
        "compile_s_mean": statistics.fmean(comp_s or [0]), "measure_s": meas_s,
        "measurements": n_meas, "families": {},
    }  # fmt: skip
    for fam in families:
        train, test = plan[fam]
        tuner_s = calibrate_tuner(fam, test[:2])
        try:
            result["families"][fam] = evaluate(fam, records[fam], train, test, tuner_s)
        except Exception as exc:  # noqa: BLE001
            result["families"][fam] = {"error": f"{type(exc).__name__}: {exc}"}
        r = result["families"][fam]
        if "error" not in r:
            print(f"{fam}: hit rate {r['hit_rate']:.2f} (top-{K} within 3%) on {r['test_shapes']} "
                  f"held-out shapes, fraction measured {r['fraction_measured']:.3f}, slowdown mean "
                  f"{r['mean_slowdown']:.3f} worst {r['worst_slowdown']:.3f}; tuning s/shape: "
                  f"exhaustive {r['exhaustive_s_mean']:.1f}, model {r['model_s_mean']:.2f} "
                  f"(timing only {r['exhaustive_timing_s_mean']:.1f} vs "
                  f"{r['model_timing_s_mean']:.2f}); hit@k {r['hit_rate_at']}",
                  flush=True)  # fmt: skip
        else:
            print(f"{fam}: {r['error']}", flush=True)
        shutil.copy(store.path(FAMILIES[fam]), out / f"measurements_{FAMILIES[fam]}.jsonl")
    (out / "tuning.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "tuning.md").write_text(markdown(result))
    print(f"wrote {out / 'tuning.json'} in {time.time() - t_start:.0f}s total", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
