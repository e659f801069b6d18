"""Warm-up and the caches: compile ahead of time so that no request waits on a compile.

    python examples/warmup.py

On a GPU this compiles a few catalog ops at LLM shapes in two worker processes (into Triton's
cache under KERNFORGE_CACHE_DIR) and shows where each tuned config came from (the shipped
sm_90 table, so nothing is measured). On the CPU the same jobs run through Triton's
interpreter, which has nothing to compile, and the report says so. The command-line forms:

    kernforge warmup --ops rms_norm,matmul --shapes 2048x4096 --jobs 2
    kernforge warmup --model random:qwen2.5-1.5b
    kernforge cache info
    kernforge cache prune
"""

from __future__ import annotations

import torch

import kernforge  # noqa: F401  (registers the catalog)
from kernforge.tune import cache, warmup


def main() -> None:
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        dtype = "bfloat16"
        jobs = warmup.op_jobs(["rms_norm", "silu_and_mul"], [(2048, 4096)], dtype, on_gpu)
        jobs += warmup.op_jobs(["matmul"], [(2048, 4096, 4096)], dtype, on_gpu)
        jobs += warmup.op_jobs(["fmha_decode"], [(1, 4096)], dtype, on_gpu)
    else:
        dtype = "float16"  # the interpreter's Triton kernels take fp16 (bf16 math is not exact)
        jobs = warmup.op_jobs(["rms_norm", "silu_and_mul"], [(4, 64)], dtype, on_gpu)
    report = warmup.warmup(jobs, workers=2)
    print(report.summary())
    print("\nwhat is kept on disk:")
    for part in cache.info():
        size = cache.human(part.bytes)
        print(f"  {part.part:13s} {part.entries:6d} entries {size:>10s}  {part.path}")


if __name__ == "__main__":
    main()
