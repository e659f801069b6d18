"""Sweep of the implicit-GEMM convolution's launch configs over the ResNet-50/18 convolutions
at batch 64 (bf16, channels-last), against cuDNN in the same run.

For every distinct shape (with its ResNet epilogue): cuDNN's conv alone, cuDNN + the eager
epilogue, each candidate config of ``kernels/conv.py`` (plus a few extra ones, to see whether
the candidate list misses a winner), and for 1x1 stride-1 convs the TMA GEMM route of
kernels/matmul (where the epilogue allows it). Every timing is a CUDA-graph replay (median),
every config's output is checked against cuDNN. Writes ``<out>/conv.sweep.json`` and prints the
best config per shape and the ResNet-50 sums.

    PYTHONPATH=src python3 benchmarks/conv_sweep.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from kernforge.bench.cases_conv import (
    BATCH,
    make_inputs,
    resnet18_convs,
    resnet50_convs,
    torch_epilogue,
)
from kernforge.bench.harness import time_graph
from kernforge.kernels import conv

EXTRA = [
    conv._c(128, 256, 64, 8, 4),
    conv._c(256, 128, 64, 8, 4),
    conv._c(64, 256, 64, 4, 4),
    conv._c(128, 128, 64, 8, 4, g=16),
    conv._c(128, 128, 128, 8, 3),
    conv._c(128, 64, 64, 4, 3, tma=False),
]
FLAT_EXTRA = [conv._c(64, 128, 32, 4, 3, tma=False)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def sweep_shape(s, stream, rep: int) -> dict:
    """Time cuDNN, each candidate config and the GEMM route on one shape."""
    with torch.cuda.stream(stream):
        x, w, bias, res = make_inputs(s, BATCH, "cuda")
    torch.cuda.synchronize()
    act = None if s.epilogue == "bias" else "relu"
    ref = torch_epilogue(s, x, w, bias, res)
    row = {"shape": s.label, "c": s.c, "o": s.o, "k": s.k, "stride": s.stride, "h": s.h,
           "epilogue": s.epilogue, "flops": s.flops(BATCH), "configs": []}  # fmt: skip
    row["cudnn_ms"] = time_graph(
        lambda: torch.nn.functional.conv2d(x, w, bias, s.stride, s.pad), stream, rep
    )
    row["torch_ms"] = time_graph(lambda: torch_epilogue(s, x, w, bias, res), stream, rep)
    flat = s.c < conv.FLAT_K_MAX_C
    cands = (conv.FLAT_CONFIGS + FLAT_EXTRA) if flat else (conv.CONFIGS + EXTRA)
    for cfg in cands:

        def fn(cfg=cfg):
            return conv.conv2d_forward(x, w, bias, s.stride, s.pad, 1, act, res, config=cfg)

        entry = {"config": cfg.__dict__.copy()}
        try:
            with torch.cuda.stream(stream):
                y = fn()
            torch.cuda.synchronize()
            entry["rel_err"] = rel(y, ref)
            entry["ms"] = time_graph(fn, stream, rep)
        except Exception as exc:  # noqa: BLE001  (a config over the budget is recorded)
            entry["error"] = f"{type(exc).__name__}: {exc}"[:300]
        row["configs"].append(entry)
    if s.k == 1 and s.stride == 1 and (res is None or act is None):

        def gemm():
            return conv.conv2d_forward(x, w, bias, 1, 0, 1, act, res, force_route="gemm")

        try:
            with torch.cuda.stream(stream):
                y = gemm()  # tunes the matmul kernel for this shape (once)
            torch.cuda.synchronize()
            row["gemm_rel_err"] = rel(y, ref)
            row["gemm_ms"] = time_graph(gemm, stream, rep)
        except Exception as exc:  # noqa: BLE001
            row["gemm_error"] = f"{type(exc).__name__}: {exc}"[:300]
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--rep", type=int, default=30)
    ap.add_argument("--match", default="", help="only shapes whose label contains this")
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stream = torch.cuda.Stream()
    rows = []
    seen = set()
    t_start = time.time()
    for s in resnet50_convs() + resnet18_convs():
        key = (s.c, s.o, s.k, s.stride, s.h, s.epilogue)
        if key in seen or args.match not in s.label:
            continue
        seen.add(key)
        row = sweep_shape(s, stream, args.rep)
        ok = [e for e in row["configs"] if "ms" in e and e["rel_err"] < 2e-2]
        best = min(ok, key=lambda e: e["ms"]) if ok else None
        row["best"] = best
        b_ms = best["ms"] if best else float("nan")
        g_ms = row.get("gemm_ms", float("nan"))
        print(f"{s.label:48s} x{s.count} cudnn {row['cudnn_ms']:.4f} torch "
              f"{row['torch_ms']:.4f} ours {b_ms:.4f} gemm {g_ms:.4f} "
              f"best {best['config'] if best else None} "
              f"[{time.time() - t_start:.0f}s]", flush=True)  # fmt: skip
        rows.append(row)
        (out_dir / "conv.sweep.json").write_text(json.dumps(rows, indent=1))
        torch.cuda.empty_cache()
    if args.match:
        return
    for net, shapes in (("rn50", resnet50_convs()), ("rn18", resnet18_convs())):
        tot = {"cudnn": 0.0, "torch": 0.0, "ours": 0.0, "ours_or_gemm": 0.0}
        for s in shapes:
            r = next(r for r in rows if (r["c"], r["o"], r["k"], r["stride"], r["h"],
                                         r["epilogue"]) == (s.c, s.o, s.k, s.stride, s.h,
                                                            s.epilogue))  # fmt: skip
            ours = r["best"]["ms"] if r["best"] else float("nan")
            tot["cudnn"] += r["cudnn_ms"] * s.count
            tot["torch"] += r["torch_ms"] * s.count
            tot["ours"] += ours * s.count
            tot["ours_or_gemm"] += min(ours, r.get("gemm_ms", ours)) * s.count
        print(net, {k: round(v, 4) for k, v in tot.items()})


if __name__ == "__main__":
    main()
