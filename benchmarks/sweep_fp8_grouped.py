"""Sweep the launch configs of the fp8 GEMM and the grouped GEMM on a GPU (H100), checking each
config's result, and time the references in the same process.

    PYTHONPATH=src python3 benchmarks/sweep_fp8_grouped.py fp8 --out sweep_fp8.json
    PYTHONPATH=src python3 benchmarks/sweep_fp8_grouped.py grouped --out sweep_grouped.json
    PYTHONPATH=src python3 benchmarks/sweep_fp8_grouped.py ws --out sweep_ws.json

``ws`` runs the warp-specialized variants (not in the tuners' candidate lists until measured),
in a process of their own so that a crash cannot take the other results with it. Times are
medians of ``triton.testing.do_bench`` (CUDA events, L2 flushed), in ms; TFLOP/s = 2MNK / t.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch

from kernforge.bench.cases_fp8_grouped import GROUPED_GPU, routed_sizes
from kernforge.kernels import fp8_gemm as F
from kernforge.kernels import grouped_gemm as G

ROWS: list[dict] = []
#: --tiny: small shapes on the CPU through the interpreter, to check this script itself.
TINY = False
DEV = "cuda"


def bench(fn, rep: int = 100) -> float:
    if TINY:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    from triton.testing import do_bench  # imported after kernforge set up the interpreter

    return float(do_bench(fn, warmup=10, rep=rep, return_mode="median"))


def sync() -> None:
    if not TINY:
        torch.cuda.synchronize()


def rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.float(), ref.float()
    return ((y - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def record(part: str, case: str, impl: str, ms: float | None, flops: int, err=None, note=""):
    row = {"part": part, "case": case, "impl": impl, "ms": ms, "err": err, "note": note,
           "tflops": None if ms is None else flops / ms / 1e9}  # fmt: skip
    ROWS.append(row)
    tf = "-" if ms is None else f"{row['tflops']:7.1f}"
    e = "-" if err is None else f"{err:.2e}"
    print(f"{part:8} {case:28} {impl[:70]:70} {tf:>8} TFLOP/s  err {e}  {note[:120]}", flush=True)


def try_config(part, case, name, flops, launch, check):
    try:
        launch()
        sync()
        err = check()
        ms = bench(launch)
        record(part, case, name, ms, flops, err)
    except Exception as exc:  # noqa: BLE001
        record(part, case, name, None, flops, None, f"{type(exc).__name__}: {exc}")


# ---------------------------------------------------------------- fp8


def fp8_part(configs: list[F.Fp8Config], part: str = "fp8") -> None:
    m = n = k = 64 if TINY else 8192
    flops = 2 * m * n * k
    case = f"{m}x{n}x{k}"
    a = torch.randn(m, k, device=DEV)
    w = torch.randn(n, k, device=DEV)
    qa, sa = F.quantize_fp8(a, axis=1)
    qb, sb = F.quantize_fp8(w.t(), axis=0)
    qa_t, sa_t = F.quantize_fp8(a)
    qb_t, sb_t = F.quantize_fp8(w.t())
    del a, w
    ref = (qa.float() * sa[:, None]) @ (qb.float() * sb[None, :])
    if part == "fp8":
        a16 = (qa.float() * sa[:, None]).bfloat16()
        b16 = (qb.float() * sb[None, :]).bfloat16()
        record(part, case, "cuBLAS bf16 torch.matmul", bench(lambda: torch.matmul(a16, b16)),
               flops, rel(torch.matmul(a16, b16), ref))  # fmt: skip
        del a16, b16
        ref_t = (qa_t.float() * sa_t) @ (qb_t.float() * sb_t)
        for fast in (False, True):
            fn = lambda fast=fast: torch._scaled_mm(qa, qb, scale_a=sa[:, None],  # noqa: E731
                scale_b=sb[None, :], out_dtype=torch.bfloat16, use_fast_accum=fast)  # fmt: skip
            try_config(part, case, f"torch._scaled_mm rowwise fast_accum={fast}", flops, fn,
                       lambda fn=fn: rel(fn(), ref))  # fmt: skip
            fn_t = lambda fast=fast: torch._scaled_mm(qa_t, qb_t, scale_a=sa_t,  # noqa: E731
                scale_b=sb_t, out_dtype=torch.bfloat16, use_fast_accum=fast)  # fmt: skip
            try_config(part, case, f"torch._scaled_mm tensorwise fast_accum={fast}", flops,
                       fn_t, lambda fn_t=fn_t: rel(fn_t(), ref_t))  # fmt: skip
    for cfg in configs:
        fn = lambda cfg=cfg: F.fp8_forward(qa, qb, sa, sb, None, torch.bfloat16, cfg=cfg)  # noqa: E731
        try_config(part, case, f"kf {cfg}", flops, fn, lambda fn=fn: rel(fn(), ref))
    if part == "fp8":  # per-tensor scales and a bias on the default config
        fn = lambda: F.fp8_forward(qa_t, qb_t, sa_t, sb_t, None, torch.bfloat16, cfg=F.DEFAULT)  # noqa: E731
        ref_t = (qa_t.float() * sa_t) @ (qb_t.float() * sb_t)
        try_config(part, case, "kf DEFAULT tensorwise", flops, fn, lambda: rel(fn(), ref_t))


# ---------------------------------------------------------------- grouped


def grouped_part(fwd_configs, dw_configs, part: str = "grouped") -> None:
    shapes = GROUPED_GPU
    if TINY:
        shapes = [(nm, r // 256, n // 512 * 8, k // 512 * 8, e) for nm, r, n, k, e in GROUPED_GPU]
    for name, rows, n, k, experts in shapes:
        grouped_shape(name, rows, n, k, experts, fwd_configs, dw_configs, part)
        if not TINY:
            torch.cuda.empty_cache()


def grouped_shape(name, rows, n, k, experts, fwd_configs, dw_configs, part) -> None:
    sizes = routed_sizes(rows, experts, DEV)
    host = [int(s) for s in sizes.tolist()]
    starts = [sum(host[:g]) for g in range(experts)]
    case = f"{name} {rows}x{n}x{k}x{experts}"
    flops = 2 * rows * n * k
    x = torch.randn(rows, k, device=DEV, dtype=torch.bfloat16)
    w = (torch.randn(experts, n, k, device=DEV) * k**-0.5).bfloat16()
    y_loop = torch.empty(rows, n, device=DEV, dtype=torch.bfloat16)

    def loop(a, b, out, tr=True):
        for g in range(experts):
            s, e = starts[g], starts[g] + host[g]
            if e > s:
                torch.mm(a[s:e], b[g].t() if tr else b[g], out=out[s:e])
        return out

    ref = loop(x, w, y_loop).clone()
    if part == "grouped":
        print(f"# {case}: group sizes min {min(host)} max {max(host)}", flush=True)
        record(part, case, "torch_loop fwd", bench(lambda: loop(x, w, y_loop)), flops, 0.0)
        offs = torch.cumsum(sizes, 0, dtype=torch.int32)
        wt = w.transpose(1, 2)
        gmm = lambda: torch._grouped_mm(x, wt, offs=offs)  # noqa: E731
        try_config(part, case, "torch._grouped_mm fwd", flops, gmm, lambda: rel(gmm(), ref))
    y = torch.empty(rows, n, device=DEV, dtype=torch.bfloat16)
    for cfg in fwd_configs:
        for tma in (True, False) if cfg == G.FWD_DEFAULT and part == "grouped" else (True,):
            fn = lambda cfg=cfg, tma=tma: G._launch_fwd(x, w, sizes, None, y, cfg, tma, True)  # noqa: E731
            try_config(part, case, f"kf fwd tma={tma} {cfg}", flops, fn,
                       lambda fn=fn: (fn(), rel(y, ref))[1])  # fmt: skip
    if not name.endswith("gate_up"):
        return
    # dx = dy @ W[g] per group: the forward kernel reading W transposed (N-major).
    dy = torch.randn(rows, n, device=DEV, dtype=torch.bfloat16)
    dx = torch.empty(rows, k, device=DEV, dtype=torch.bfloat16)
    dx_loop = torch.empty_like(dx)
    w_t = w.transpose(1, 2)  # [G, K, N], N-contiguous
    dx_ref = loop(dy, w, dx_loop, tr=False).clone()
    if part == "grouped":
        ms = bench(lambda: loop(dy, w, dx_loop, tr=False))
        record(part, case, "torch_loop dx", ms, flops, 0.0)
    for cfg in fwd_configs:
        fn = lambda cfg=cfg: G._launch_fwd(dy, w_t, sizes, None, dx, cfg, True, False)  # noqa: E731
        try_config(part, case, f"kf dx {cfg}", flops, fn,
                   lambda fn=fn: (fn(), rel(dx, dx_ref))[1])  # fmt: skip
    # dW[g] = dy_g^T @ x_g
    dw = torch.empty(experts, n, k, device=DEV, dtype=torch.bfloat16)
    dw_loop = torch.empty_like(dw)

    def dw_ref():
        for g in range(experts):
            s, e = starts[g], starts[g] + host[g]
            torch.mm(dy[s:e].t(), x[s:e], out=dw_loop[g])
        return dw_loop

    dw_want = dw_ref().clone()
    if part == "grouped":
        record(part, case, "torch_loop dW", bench(dw_ref), flops, 0.0)
    for cfg in dw_configs:
        fn = lambda cfg=cfg: G._launch_dw(dy, x, sizes, dw, cfg, True)  # noqa: E731
        try_config(part, case, f"kf dW {cfg}", flops, fn,
                   lambda fn=fn: (fn(), rel(dw, dw_want))[1])  # fmt: skip


def rep_part(rounds: int = 3) -> None:
    """Leading configs measured in interleaved rounds: differences beyond the spread."""
    m = n = k = 64 if TINY else 8192
    flops = 2 * m * n * k
    a = torch.randn(m, k, device=DEV)
    w = torch.randn(n, k, device=DEV)
    ops = {"rowwise": (F.quantize_fp8(a, axis=1), F.quantize_fp8(w.t(), axis=0)),
           "tensorwise": (F.quantize_fp8(a), F.quantize_fp8(w.t()))}  # fmt: skip
    a16, b16 = a.bfloat16(), w.t().bfloat16()
    for r in range(rounds):
        record("rep", f"fp8 round {r}", "cuBLAS bf16", bench(lambda: a16 @ b16), flops)
        for mode, ((qa, sa), (qb, sb)) in ops.items():
            for cfg in F.CONFIGS[:5]:
                fn = lambda: F.fp8_forward(qa, qb, sa, sb, None, torch.bfloat16, cfg=cfg)  # noqa: E731, B023
                try_config("rep", f"fp8 {mode} round {r}", f"kf {cfg}", flops, fn, lambda: 0.0)
    for name, rows, n, k, experts in GROUPED_GPU if not TINY else []:
        sizes = routed_sizes(rows, experts, DEV)
        x = torch.randn(rows, k, device=DEV, dtype=torch.bfloat16)
        w = (torch.randn(experts, n, k, device=DEV) * k**-0.5).bfloat16()
        y = torch.empty(rows, n, device=DEV, dtype=torch.bfloat16)
        flops = 2 * rows * n * k
        for r in range(2):
            for cfg in G.FWD_CONFIGS[:6]:
                fn = lambda: G._launch_fwd(x, w, sizes, None, y, cfg, True, True)  # noqa: E731, B023
                try_config("rep", f"{name} round {r}", f"kf fwd {cfg}", flops, fn, lambda: 0.0)
        torch.cuda.empty_cache()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("part", choices=["fp8", "grouped", "ws", "rep"])
    p.add_argument("--out", default="sweep.json")
    p.add_argument("--tiny", action="store_true", help="small shapes on the CPU (interpreter)")
    args = p.parse_args()
    global TINY, DEV
    TINY, DEV = args.tiny, "cpu" if args.tiny else "cuda"
    name = "cpu" if TINY else torch.cuda.get_device_name()
    t0 = time.time()
    print(f"# {name} torch {torch.__version__}", flush=True)
    if args.part == "fp8":
        extra = [dataclasses.replace(F.DEFAULT, precise_every=128),
                 F.Fp8Config(128, 256, 128, group_m=16, num_warps=8, num_stages=3),
                 F.Fp8Config(128, 256, 128, num_warps=8, num_stages=3, flatten=False,
                             epilogue_subtile=False)]  # fmt: skip
        fp8_part(F.CONFIGS + extra)
    elif args.part == "grouped":
        grouped_part(G.FWD_CONFIGS, G.DW_CONFIGS)
    elif args.part == "rep":
        rep_part()
    else:
        fp8_part([F.Fp8Config(128, 256, 128, num_warps=8, num_stages=3, flatten=False,
                              warp_specialize=True),
                  F.Fp8Config(128, 256, 128, num_warps=8, num_stages=4, flatten=False,
                              warp_specialize=True, epilogue_subtile=True)], part="ws")  # fmt: skip
        grouped_part([G.GroupedConfig(128, 256, 64, num_warps=8, num_stages=3,
                                      warp_specialize=True)], [], part="ws")  # fmt: skip
    with open(args.out, "w") as f:
        json.dump({"device": name, "rows": ROWS}, f, indent=1)
    print(f"# done in {time.time() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
