"""Cold start on the GPU: what a fresh install costs on first use. GPU only.

(a) ``ops``: a fresh process with an empty ``KERNFORGE_CACHE_DIR`` (and so an empty Triton
    cache under it) and the shipped sm_90 table calls each tuned catalog op at a common shape
    (matmul at Llama-3-8B projections, fp8, grouped GEMM at Mixtral, decode attention) and the
    untuned ones; it counts ``Tuner.measure`` calls and tuning files (both must stay 0) and
    reports each op's first-call time (compilation included) and second-call time.
(b) ``llm``: ``kernforge warmup --model random:qwen2.5-1.5b`` into an empty cache, then a fresh
    process loads the model and times its first request (16 prompt tokens, one decode step):
    request -> first decoded token, and the decode step alone (eager run + graph capture); the
    bar is < 1 s. The same request in a process with an empty cache and no warm-up is the
    baseline.

Results go under the key "coldstart" of ``benchmarks/results/tuning.json`` (the rest of that
file is benchmarks/tuning.py's) and a "Cold start" section of ``tuning.md``.

    PYTHONPATH=src python3 benchmarks/coldstart.py [--out benchmarks/results/tuning.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = "random:qwen2.5-1.5b"
PROMPT_TOKENS = 16


def _child(part: str, cache: Path, extra_env: dict | None = None) -> dict:
    """Run ``part`` of this script in a fresh process over ``cache``; its JSON result."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_CACHE_DIR"}
    env.update(KERNFORGE_CACHE_DIR=str(cache), **(extra_env or {}))
    res_file = cache.parent / f"{cache.name}_{part}.json"
    cmd = [sys.executable, __file__, "--child", part, "--result", str(res_file)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    sys.stderr.write(proc.stderr[-3000:])
    if proc.returncode != 0 or not res_file.exists():
        return {"error": f"exit {proc.returncode}: {proc.stderr[-1500:]}", "process_s": wall}
    out = json.loads(res_file.read_text())
    out["process_s"] = round(wall, 2)
    return out


def _count_measures():
    from kernforge.tune import tuner

    calls = []
    real = tuner.Tuner.measure

    def counted(self, key, run):
        calls.append(f"{self.name} {key}")
        return real(self, key, run)

    tuner.Tuner.measure = counted
    return calls


def child_ops() -> dict:
    """Part (a), in a fresh process: first and second call of each op."""
    import torch

    from kernforge import config
    from kernforge.tune import tuner, warmup

    measured = _count_measures()
    cases = [
        ("matmul", (2048, 4096, 4096)), ("matmul", (2048, 28672, 4096)),
        ("matmul", (2048, 4096, 14336)), ("matmul", (2048, 6144, 4096)),
        ("fp8_matmul", (4096, 4096, 4096)), ("grouped_gemm", (16384, 28672, 4096, 8)),
        ("fmha_decode", (1, 4096)), ("fmha_decode", (16, 4096)),
        ("rms_norm", (2048, 4096)), ("layer_norm", (2048, 4096)), ("softmax", (2048, 4096)),
        ("silu_and_mul", (2048, 14336)), ("rope", (1, 2048, 32, 128)),
        ("fmha", (1, 2048, 32, 128)), ("cross_entropy", (2048, 128256)),
    ]  # fmt: skip
    rows = []
    for op, shape in cases:
        before = len(measured)
        times = []
        for _ in range(2):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            warmup.OPS[op].call(shape, torch.bfloat16, torch.device("cuda"))
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        rows.append({"op": op, "shape": "x".join(map(str, shape)),
                     "first_call_s": round(times[0], 3), "second_call_s": round(times[1], 4),
                     "measured": len(measured) - before})  # fmt: skip
        print(f"coldstart ops: {op} {shape}: first {times[0]:.2f} s, "
              f"then {times[1] * 1e3:.2f} ms", file=sys.stderr, flush=True)  # fmt: skip
    files = sorted(str(p) for p in (config.settings.cache_dir / "tune").glob("*/*.json"))
    return {"cases": rows, "measure_calls": measured, "tune_files": files,
            "picks": dict(tuner.stats), "ok": not measured and not files}  # fmt: skip


def child_llm() -> dict:
    """Part (b), in a fresh process: load the model, time its first request."""
    import torch

    from kernforge.llm import LLM
    from kernforge.tune import tuner

    measured = _count_measures()
    t0 = time.perf_counter()
    llm = LLM(MODEL)
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    prompt = [[(13 * i) % 1000 + 1 for i in range(PROMPT_TOKENS)]]
    t0 = time.perf_counter()
    out = llm.generate(prompt, max_new_tokens=2, ignore_eos=True)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = llm.generate(prompt, max_new_tokens=2, ignore_eos=True)
    second = time.perf_counter() - t0
    s, s2 = out.stats, again.stats
    return {
        "model": MODEL, "prompt_tokens": PROMPT_TOKENS, "load_s": round(load_s, 2),
        "first_request_to_decoded_token_s": round(first, 3),
        "first_prefill_s": round(s.time_to_first_token_s, 3),
        "first_decode_step_s": round(s.decode_s, 3),
        "second_request_s": round(second, 4), "second_decode_step_s": round(s2.decode_s, 5),
        "measure_calls": measured, "picks": dict(tuner.stats),
    }  # fmt: skip


def _write_markdown(path: Path, res: dict) -> None:
    """Replace (or append) the "Cold start" section of ``path``."""
    lines = ["## Cold start", "", f"Bars: {json.dumps(res.get('bars', {}))}", ""]
    ops = res.get("ops", {})
    if ops.get("cases"):
        lines += ["Fresh process, empty cache, shipped sm_90 table: tuner measurements "
                  f"{len(ops.get('measure_calls', []))}, picks {ops.get('picks')}.", "",
                  "| op | shape | first call s | second call s |", "|---|---|---|---|"]  # fmt: skip
        lines += [f"| {c['op']} | {c['shape']} | {c['first_call_s']} | {c['second_call_s']} |"
                  for c in ops["cases"]]  # fmt: skip
        lines.append("")
    for key, label in (("llm_after_warmup", "after `kernforge warmup`"),
                       ("llm_cold_no_warmup", "empty cache, no warm-up")):  # fmt: skip
        r = res.get(key)
        if r:
            total, pre = r["first_request_to_decoded_token_s"], r["first_prefill_s"]
            lines.append(f"- {r['model']}, {label}: first request -> first decoded token "
                         f"{total} s (prefill {pre} s, first decode step "
                         f"{r['first_decode_step_s']} s)")  # fmt: skip
    if "warmup" in res:
        lines.append(f"- warm-up: `python {res['warmup']['command']}` took "
                     f"{res['warmup']['wall_s']} s")  # fmt: skip
    text = path.read_text() if path.exists() else ""
    head = text.split("## Cold start")[0].rstrip("\n")
    path.write_text((head + "\n\n" if head else "") + "\n".join(lines) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/tuning.json")
    p.add_argument("--parts", default="ops,llm,baseline")
    p.add_argument("--jobs", type=int, default=4, help="warm-up worker processes")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        result = child_ops() if args.child == "ops" else child_llm()
        Path(args.result).write_text(json.dumps(result, indent=1))
        return 0
    import torch

    from kernforge import device

    if not torch.cuda.is_available():
        print("coldstart: needs a CUDA GPU", file=sys.stderr)
        return 2
    parts = args.parts.split(",")
    root = Path(tempfile.mkdtemp(prefix="kf_coldstart_"))
    res: dict = {"device": device.describe(), "bars": {}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after each part: a run cut short keeps what it measured
        doc = json.loads(out.read_text()) if out.exists() else {}
        doc["coldstart"] = res
        out.write_text(json.dumps(doc, indent=1) + "\n")
        _write_markdown(out.with_suffix(".md"), res)

    if "ops" in parts:
        res["ops"] = _child("ops", root / "ops")
        res["bars"]["ops_tune_nothing"] = bool(res["ops"].get("ok"))
        save()
    if "llm" in parts:
        cache = root / "llm"
        env = {k: v for k, v in os.environ.items() if k != "TRITON_CACHE_DIR"}
        env["KERNFORGE_CACHE_DIR"] = str(cache)
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "kernforge", "warmup", "--model", MODEL,
               "--jobs", str(args.jobs)]  # fmt: skip
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        warm_s = time.perf_counter() - t0
        print(proc.stdout[-4000:], proc.stderr[-2000:], file=sys.stderr, flush=True)
        res["warmup"] = {"command": " ".join(cmd[1:]), "exit": proc.returncode,
                         "wall_s": round(warm_s, 1), "report": proc.stdout[-4000:]}  # fmt: skip
        res["llm_after_warmup"] = r = _child("llm", cache)
        total = r.get("first_request_to_decoded_token_s")
        res["bars"]["first_decode_under_1s"] = total is not None and total < 1.0
        save()
    if "baseline" in parts:
        res["llm_cold_no_warmup"] = _child("llm", root / "cold")
    save()
    print(json.dumps(res["bars"]), f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
