"""Varlen forward sweep (issue 6): the packed forward on the benchmark's mix of ten lengths
(16k tokens, 16 heads, head dim 128, bf16) over forward configs, with the tiles scheduled
costliest first (``attention_fwd.varlen_tiles``) and without, against the dense kernel on the
same sequences padded to the longest. Ratio = varlen TFLOP/s on real tokens / dense TFLOP/s on
everything it computes (the bar: >= 0.9). Times are CUDA-graph replays (no host sync).
Writes ``$OUT/varlen.json`` (benchmarks/results/attention_varlen.sweep.json holds a run).

    PYTHONPATH=src python3 benchmarks/varlen_sweep.py
"""

from __future__ import annotations

import json
import os

import torch
import triton

from kernforge import ops
from kernforge.bench.cases_attention import VARLEN_LENS as LENS
from kernforge.kernels import attention as A
from kernforge.kernels import attention_fwd as AF
from kernforge.kernels.attention import FwdConfig as F

H, D = 16, 128
CONFIGS = [None, F(128, 128, 8, 3, True), F(128, 128, 8, 3), F(128, 64, 8, 3, True),
           F(128, 64, 8, 3), F(64, 64, 4, 3, True), F(64, 64, 4, 3), F(64, 128, 4, 3, True),
           F(128, 128, 8, 2, True)]  # fmt: skip


def flops(lens, causal: bool) -> float:
    return sum(4 * H * n * n * D / (2 if causal else 1) for n in lens)


def graph_ms(fn) -> float:
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return triton.testing.do_bench(g.replay, warmup=25, rep=300)


def varlen_ms(causal: bool, cfg) -> float:
    total, longest = sum(LENS), max(LENS)
    q, k, v = (torch.randn(total, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(LENS).cumsum(0).tolist()], dtype=torch.int32,
                      device="cuda")  # fmt: skip

    def run():
        return ops.fmha_varlen(q, k, v, cu, cu, longest, longest, causal=causal)

    if cfg is None:
        return graph_ms(run)
    with A.force_config(fwd=cfg):
        return graph_ms(run)


def dense_ms(causal: bool) -> float:
    b, s = len(LENS), max(LENS)
    q, k, v = (torch.randn(b, H, s, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    return graph_ms(lambda: ops.fmha(q, k, v, causal=causal, layout="bhsd"))


def main() -> None:
    out = {}
    for causal in (False, True):
        dm = dense_ms(causal)
        dense_tf = flops((max(LENS),) * len(LENS), causal) / dm / 1e9
        res = {"dense_ms": dm, "dense_tflops": dense_tf}
        for sched in (True, False):
            AF.MAX_SCHEDULED_TILES = 4096 if sched else 0
            for cfg in CONFIGS if sched else [None]:
                ms = varlen_ms(causal, cfg)
                tf = flops(LENS, causal) / ms / 1e9
                res[f"sched={sched} {cfg}"] = {"ms": ms, "tflops": tf, "ratio": tf / dense_tf}
                print(causal, sched, cfg, res[f"sched={sched} {cfg}"], flush=True)
        AF.MAX_SCHEDULED_TILES = 4096
        out[f"causal={causal}"] = res
    with open(os.path.join(os.environ.get("OUT", "."), "varlen.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
