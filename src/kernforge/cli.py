"""The ``kernforge`` command: ``kernforge bench``, ``kernforge tune``, ``kernforge generate`` and
``kernforge info``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _bench(args: argparse.Namespace) -> int:
    import torch

    from .bench import FAMILIES, cases_for, run_cases, write_results
    from .bench.harness import environment, table
    from .bench.suites import bars_for, notes_for

    families = args.families or list(FAMILIES)
    on_gpu = torch.cuda.is_available()
    if args.render:
        return _render(families, Path(args.out or "benchmarks/results"))
    out = Path(args.out) if args.out else Path("benchmarks/results" if on_gpu else "bench-out/cpu")
    if not on_gpu:
        print("No CUDA GPU: running small shapes through Triton's CPU interpreter to check "
              "correctness. CPU figures are NOT performance.", flush=True)  # fmt: skip
    cases = cases_for(families, quick=args.quick, on_gpu=on_gpu)
    results, copy_tbs = run_cases(cases, on_gpu=on_gpu)
    env = environment(copy_tbs, on_gpu)
    failed = [r for r in results if r.error or not r.rel_err <= 2e-2]
    for family in families:
        rows = [r for r in results if r.family == family]
        fam_env = env
        if family == "trace":  # kf.jit: host time per cached call, first-call compile time
            from .bench.jit_cases import first_call_seconds, host_overhead

            fam_env = {**env, "jit_host_us": host_overhead(on_gpu),
                       "jit_first_call_s": first_call_seconds(on_gpu)}  # fmt: skip
        notes, bars = notes_for(family, fam_env), bars_for(family, rows)
        paths = write_results(family, rows, fam_env, out, notes, bars)
        print(f"\n## {family}  ->  {', '.join(str(p) for p in paths)}")
        print(table(rows, on_gpu))
    print(f"\ncopy bandwidth measured in this run: {copy_tbs:.3g} TB/s")
    if failed:
        print(f"{len(failed)} case(s) failed or disagreed with torch:", file=sys.stderr)
        for r in failed:
            print(f"  {r.op} {r.direction} {r.shape}: {r.error or f'rel err {r.rel_err:.3g}'}",
                  file=sys.stderr)  # fmt: skip
        return 1
    return 0


def _render(families: list[str], out: Path) -> int:
    """Rewrite ``<family>.md`` and ``.png`` from ``<family>.json`` (no measuring)."""
    from .bench import write_results
    from .bench.harness import load_results
    from .bench.suites import bars_for, notes_for

    for family in families:
        path = out / f"{family}.json"
        if not path.exists():
            print(f"no {path}; skipped", file=sys.stderr)
            continue
        name, results, env = load_results(path)
        paths = write_results(
            name, results, env, out, notes_for(name, env), bars_for(name, results)
        )
        print(f"rendered {', '.join(str(p) for p in paths)}")
    return 0


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.lower().split("x"))
    except ValueError:
        dims = ()
    if not dims or min(dims) < 1:
        raise SystemExit(f"kernforge tune: bad shape {text!r}; write sizes joined by x, "
                         "e.g. 4096x4096x4096")  # fmt: skip
    return dims


def _tune(args: argparse.Namespace) -> int:
    import torch

    from . import config, device, tune
    from .progress import Progress

    known = tune.tunable()
    if args.list or not args.kernel:
        print("tunable kernels:")
        for name, entry in known.items():
            print(f"  {name}: shapes {entry.shapes_help}")
        stored = tune.entries(args.kernel)
        print(f"remembered choices ({len(stored)}):")
        for e in stored:
            print(f"  {e['kernel']} {e['ident'][-1]} -> {e['config']} ({e['ms']:.4g} ms, "
                  f"{e['ident'][3][0]}, {e['when']})")  # fmt: skip
        return 0
    if args.kernel not in known:
        print(f"kernforge tune: unknown kernel {args.kernel!r}; tunable: "
              f"{', '.join(known) or 'none'}", file=sys.stderr)  # fmt: skip
        return 2
    if device.INTERPRET or not device.cuda_available():
        print("kernforge tune: tuning measures on a CUDA GPU, and this process has none "
              "(kernels run in Triton's CPU interpreter here)", file=sys.stderr)  # fmt: skip
        return 2
    entry = known[args.kernel]
    shapes = [_parse_shape(s) for s in args.shapes.split(",")] if args.shapes else []
    shapes = shapes or list(entry.default_shapes)
    if not shapes:
        print(f"kernforge tune: give --shapes ({entry.shapes_help})", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    with tune.forcing(), Progress(len(shapes), f"tune {args.kernel} shapes") as bar:
        for shape in shapes:
            entry.run(shape, dtype)
            torch.cuda.synchronize()
            bar.step("x".join(map(str, shape)))
    print(
        f"tuned {len(shapes)} shape(s); choices remembered under "
        f"{config.settings.cache_dir / 'tune'} (kernforge tune --list shows them)"
    )
    return 0


def _info(args: argparse.Namespace) -> int:
    from . import config, device, dispatch

    print("device:")
    for k, v in device.describe().items():
        print(f"  {k}: {v}")
    print("settings (KERNFORGE_*):")
    for k, v in config.settings.describe().items():
        print(f"  {k}: {v}")
    print(f"backend in force: {dispatch.get_backend()}")
    print("ops:")
    for op, backends in dispatch.registered().items():
        print(f"  {op}: {', '.join(backends)}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    import torch

    from .errors import KernforgeError
    from .llm import LLM
    from .llm.tokenizer import StreamDecoder

    try:
        llm = LLM(args.model, dtype=getattr(torch, args.dtype) if args.dtype else None,
                  device=args.device, max_seq_len=args.max_seq_len, paged=args.paged,
                  cuda_graphs=False if args.no_graphs else None, seed=args.seed or 0)  # fmt: skip
        prompt = [int(t) for t in args.token_ids.split(",")] if args.token_ids else args.prompt
        print(f"model: {llm.name} ({llm.config.arch}, {llm.config.num_params() / 1e9:.2f}B "
              f"params, {llm.dtype}, {llm.device})", file=sys.stderr)  # fmt: skip
        if llm.cuda_graphs and not args.no_warmup:  # compile kernels, capture the graphs
            llm.generate(prompt, max_new_tokens=2, ignore_eos=True)
        if llm.tokenizer is not None and not args.token_ids:
            print(args.prompt, end="", flush=True)

        stream = None if llm.tokenizer is None or args.token_ids else StreamDecoder(llm.tokenizer)

        def show(row: int, token: int) -> None:  # stream the tokens as they come
            print(stream.push(token) if stream else f" {token}", end="", flush=True)

        out = llm.generate(prompt, max_new_tokens=args.max_new_tokens, on_token=show,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                           repetition_penalty=args.repetition_penalty, seed=args.seed,
                           ignore_eos=args.ignore_eos)  # fmt: skip
    except KernforgeError as e:
        print(f"kernforge generate: {e}", file=sys.stderr)
        return 2
    if stream is not None:
        print(stream.flush(), end="")
    s = out.stats
    print(f"\n\n{s.new_tokens} tokens ({out.finish_reasons[0]}); time to first token "
          f"{1e3 * s.time_to_first_token_s:.1f} ms; decode {s.decode_tokens_per_s:.1f} tokens/s "
          f"({s.decode_steps} steps, {s.decode_s:.3f} s); seed {s.seed}")  # fmt: skip
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``kernforge`` command."""
    parser = argparse.ArgumentParser(prog="kernforge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="benchmark catalog families against torch and "
                           "torch.compile; writes JSON, Markdown and PNG results")  # fmt: skip
    bench.add_argument("families", nargs="*", help="families to run (default: all): "
                       "rms_norm layer_norm softmax glu rope; named only: gemv trace gemm "
                       "attention losses")  # fmt: skip
    bench.add_argument("--quick", action="store_true", help="one shape, forward only")
    bench.add_argument("--out", help="results folder (default: benchmarks/results on a GPU, "
                       "bench-out/cpu without one)")  # fmt: skip
    bench.add_argument("--render", action="store_true", help="measure nothing: rewrite the "
                       "Markdown and PNG of each family from its JSON in --out")  # fmt: skip
    bench.set_defaults(func=_bench)
    tune = sub.add_parser("tune", help="measure the launch configs of a tuned kernel at given "
                          "shapes and remember the fastest (KERNFORGE_CACHE_DIR/tune)")  # fmt: skip
    tune.add_argument("kernel", nargs="?", help="kernel to tune (none: list tunable kernels)")
    tune.add_argument("--shapes", help="comma-separated shapes, sizes joined by x "
                      "(matmul: MxNxK, e.g. 4096x4096x4096,128x4096x14336)")  # fmt: skip
    tune.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    tune.add_argument("--list", action="store_true", help="list tunable kernels and the "
                      "remembered choices")  # fmt: skip
    tune.set_defaults(func=_tune)
    gen = sub.add_parser("generate", help="generate text with an LLM on kernforge kernels "
                         "(a Hugging Face folder or a random-weight built-in shape)")  # fmt: skip
    gen.add_argument("--model", help="model folder, or random:NAME (tiny, qwen2.5-1.5b, "
                     "llama3-8b); default random:tiny")  # fmt: skip
    gen.add_argument("--prompt", default="Hello", help="prompt text")
    gen.add_argument("--token-ids", help="prompt as comma-separated token ids (instead of text)")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, help="0 (default): greedy")
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--repetition-penalty", type=float)
    gen.add_argument("--seed", type=int, help="sampling seed (and the random weights' seed)")
    gen.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence")
    gen.add_argument("--dtype", choices=["bfloat16", "float16", "float32"])
    gen.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    gen.add_argument("--max-seq-len", type=int)
    gen.add_argument("--paged", action="store_true", help="paged KV cache")
    gen.add_argument("--no-graphs", action="store_true", help="no CUDA graphs (eager decode)")
    gen.add_argument("--no-warmup", action="store_true", help="time the first call too "
                     "(kernel compilation and graph capture included)")  # fmt: skip
    gen.set_defaults(func=_generate)
    info = sub.add_parser("info", help="device, versions, settings and registered ops")
    info.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kernforge`` console command."""
    args = build_parser().parse_args(argv)
    import kernforge  # noqa: F401  (sets up the device and registers the catalog)

    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
