"""ops.fused_linear against the unfused sequence it replaces, per Qwen2.5-1.5B decode projection
(M = 1 and 8, bf16): each variant over 28 distinct weights (4 for the head) in one CUDA graph of
dependent launches, as a decode step runs them (weights read once, no L2 flush in between).
Reports microseconds per call and the registers of each GEMV variant; writes
fused_linear.{json,md} to --out (default: benchmarks/results).

    PYTHONPATH=src python3 benchmarks/fused_linear.py
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from kernforge import ops
from kernforge.kernels import linear as L
from kernforge.kernels.common import dependent_launches

HERE = Path(__file__).resolve().parent
DT = torch.bfloat16
H, I, NQKV, V, LAYERS, HEADS = 1536, 8960, 2048, 151936, 28, 4


def graph_us(fn, reps: int = 20) -> float:
    """Median event time of one replay of ``fn`` captured as a graph, in microseconds."""
    with dependent_launches(True):
        fn()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
    for _ in range(3):
        g.replay()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(True), torch.cuda.Event(True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3)
    return statistics.median(ts)


def rnd(*shape, scale=1.0):
    return (torch.randn(*shape, device="cuda") * scale).to(DT)


def bench(m: int) -> dict[str, float]:
    h, r, o_in, act = rnd(m, H), rnd(m, H), rnd(m, H), rnd(m, I)
    nw = [1 + 0.1 * rnd(H) for _ in range(LAYERS)]
    wq = [rnd(NQKV, H, scale=0.02) for _ in range(LAYERS)]
    bq = [rnd(NQKV) for _ in range(LAYERS)]
    wo = [rnd(H, H, scale=0.02) for _ in range(LAYERS)]
    wg = [rnd(2 * I, H, scale=0.02) for _ in range(LAYERS)]
    wd = [rnd(H, I, scale=0.02) for _ in range(LAYERS)]
    wh = rnd(V, H, scale=0.02)
    L_ = range(LAYERS)
    cases = {
        "qkv: rms_norm(+res), linear": lambda: [
            ops.linear(ops.rms_norm(h, nw[i], 1e-6, residual=r)[0], wq[i], bq[i]) for i in L_],
        "qkv: linear alone": lambda: [ops.linear(h, wq[i], bq[i]) for i in L_],
        "qkv: fused_linear(norm)": lambda: [ops.fused_linear(h, wq[i], bq[i], nw[i]) for i in L_],
        "o: linear": lambda: [ops.linear(o_in, wo[i]) for i in L_],
        "o: fused_linear(residual)": lambda: [
            ops.fused_linear(o_in, wo[i], residual=h) for i in L_],
        "gate/up: rms_norm(+res), linear, silu_and_mul": lambda: [
            ops.silu_and_mul(ops.linear(ops.rms_norm(h, nw[i], 1e-6, residual=r)[0], wg[i]))
            for i in L_],
        "gate/up: linear alone": lambda: [ops.linear(h, wg[i]) for i in L_],
        **{f"gate/up: GEMV with the norm, KF_RMS={mode}": lambda mode=mode: [
            L.gemv(h, wg[i], None, torch.empty(m, 2 * I, dtype=DT, device="cuda"),
                   norm_weight=nw[i], eps=1e-6, norm_mode=mode) for i in L_]
           for mode in (1, 2)},
        "gate/up: fused_linear(swiglu)": lambda: [
            ops.fused_linear(h, wg[i], swiglu=True) for i in L_],
        "gate/up: fused_linear(norm, swiglu)": lambda: [
            ops.fused_linear(h, wg[i], None, nw[i], swiglu=True) for i in L_],
        "down: linear": lambda: [ops.linear(act, wd[i]) for i in L_],
        "down: fused_linear(residual)": lambda: [
            ops.fused_linear(act, wd[i], residual=h) for i in L_],
        "head: rms_norm(+res), linear": lambda: [
            ops.linear(ops.rms_norm(h, nw[0], 1e-6, residual=r)[0], wh) for _ in range(HEADS)],
        "head: linear alone": lambda: [ops.linear(h, wh) for _ in range(HEADS)],
        **{f"head: GEMV with the norm, KF_RMS={mode}": lambda mode=mode: [
            L.gemv(h, wh, None, torch.empty(m, V, dtype=DT, device="cuda"), norm_weight=nw[0],
                   eps=1e-6, norm_mode=mode) for _ in range(HEADS)]
           for mode in (1, 2)},
        "head: fused_linear(norm)": lambda: [
            ops.fused_linear(h, wh, None, nw[0]) for _ in range(HEADS)],
        "rms_norm(+res) alone": lambda: [ops.rms_norm(h, nw[i], 1e-6, residual=r) for i in L_],
    }  # fmt: skip
    out = {}
    for name, fn in cases.items():
        calls = HEADS if name.startswith("head") else LAYERS
        out[name] = graph_us(fn) / calls
        print(f"M={m} {name:48s} {out[name]:7.2f} us", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args()
    times = {m: bench(m) for m in (1, 8)}
    regs = {}
    FUSIONS = (L.Fusion(), L.Fusion(rms=1), L.Fusion(rms=2), L.Fusion(glu=True),
               L.Fusion(res=True))  # fmt: skip
    for mt in (8, 16):
        for cfg in sorted({*L.DEFAULTS.values(), *L.TUNED.values()}, key=repr):
            for f in FUSIONS:
                a = L.gemv_kernel(DT, mt, cfg, pdl=True, fusion=f).attributes(0)
                regs[f"MT={mt} {cfg} {f}"] = a["num_regs"]
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fused_linear.json").write_text(
        json.dumps({"env": env, "us_per_call": times, "registers": regs}, indent=1))
    lines = ["# fused_linear vs the unfused sequence (Qwen2.5-1.5B decode projections)", "",
             f"Environment: {env}. Microseconds per call, bf16, in a CUDA graph of dependent "
             f"launches over {LAYERS} distinct weights ({HEADS} for the head).", "",
             "| call | M = 1 | M = 8 |", "|---|---|---|"]  # fmt: skip
    for name in times[1]:
        lines.append(f"| {name} | {times[1][name]:.2f} | {times[8][name]:.2f} |")
    lines += ["", "Registers per thread of the GEMV variants:", ""]
    lines += [f"- {k}: {v}" for k, v in regs.items()]
    (args.out / "fused_linear.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
