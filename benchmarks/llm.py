"""LLM generation benchmark of issue 8: kernforge.llm against Hugging Face eager generation.

Models (random weights, bf16, built from kernforge.llm's presets): ``qwen2.5-1.5b`` (hidden
1536, 28 layers, 12 heads, 2 KV heads, intermediate 8960, vocab 151936, tied) and
``llama3-8b``. For each: prompts of 128 random tokens, 256 new tokens (greedy, end-of-sequence
ignored), batch sizes 1 / 8 / 64 (8B: 1 and 8); prefill of 1 x 512 tokens. Hugging Face eager
runs the same weights (``hf_state_dict``: shared storage, gate/up copied) in the same process,
for fewer new tokens (``--hf-new-tokens``, default 64: its per-token time is host-bound and
flat).

Decode tokens/s = rows x decode steps / decode wall time (after the first token, host included:
the whole ``generate`` loop), the median of ``--decode-reps`` generations (default 3) after a
warm-up call; time to first token = prefill + first sample, the median over the same runs.
The bandwidth roofline of a decode step is the bytes it must read (weights + the KV cache at
mid-generation) over the measured copy bandwidth. Writes llm.json and llm.md.

    PYTHONPATH=src python3 benchmarks/llm.py [--models qwen2.5-1.5b,llama3-8b] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
BARS = {
    ("qwen2.5-1.5b", "decode_tok_s", 1): 650.0,
    ("qwen2.5-1.5b", "decode_tok_s", 8): 4000.0,
    ("qwen2.5-1.5b", "prefill_512_ms", 1): 10.0,
    ("llama3-8b", "decode_tok_s", 1): 150.0,
}
BATCHES = {"qwen2.5-1.5b": (1, 8, 64), "llama3-8b": (1, 8)}


def prefill_flops(cfg, tokens: int) -> float:
    """GEMM FLOPs of a prefill: every weight but the embedding, per token (the head runs on the
    last token only; attention's own FLOPs are left out)."""
    return 2.0 * (cfg.num_params() - cfg.vocab_size * cfg.hidden_size) * tokens


def _sync_time(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return out


def bench_kernforge(name: str, args, bw: float) -> tuple[dict, object]:
    from kernforge import checks
    from kernforge.llm import LLM

    t = time.perf_counter()
    llm = LLM(f"random:{name}", max_seq_len=1024, paged=args.paged)
    load_s = time.perf_counter() - t
    cfg = llm.config
    gen = torch.Generator().manual_seed(0)
    weights = llm.decoder.weights.nbytes()
    kv_per_token = 2 * cfg.num_layers * cfg.kv_size * 2
    rows = []
    for b in BATCHES[name]:
        prompts = torch.randint(0, cfg.vocab_size, (b, args.prompt), generator=gen).tolist()
        llm.generate(prompts, max_new_tokens=8, ignore_eos=True)  # capture this bucket's graphs
        runs = [llm.generate(prompts, max_new_tokens=args.new_tokens, ignore_eos=True)
                for _ in range(args.decode_reps)]  # fmt: skip
        rates = [b * r.stats.decode_steps / r.stats.decode_s for r in runs]
        out = runs[rates.index(statistics.median_high(rates))]  # the median run
        s = out.stats
        tok_s = b * s.decode_steps / s.decode_s
        ctx = args.prompt + args.new_tokens // 2
        step_bytes = weights + b * ctx * kv_per_token
        roof = b * bw / step_bytes
        ttft = statistics.median(r.stats.time_to_first_token_s for r in runs)
        rows.append(dict(batch=b, ttft_ms=1e3 * ttft, decode_tok_s=tok_s, runs_tok_s=rates,
                         step_ms=1e3 * s.decode_s / s.decode_steps, roofline_tok_s=roof,
                         roofline_fraction=tok_s / roof, first_tokens=out.token_ids[0][:16]))  # fmt: skip
        print(f"  kernforge {name} batch {b}: {tok_s:.0f} tok/s ({tok_s / roof:.0%} of roofline "
              f"{roof:.0f}), ttft {rows[-1]['ttft_ms']:.1f} ms", flush=True)  # fmt: skip
    long = torch.randint(0, cfg.vocab_size, (1, 512), generator=gen).tolist()
    with torch.inference_mode(), checks.trusted_indices():
        llm._ensure_cache(1)
        times = _sync_time(lambda: llm._prefill(long), 3 + args.reps)[3:]
    llm.generate(long, max_new_tokens=2, ignore_eos=True)  # capture the 1-row decode graph
    ttft512 = [llm.generate(long, max_new_tokens=1, ignore_eos=True).stats.time_to_first_token_s
               for _ in range(args.reps)]  # fmt: skip
    res = dict(model=name, params=cfg.num_params(), weight_bytes=weights, load_s=load_s,
               paged=args.paged, decode=rows, prefill_512_ms=1e3 * statistics.median(times),
               ttft_512_ms=1e3 * statistics.median(ttft512),
               prefill_512_tflops=prefill_flops(cfg, 512) / (statistics.median(times) * 1e12))  # fmt: skip
    print(f"  kernforge {name} prefill 512: {res['prefill_512_ms']:.2f} ms", flush=True)
    return res, llm


def bench_hf(name: str, llm, args) -> dict:
    import transformers

    from kernforge.llm.loader import hf_state_dict

    cfg = llm.config
    cls = {"qwen2": transformers.Qwen2Config, "llama": transformers.LlamaConfig}[cfg.arch]
    hc = cls(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
             num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
             num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, vocab_size=cfg.vocab_size,
             rms_norm_eps=cfg.rms_eps, rope_theta=cfg.rope_theta,
             max_position_embeddings=cfg.max_position_embeddings,
             tie_word_embeddings=cfg.tie_word_embeddings)  # fmt: skip
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(hc, dtype=torch.bfloat16).eval()
    # The same weights as kernforge's model (shared storage, but for the gate and up
    # projections: strided views of kernforge's interleaved gate_up, copied contiguous).
    state = {k: v.contiguous() for k, v in hf_state_dict(llm.decoder.weights, cfg).items()}
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    torch.cuda.empty_cache()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for b in BATCHES[name]:
        ids = torch.randint(0, cfg.vocab_size, (b, args.prompt), generator=gen).cuda()
        kw = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))

        def run(n, ids=ids, kw=kw):
            return model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)

        run(2)
        first = statistics.median(_sync_time(lambda: run(1), 3))
        total = _sync_time(lambda: run(args.hf_new_tokens), 1)[0]
        tok_s = b * (args.hf_new_tokens - 1) / (total - first)
        rows.append(dict(batch=b, ttft_ms=1e3 * first, decode_tok_s=tok_s))
        print(f"  hf eager {name} batch {b}: {tok_s:.1f} tok/s, ttft {1e3 * first:.1f} ms",
              flush=True)  # fmt: skip
    ids = torch.randint(0, cfg.vocab_size, (1, 512), generator=gen).cuda()
    with torch.inference_mode():
        times = _sync_time(lambda: model(ids, use_cache=False), 3 + args.reps)[3:]
    del model
    return dict(decode=rows, prefill_512_ms=1e3 * statistics.median(times))


