"""GEMV configs in LLM-decode conditions: each shape's GEMV over several distinct weights in one
CUDA graph (as the layers of a decode step; weights read once, no L2 flush between calls), 40
configs x K splits against cuBLAS, at the Qwen2.5-1.5B and Llama-3-8B projection shapes for M = 1
and 8. Writes gemv_decode.json (TB/s of weight bytes per variant) to $OUT or here; its result
chose kernels.linear.DECODE.

    PYTHONPATH=src python3 benchmarks/gemv_decode_sweep.py
"""

import itertools
import json
import os
import statistics

import torch
import torch.nn.functional as F

from kernforge import device
from kernforge.kernels import linear as L

SHAPES = {
    "qwen": [(1792, 1536), (1536, 1536), (17920, 1536), (1536, 8960), (151936, 1536)],
    "llama": [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096)],
}
sms = device.num_sms(0)
cfgs = [
    L.GemvConfig(r, u, wn, wk, 1, p)
    for r, u, (wn, wk), p in itertools.product(
        (1, 2), (2, 4), ((1, 4), (1, 8), (2, 4), (4, 2), (2, 2)), (0, 1)
    )
]


def graph_time(fn):
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(3):
        g.replay()
    ts = []
    for _ in range(15):
        a = torch.cuda.Event(True)
        b = torch.cuda.Event(True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


res = {}
for fam, shapes in SHAPES.items():
    for n, k in shapes:
        copies = max(2, min(28, int(600e6 // (n * k * 2))))
        Ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        for m in (1, 8):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            byts = n * k * 2 * copies
            row = {}
            ms = graph_time(lambda: [F.linear(x, W) for W in Ws])
            row["cublas"] = byts / ms / 1e9
            for cfg in cfgs + [None]:
                for sp in (None, 1, 2, 4):
                    if cfg is not None and sp is not None:
                        continue
                    c = cfg or L.DEFAULTS[8]
                    p = L.plan(m, n, k, sms, c, splits=sp)
                    try:
                        ms = graph_time(lambda: [L.gemv(x, W, None, out, p) for W in Ws])
                    except Exception as e:
                        print("ERR", c, e)
                        continue
                    row[f"{c}|s{p.splits}" + ("" if sp is None else "!")] = byts / ms / 1e9
            best = sorted(row.items(), key=lambda kv: -kv[1])[:5]
            dflt = row.get(f"{L.DEFAULTS[8]}|s{L.plan(m, n, k, sms).splits}")
            print(
                f"{fam} m={m} N={n} K={k} copies={copies}: cublas {row['cublas']:.2f} default {dflt} TB/s; best:",
                flush=True,
            )
            for kk, v in best:
                print(f"    {v:.2f}  {kk}")
            res[f"{m}x{n}x{k}"] = row
json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "gemv_decode.json"), "w"), indent=1)
