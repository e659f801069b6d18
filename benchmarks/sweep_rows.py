"""Sweep launch sizes of the row kernels on the GPU and print the best per kernel and shape.

Run on a GPU from the repo root:  PYTHONPATH=src python3 benchmarks/sweep_rows.py [kernel ...]
Each kernel named in SWEEPS is timed (bf16, the benchmark shapes) with every (BLOCK_M,
num_warps) candidate forced through ``kernels.common.TUNED`` (and, for persistent backward
kernels, every programs-per-SM and num_stages); the winners go into ``TUNED`` by hand.
"""

from __future__ import annotations

import json
import sys

import torch
import triton

from kernforge.bench.harness import time_fn
from kernforge.bench.suites import cases_for
from kernforge.kernels import common

# kernel name -> (bench family, bench op, direction, persistent: loops over rows)
SWEEPS = {
    "rms_norm_fwd": ("rms_norm", "rms_norm", "fwd", False),
    "rms_norm_bwd": ("rms_norm", "rms_norm", "bwd", True),
    "layer_norm_fwd": ("layer_norm", "layer_norm", "fwd", False),
    "layer_norm_bwd": ("layer_norm", "layer_norm", "bwd", True),
    "softmax_fwd": ("softmax", "softmax", "fwd", False),
    "softmax_bwd": ("softmax", "softmax", "bwd", False),
}
BLOCK_M = [1, 2, 4]
WARPS = [4, 8, 16, 32]
# Backward kernels (a loop over rows): a narrower grid of tiles, times programs and stages.
BWD_BLOCK_M = [1]  # 2 spilled registers at both shapes (H100 sweep)
BWD_WARPS = [8, 16, 32]
PER_SM = [1, 2]
STAGES = [1, 2]


def _extra(persistent: bool):
    """(programs per SM, num_stages) candidates: only backward kernels loop over rows."""
    if not persistent:
        return [(2, 1)]
    return [(p, st) for p in PER_SM for st in STAGES]


def sweep(kernel: str) -> list[dict]:
    family, op, direction, persistent = SWEEPS[kernel]
    rows = []
    for case in cases_for([family], on_gpu=True, with_compile=False):
        if case.op != op or case.direction != direction:
            continue
        n = case.shape[-1]
        block_n = triton.next_power_of_2(n)
        impls, _ = case.make()
        best = None
        for bm in BWD_BLOCK_M if persistent else BLOCK_M:
            for w in BWD_WARPS if persistent else WARPS:
                if bm * block_n > 65536 or bm * block_n < 32 * w:
                    continue
                for per_sm, st in _extra(persistent):
                    launch = common.RowLaunch(bm, block_n, w, st, per_sm)
                    common.TUNED[(kernel, block_n, 2)] = launch
                    try:
                        ms = time_fn(impls["kernforge"], True, rep_ms=100)
                    except Exception as exc:  # e.g. out of registers/shared memory
                        print(f"  {kernel} {case.shape} bm={bm} w={w}: {type(exc).__name__}")
                        continue
                    tbs = case.nbytes / (ms * 1e-3) / 1e12
                    row = {"kernel": kernel, "shape": list(case.shape), "block_m": bm,
                           "num_warps": w, "num_stages": st, "per_sm": per_sm,
                           "tbs": round(tbs, 4)}  # fmt: skip
                    rows.append(row)
                    if best is None or tbs > best["tbs"]:
                        best = row
        common.TUNED.pop((kernel, block_n, 2), None)
        print(f"BEST {kernel} {case.shape}: {best}", flush=True)
        del impls
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str]) -> None:
    kernels = argv or list(SWEEPS)
    rows = [r for k in kernels for r in sweep(k)]
    out = "sweep_rows.json"
    with open(out, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"wrote {out} ({len(rows)} rows)")


if __name__ == "__main__":
    main(sys.argv[1:])