def verdicts(results: dict) -> list[dict]:
    out = []
    for (model, metric, batch), bar in BARS.items():
        r = results["models"].get(model)
        if r is None:
            continue
        ours = r["kernforge"]
        if metric == "decode_tok_s":
            value = next(d["decode_tok_s"] for d in ours["decode"] if d["batch"] == batch)
            ok = value >= bar
        else:
            value = ours["prefill_512_ms"]
            ok = value <= bar
        out.append(dict(model=model, metric=metric, batch=batch, value=value, bar=bar,
                        met=ok))  # fmt: skip
    return out


def write(results: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "llm.json").write_text(json.dumps(results, indent=1))
    lines = ["# LLM generation: kernforge.llm vs Hugging Face eager", "",
             f"Environment: {results['env']}", "",
             f"Copy bandwidth measured in this run: {results['copy_tb_s']:.2f} TB/s. Prompt "
             f"{results['prompt']} tokens, {results['new_tokens']} new tokens (HF eager: "
             f"{results['hf_new_tokens']}), greedy, random weights, bf16.", ""]  # fmt: skip
    for model, r in results["models"].items():
        k, h = r["kernforge"], r.get("hf_eager")
        lines += [f"## {model} ({k['params'] / 1e9:.2f}B params, {k['weight_bytes'] / 1e9:.2f} GB)",
                  "", "| batch | kernforge tok/s | roofline tok/s | % roofline | step ms | TTFT ms "
                  "| HF eager tok/s | HF TTFT ms | x HF |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for d in k["decode"]:
            hd = next((x for x in (h or {}).get("decode", []) if x["batch"] == d["batch"]), None)
            hf_tok = f"{hd['decode_tok_s']:.1f}" if hd else "-"
            hf_ttft = f"{hd['ttft_ms']:.1f}" if hd else "-"
            ratio = f"{d['decode_tok_s'] / hd['decode_tok_s']:.1f}x" if hd else "-"
            lines.append(f"| {d['batch']} | {d['decode_tok_s']:.0f} | {d['roofline_tok_s']:.0f} | "
                         f"{100 * d['roofline_fraction']:.0f} | {d['step_ms']:.2f} | "
                         f"{d['ttft_ms']:.1f} | {hf_tok} | {hf_ttft} | {ratio} |")  # fmt: skip
        hp = f", HF eager {h['prefill_512_ms']:.1f} ms" if h else ""
        lines += ["", f"Prefill 1 x 512: {k['prefill_512_ms']:.2f} ms ({k['prefill_512_tflops']:.0f}"
                  f" TFLOP/s){hp}; time to first token at 512: {k['ttft_512_ms']:.2f} ms.", ""]  # fmt: skip
    lines += ["## Bars", ""]
    for v in results["verdicts"]:
        cmp = ">=" if v["metric"] == "decode_tok_s" else "<="
        lines.append(f"- {v['model']} {v['metric']} batch {v['batch']}: {v['value']:.1f} "
                     f"(bar {cmp} {v['bar']:g}): {'met' if v['met'] else 'MISSED'}")  # fmt: skip
    if results.get("notes"):
        lines += ["", "## Notes", "", *(f"- {n}" for n in results["notes"])]
    (out_dir / "llm.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="qwen2.5-1.5b,llama3-8b")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--hf-new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--decode-reps", type=int, default=3)
    p.add_argument("--paged", action="store_true")
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args()
    import transformers
    import triton

    from kernforge.bench.harness import copy_bandwidth

    results = dict(env=dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                            triton=triton.__version__, transformers=transformers.__version__,
                            date=time.strftime("%Y-%m-%d")),
                   copy_tb_s=copy_bandwidth(on_gpu=True), prompt=args.prompt,
                   new_tokens=args.new_tokens, hf_new_tokens=args.hf_new_tokens, models={})  # fmt: skip
    bw = results["copy_tb_s"] * 1e12
    for name in args.models.split(","):
        ours, llm = bench_kernforge(name, args, bw)
        entry = {"kernforge": ours}
        if not args.no_hf:
            llm.cache = None
            llm._graphs.clear()
            torch.cuda.empty_cache()
            entry["hf_eager"] = bench_hf(name, llm, args)
        results["models"][name] = entry
        del llm
        torch.cuda.empty_cache()
    results["verdicts"] = verdicts(results)
    write(results, args.out)
    print((args.out / "llm.md").read_text())


if __name__ == "__main__":
    main()
