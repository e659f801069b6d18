"""Launch-size sweep of kf.jit's generated kernels on the GPU, and a host-time breakdown of
a cached call. Run on the device: ``PYTHONPATH=src python3 benchmarks/sweep_jit.py``.

Prints, per case, TB/s of each (rows-per-program or block, warps) variant next to
torch.compile of the same function, measured in the same process (results feed the defaults
in ``kernforge.codegen.triton.pointwise_launch`` / ``rows_launch``; see NOTES.md).
"""

from __future__ import annotations

import time

import torch
import triton.testing

from kernforge.bench import jit_cases as jc
from kernforge.codegen import triton as cg
from kernforge.frontend.jit import jit

SHAPE = (32768, 4096)


def tbs(f, args, nbytes: int) -> float:
    ms = triton.testing.do_bench(lambda: f(*args), warmup=25, rep=150, return_mode="median")
    return nbytes / (ms * 1e-3) / 1e12


def sweep() -> None:
    m, n = SHAPE
    cases = [
        ("rms_norm", jc._xw, jc.rms_norm_np, jc.rms_norm_torch, 2),
        ("layer_norm", jc._xwb, jc.layer_norm_np, jc.layer_norm_torch, 2),
        ("gelu_tanh", jc._x, jc.gelu_tanh_np, jc.gelu_tanh_torch, 2),
    ]
    rows_variants = [(1, 4), (1, 8), (1, 16), (2, 8), (2, 16), (4, 16), (4, 32)]
    point_variants = [(1024, 4), (2048, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 16)]
    orig_rows, orig_point = cg.rows_launch, cg.pointwise_launch
    for name, build, np_fn, torch_fn, streams in cases:
        args = build(SHAPE, torch.bfloat16, "cuda")
        nbytes = streams * m * n * 2
        comp = torch.compile(torch_fn, dynamic=False)
        line = [f"{name}: compile {tbs(comp, args, nbytes):.3f}"]
        line.append(f"default {tbs(jit(np_fn), args, nbytes):.3f}")
        variants = point_variants if name == "gelu_tanh" else rows_variants
        for a, b in variants:
            if name == "gelu_tanh":
                cg.pointwise_launch = lambda n_, i_, a=a, b=b: (a, b)
            else:
                cg.rows_launch = lambda R, C, e, s, i, a=a, b=b: (a, 4096, b)
            line.append(f"{a}/{b} {tbs(jit(np_fn), args, nbytes):.3f}")
            cg.rows_launch, cg.pointwise_launch = orig_rows, orig_point
        print(" | ".join(line), flush=True)


def host_breakdown(calls: int = 3000) -> None:
    x, w, g = jc._xwg((8, 128), torch.float32, "cuda")
    f = jit(jc.rmsnorm_gate_np)
    f(x, w, g)
    (entry,) = f._cache.values()
    prog = entry.program
    (step,) = prog.steps
    out = torch.empty_like(x)
    k = step.compiled
    from triton.runtime import driver

    stream = driver.active.get_current_stream(0)

    def per(fn) -> float:
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / calls * 1e6

    from triton import knobs

    print("hooks:", knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
    print(f"kf.jit call         {per(lambda: f(x, w, g)):.2f} us")
    print(f"program.run         {per(lambda: prog.run([x, w, g])):.2f} us")
    print(
        f"compiled.run direct {per(lambda: k.run(*step.grid, 1, 1, stream, k.function, k.packed_metadata, None, None, None, x, w, g, out)):.2f} us"
    )  # noqa: E501
    print(
        f"JITFunction launch  {per(lambda: step.fn[step.grid](x, w, g, out, num_warps=step.num_warps)):.2f} us"
    )  # noqa: E501
    print(f"torch.empty cuda    {per(lambda: torch.empty((8, 128), device='cuda')):.2f} us")
    print(f"torch.add           {per(lambda: torch.add(x, g)):.2f} us")


if __name__ == "__main__":
    host_breakdown()
    sweep()
