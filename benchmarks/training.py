"""Training-step benchmark of issue 7: a Llama-shaped ~1B model, Hugging Face eager vs patched.

The model (hidden 2048, intermediate 8192, 16 layers, 32 heads, 8 KV heads, vocab 128256, as
Llama-3.2-1B) is built from a config with random weights in bf16 on the GPU; AdamW; batch 4 x 2048
tokens (one fixed batch, so the loss falls and the trajectories can be compared); 20 steps. Each
variant runs in its own process so its peak memory is its own:

- ``hf_eager``: unpatched transformers, SDPA attention (the reference of the bar);
- ``kernforge``: the same model after ``kernforge.patch(model)``;
- ``torch_compile``: ``torch.compile`` of the unpatched model (reported; compile time too).

tokens/s = tokens per step / median step time over the steps after ``--warmup``; peak memory =
``torch.cuda.max_memory_allocated`` over all steps (optimizer state included). Also measures the
fused linear cross-entropy alone (``kernforge.bench.cases_losses.measure_flce``). Writes
``training.json`` and ``training.md`` to ``--out`` (default ``benchmarks/results``).

    PYTHONPATH=src python3 benchmarks/training.py [--variants hf_eager,kernforge] [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VARIANTS = ("hf_eager", "kernforge", "torch_compile")
MODEL = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
)
BATCH, SEQ, LR = 4, 2048, 1e-4
BARS = {"tokens_per_s_vs_hf_eager": 1.35, "peak_memory_vs_hf_eager": 0.5}


def _categories(name: str) -> str:
    n = name.lower()
    for cat, keys in (
        ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "matmul", "cublas")),
        ("attention", ("flash", "fmha", "attn", "attention", "cudnn")),
        ("optimizer", ("multi_tensor", "adam", "foreach")),
        ("cross_entropy", ("cross_entropy", "log_softmax", "nll", "softmax")),
        ("norm", ("rms", "norm")),
        ("rope", ("rope", "rotary")),
        ("glu", ("glu", "silu", "swiglu")),
        ("reduce", ("reduce",)),
        ("copy", ("copy", "cat", "fill", "memset", "memcpy")),
    ):
        if any(k in n for k in keys):
            return cat
    return "elementwise/other"


def _profile(step, out_dir: Path, variant: str) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    per_kernel: dict[str, float] = {}
    per_cat: dict[str, float] = {}
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)
        if us <= 0 or e.key.startswith("ProfilerStep"):
            continue
        per_kernel[e.key] = per_kernel.get(e.key, 0.0) + us / 1e3
    # key_averages also lists CPU ops with their child kernels' time: keep kernels only
    kernels = {k: v for k, v in per_kernel.items() if not k.startswith("aten::")}
    for k, v in kernels.items():
        per_cat[_categories(k)] = per_cat.get(_categories(k), 0.0) + v
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:40]
    lines = [f"{v:9.3f} ms  {k[:150]}" for k, v in top]
    (out_dir / f"profile_{variant}.txt").write_text("\n".join(lines) + "\n")
    return {"ms_by_category": dict(sorted(per_cat.items(), key=lambda kv: -kv[1])),
            "kernel_ms_total": sum(kernels.values())}  # fmt: skip


def worker(variant: str, steps: int, warmup: int, tied: bool, profile: bool, out: Path) -> dict:
    """Run one variant in this process; return its measurements."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**MODEL, tie_word_embeddings=tied)
    cfg._attn_implementation = "sdpa"
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    if variant == "kernforge":
        import kernforge

        kernforge.patch(model)
    fwd = torch.compile(model) if variant == "torch_compile" else model
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    g = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(0, MODEL["vocab_size"], (BATCH, SEQ), device="cuda", generator=g)

    def step() -> torch.Tensor:
        loss = fwd(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    # Steps run back to back, as in a training loop that reads the loss only now and then: the
    # events time each step on the GPU's stream, and nothing syncs until the end (except the
    # warm-up steps, which compile and tune).
    events, loss_t = [], []
    t_start = time.perf_counter()
    for i in range(steps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        loss_t.append(step())
        b.record()
        events.append((a, b))
        if i < warmup:
            torch.cuda.synchronize()
            print(f"[{variant}] warm-up step {i + 1}: {a.elapsed_time(b):.1f} ms", flush=True)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t_start
    times = [a.elapsed_time(b) for a, b in events]
    losses = [float(x) for x in loss_t]
    print(f"[{variant}] steps (ms): {[round(t, 1) for t in times]}", flush=True)
    peak = torch.cuda.max_memory_allocated()
    ms = statistics.median(times[warmup:])
    res = {
        "variant": variant,
        "params": n_params,
        "step_ms_median": ms,
        "step_ms": times,
        "tokens_per_s": BATCH * SEQ / (ms / 1e3),
        "peak_memory_gb": peak / 1e9,
        "model_and_data_gb": base / 1e9,
        "losses": losses,
        "first_step_s": times[0] / 1e3,
        "wall_s": wall,
    }
    if profile:
        res["profile"] = _profile(step, out, variant)
    return res


def _environment() -> dict:
    import torch
    import transformers
    import triton

    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "date": time.strftime("%Y-%m-%d"),
    }


def _markdown(doc: dict) -> str:
    rows = ["| variant | tokens/s | vs HF eager | peak GB | vs HF eager | step ms | first step s "
            "| final loss |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    ref = doc["variants"].get("hf_eager")
    ok = ref is not None and "error" not in ref
    for name, r in doc["variants"].items():
        if "error" in r:
            rows.append(f"| {name} | error: {r['error'][:80]} | | | | | | |")
            continue
        sp = r["tokens_per_s"] / ref["tokens_per_s"] if ok else float("nan")
        mem = r["peak_memory_gb"] / ref["peak_memory_gb"] if ok else float("nan")
        cells = [name, f"{r['tokens_per_s']:.0f}", f"{sp:.3f}x", f"{r['peak_memory_gb']:.2f}",
                 f"{mem:.3f}x", f"{r['step_ms_median']:.1f}", f"{r['first_step_s']:.1f}",
                 f"{r['losses'][-1]:.4f}"]  # fmt: skip
        rows.append("| " + " | ".join(cells) + " |")
    lines = [f"# Training step: Llama-shaped model ({doc['model']['params'] / 1e9:.2f}B params), "
             f"batch {BATCH} x {SEQ}, bf16, AdamW", "", f"Environment: {doc['environment']}", "",
             *rows, ""]  # fmt: skip
    for bar in doc.get("bars", []):
        lines.append(f"- {bar['name']}: {bar['value']:.3f} (target {bar['op']} {bar['target']}): "
                     f"{'met' if bar['met'] else 'MISSED'}")  # fmt: skip
    if "flce" in doc:
        lines += ["", "## Fused linear cross-entropy alone", "", "```",
                  json.dumps(doc["flce"], indent=1), "```"]  # fmt: skip
    if "loss_max_abs_diff_vs_hf_eager" in doc:
        steps = len(ref["losses"])
        lines.append(f"- loss trajectory, max |kernforge - HF eager| over {steps} steps: "
                     f"{doc['loss_max_abs_diff_vs_hf_eager']:.4f}")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default="hf_eager,kernforge,torch_compile")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--untied", action="store_true", help="separate lm_head (default: tied)")
    p.add_argument("--profile", action="store_true", help="profile one extra step per variant")
    p.add_argument("--no-flce", action="store_true", help="skip the fused-loss measurement")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.worker:
        res = worker(a.worker, a.steps, a.warmup, not a.untied, a.profile, out)
        Path(a.result).write_text(json.dumps(res))
        return
    doc: dict = {"environment": _environment(), "variants": {},
                 "model": {**MODEL, "tie_word_embeddings": not a.untied, "batch": BATCH,
                           "seq": SEQ, "optimizer": f"torch.optim.AdamW(lr={LR})"}}  # fmt: skip
    for v in a.variants.split(","):
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            res_path = f.name
        cmd = [sys.executable, __file__, "--worker", v, "--result", res_path, "--out", str(out),
               "--steps", str(a.steps), "--warmup", str(a.warmup)]  # fmt: skip
        cmd += ["--untied"] * a.untied + ["--profile"] * a.profile
        t0 = time.time()
        proc = subprocess.run(cmd, env=os.environ.copy())
        if proc.returncode != 0:
            doc["variants"][v] = {"error": f"exit {proc.returncode}"}
            continue
        doc["variants"][v] = json.loads(Path(res_path).read_text())
        doc["variants"][v]["process_s"] = time.time() - t0
        doc["model"]["params"] = doc["variants"][v]["params"]
    ref, kf = doc["variants"].get("hf_eager"), doc["variants"].get("kernforge")
    if ref and kf and "error" not in ref and "error" not in kf:
        speed = kf["tokens_per_s"] / ref["tokens_per_s"]
        mem = kf["peak_memory_gb"] / ref["peak_memory_gb"]
        doc["bars"] = [
            {"name": "tokens/s vs HF eager", "value": speed, "op": ">=",
             "target": BARS["tokens_per_s_vs_hf_eager"],
             "met": speed >= BARS["tokens_per_s_vs_hf_eager"]},
            {"name": "peak memory vs HF eager", "value": mem, "op": "<=",
             "target": BARS["peak_memory_vs_hf_eager"],
             "met": mem <= BARS["peak_memory_vs_hf_eager"]},
        ]  # fmt: skip
        doc["loss_max_abs_diff_vs_hf_eager"] = max(
            abs(x - y) for x, y in zip(kf["losses"], ref["losses"], strict=True)
        )
    if not a.no_flce:
        import torch

        from kernforge.bench.cases_losses import measure_flce

        doc["flce"] = measure_flce()
        torch.cuda.empty_cache()
    (out / "training.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "training.md").write_text(_markdown(doc))
    print(_markdown(doc))


if __name__ == "__main__":
    main()
