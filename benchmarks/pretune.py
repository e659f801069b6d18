"""Fill the pre-tuned table of this GPU's arch (kernforge/tune/pretuned/<arch>.json). GPU only.

Runs the catalog's tuned kernels over common LLM/CNN shape buckets in a fresh tuning cache, so
that every key is measured once (the tuner's forced measurement: all candidate configs, CUDA
graph replays), then exports the on-disk choices with ``kernforge tune --export``, merged with
the table already there. Shapes go in priority order (the cold-start benchmark's first), and
the run stops taking new ones after ``--budget-s`` seconds::

    PYTHONPATH=src python3 benchmarks/pretune.py --budget-s 270 --out /tmp/sm_90.json

Shapes: matmul at the Llama-3-8B, Qwen2.5-1.5B and Qwen2.5-7B projections (M buckets 1 ..
16384, the nn.Linear weight layout; the row-major layout at the common ones), ResNet-50's 1x1
convolutions as GEMMs (batch 32, channels-last); fp8 at the Llama projections; grouped GEMM at
Mixtral-8x7B, Qwen1.5-MoE and Qwen3-30B-A3B experts; decode attention at the heads of
Qwen2.5-1.5B (12/2), Llama-3-8B (32/8) and Qwen2.5-7B (28/4), contiguous and paged caches.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

LLAMA8B = ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336))
QWEN15B = ((2048, 1536), (1536, 1536), (17920, 1536), (1536, 8960))
QWEN7B = ((4608, 3584), (3584, 3584), (37888, 3584), (3584, 18944))
#: ResNet-50 bottleneck 1x1 convolutions at batch 32: (M = 32*H*W, Cout, Cin).
RESNET50 = ((100352, 64, 256), (100352, 256, 64), (25088, 128, 512), (25088, 512, 128),
            (6272, 256, 1024), (6272, 1024, 256), (1568, 512, 2048), (1568, 2048, 512))  # fmt: skip
#: (query heads, KV heads) of the decode models (head dim 128).
DECODE_HEADS = {"qwen2.5-1.5b": (12, 2), "llama3-8b": (32, 8), "qwen2.5-7b": (28, 4)}


def tasks():
    """(label, callable) in priority order."""
    import torch

    from kernforge import ops
    from kernforge.kernels import grouped_gemm

    dev, bf16 = torch.device("cuda"), torch.bfloat16

    def mm(m, n, k, layouts=("w",)):
        def run():
            a = torch.randn(m, k, device=dev, dtype=bf16)
            for lay in layouts:
                b = (torch.randn(n, k, device=dev, dtype=bf16).t() if lay == "w"
                     else torch.randn(k, n, device=dev, dtype=bf16))  # fmt: skip
                ops.matmul(a, b)

        return f"matmul {m}x{n}x{k} {'+'.join(layouts)}", run

    def fp8(m, n, k):
        def run():
            a, sa = ops.quantize_fp8(torch.randn(m, k, device=dev), axis=1)
            b, sb = ops.quantize_fp8(torch.randn(n, k, device=dev).t(), axis=0)
            ops.fp8_matmul(a, b, sa, sb, out_dtype=bf16)

        return f"fp8_matmul {m}x{n}x{k}", run

    def grouped(t, n, k, g, dw=False):
        def run():
            if dw:
                grouped_gemm._tune_cli((t, n, k, g), bf16)
                return
            x = torch.randn(t, k, device=dev, dtype=bf16)
            w = torch.randn(g, n, k, device=dev, dtype=bf16)
            sizes = torch.bincount(torch.randint(0, g, (t,), device=dev), minlength=g)
            ops.grouped_gemm(x, w, sizes.to(torch.int32))

        return f"grouped_gemm {t}x{n}x{k}x{g}{' +dw' if dw else ''}", run

    def decode(model, b, ctx, page=0):
        hq, hk = DECODE_HEADS[model]

        def run():
            q = torch.randn(b, 1, hq, 128, device=dev, dtype=bf16)
            lens = torch.full((b,), ctx, dtype=torch.int32, device=dev)
            if page:
                pages = b * -(-ctx // page)
                k = torch.randn(pages, page, hk, 128, device=dev, dtype=bf16)
                table = torch.randperm(pages, device=dev).view(b, -1).to(torch.int32)
            else:
                k, table = torch.randn(b, ctx, hk, 128, device=dev, dtype=bf16), None
            ops.fmha_decode(q, k, torch.randn_like(k), lens, table)

        return f"fmha_decode {model} {b}x{ctx}{f' page {page}' if page else ''}", run

    # 1: what benchmarks/coldstart.py calls, and the LLM benchmark model's decode.
    out = [mm(2048, n, k, ("w", "r")) for n, k in LLAMA8B]
    out += [decode("qwen2.5-1.5b", b, 4096) for b in (1, 2, 4, 8, 16)]
    out += [fp8(4096, 4096, 4096), fp8(2048, 4096, 4096)]
    out += [grouped(16384, 28672, 4096, 8, dw=True), grouped(16384, 4096, 14336, 8)]
    out += [decode("llama3-8b", b, 4096) for b in (1, 16)]
    # 2: the common LLM buckets.
    out += [mm(m, n, k) for m in (128, 8192, 1, 16, 512) for n, k in LLAMA8B]
    out += [mm(m, n, k) for m in (1, 16, 128, 512, 2048, 8192) for n, k in QWEN15B]
    out += [decode("llama3-8b", b, ctx) for b in (4, 64) for ctx in (4096,)]
    out += [decode(md, b, 4096, 64) for md in ("qwen2.5-1.5b", "llama3-8b") for b in (1, 16)]
    out += [fp8(m, n, k) for m in (128, 8192) for n, k in LLAMA8B]
    out += [grouped(65536, 2816, 2048, 64), grouped(65536, 2048, 1408, 64),
            grouped(16384, 1536, 2048, 128), grouped(16384, 2048, 768, 128),
            grouped(512, 28672, 4096, 8), grouped(512, 4096, 14336, 8)]  # fmt: skip
    out += [mm(m, n, k) for m, n, k in RESNET50]
    out += [mm(m, n, k) for m in (64, 256, 1024, 4096, 16384) for n, k in LLAMA8B]
    out += [decode("llama3-8b", b, ctx) for b in (1, 16, 64) for ctx in (1024, 8192, 32768)]
    out += [decode("qwen2.5-7b", b, 4096) for b in (1, 4, 16)]
    out += [mm(m, n, k) for m in (128, 2048, 8192) for n, k in QWEN7B]
    out += [mm(m, n, k, ("r",)) for m in (128, 8192) for n, k in LLAMA8B]
    out += [fp8(m, n, k) for m in (1024, 16384) for n, k in LLAMA8B]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget-s", type=float, default=270.0, help="stop starting shapes after")
    p.add_argument("--out", help="table to write (default: the shipped one)")
    p.add_argument("--log", help="JSON log of the shapes tuned")
    p.add_argument("--cache-dir", help="tuning cache (default: a fresh temporary folder)")
    args = p.parse_args()
    cache = Path(args.cache_dir or tempfile.mkdtemp(prefix="kf_pretune_"))
    os.environ["KERNFORGE_CACHE_DIR"] = str(cache)
    os.environ["KERNFORGE_PRETUNED"] = "0"  # measure every key, whatever is shipped
    os.environ["KERNFORGE_TUNE"] = "auto"
    import torch

    import kernforge  # noqa: F401
    from kernforge import device, tune
    from kernforge.tune import pretuned

    if not torch.cuda.is_available() or device.INTERPRET:
        print("pretune: needs a CUDA GPU", file=sys.stderr)
        return 2
    arch = device.arch()
    out = Path(args.out) if args.out else pretuned.table_path(arch)
    shipped = pretuned.table_path(arch)
    if out != shipped and shipped.exists() and not out.exists():
        shutil.copyfile(shipped, out)  # merge with what is shipped
    start = time.perf_counter()
    log = []
    todo = tasks()
    for i, (label, run) in enumerate(todo):
        elapsed = time.perf_counter() - start
        if elapsed > args.budget_s:
            log.append({"task": label, "skipped": True})
            continue
        before = dict(tune.stats)
        t0 = time.perf_counter()
        err = ""
        try:
            run()
            torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001  (logged; the rest go on)
            err = f"{type(exc).__name__}: {exc}"[:300]
        picks = {k: v - before.get(k, 0) for k, v in tune.stats.items() if v != before.get(k, 0)}
        dt = time.perf_counter() - t0
        log.append({"task": label, "s": round(dt, 2), "picks": picks, "error": err})
        print(f"[pretune {i + 1}/{len(todo)} {elapsed + dt:6.1f}s] {label}: {dt:.1f} s "
              f"{picks} {err}", flush=True)  # fmt: skip
    path, changed = pretuned.export(arch, out)
    sizes = pretuned.size(path)
    done = sum(1 for e in log if not e.get("skipped"))
    print(f"pretune: {done}/{len(todo)} shapes in {time.perf_counter() - start:.0f} s; "
          f"{changed} keys exported to {path}: {sizes}", flush=True)  # fmt: skip
    if args.log:
        Path(args.log).write_text(json.dumps({"device": device.describe(), "tasks": log,
                                              "table": sizes}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
