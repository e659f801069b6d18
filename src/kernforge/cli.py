"""The ``kernforge`` command: ``kernforge bench``, ``kernforge tune``, ``kernforge generate``,
``kernforge warmup``, ``kernforge cache``, ``kernforge info``, and the model compiler's
``kernforge compile``, ``kernforge run`` and ``kernforge inspect`` (:mod:`.cli_model`)."""

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
    if getattr(args, "model", None):
        return _tune_model(args)
    if args.export:
        return _tune_export(args)
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


#: ``kernforge tune --model ... --kernel NAME``: short names of the model families.
_MODEL_ALIASES = {"matmul": "matmul_tma", "attention": "attention_fwd", "fmha": "attention_fwd"}


def _tune_model(args: argparse.Namespace) -> int:
    """``kernforge tune --model train|eval [--kernel matmul] [--arch sm_90]``: train the
    performance model from the measurement store and report held-out accuracy (split by
    shape), or print its cross-validated top-k hit rate and the fraction measured."""
    from . import device
    from .tune import model, space, store

    if not model.available():
        print("kernforge tune --model: needs scikit-learn or xgboost (pip install "
              "kernforge[tune]); tuning measures each kernel's short list without it",
              file=sys.stderr)  # fmt: skip
        return 2
    names = [args.model_kernel] if args.model_kernel else store.kernels()
    names = [_MODEL_ALIASES.get(n, n) for n in names]
    names = [n for n in names if n in space.families()]
    if not names:
        print(f"kernforge tune --model: no measurements under {store.root()} for "
              f"{args.model_kernel or 'any modelled kernel'} (families: "
              f"{', '.join(space.families())}); tune some shapes first",
              file=sys.stderr)  # fmt: skip
        return 2
    status = 0
    for name in names:
        recs = store.load(name)
        arch = args.arch or device.arch() or (max({r["arch"] for r in recs}, key=lambda a: sum(
            r["arch"] == a for r in recs)) if recs else "cpu")  # fmt: skip
        try:
            if args.model == "train":
                rec = model.train(name, arch, k=args.topk)
                ho = rec["holdout"]
                head = (f"{name} on {arch}: trained on {rec['records']} measurements of "
                        f"{rec['keys']} shapes in {rec['train_seconds']:.1f}s")  # fmt: skip
            else:
                ho = model.evaluate(name, arch, k=args.topk)
                head = f"{name} on {arch}: cross-validated over shapes"
        except Exception as exc:  # noqa: BLE001  (reported per family)
            print(f"{name} on {arch}: {exc}", file=sys.stderr)
            status = 1
            continue
        if "error" in ho:
            print(f"{head}; held-out: {ho['error']}")
            continue
        print(f"{head}; held-out {ho['keys']} shapes: top-{ho['k']} hit rate "
              f"{ho['hit_rate']:.2f} (within 3% of the best), fraction measured "
              f"{ho['fraction_measured']:.3f}, slowdown mean {ho['mean_slowdown']:.3f} worst "
              f"{ho['worst_slowdown']:.3f}")  # fmt: skip
    return status


def _tune_export(args: argparse.Namespace) -> int:
    """``kernforge tune --export``: the on-disk choices of one arch into its pre-tuned table."""
    from . import device
    from .tune import pretuned

    arch = args.arch or device.arch()
    if not arch:
        print("kernforge tune --export: no GPU here; name the table with --arch (e.g. sm_90)",
              file=sys.stderr)  # fmt: skip
        return 2
    path, changed = pretuned.export(arch, Path(args.output) if args.output else None)
    counts = pretuned.size(path)
    print(f"exported {changed} tuned key(s) of {arch} into {path} "
          f"({sum(counts.values())} entries: {counts})")  # fmt: skip
    return 0


def _warmup(args: argparse.Namespace) -> int:
    import torch

    from . import device
    from .errors import KernforgeError
    from .tune import warmup as wu

    on_gpu = torch.cuda.is_available() and not device.INTERPRET
    dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    shapes = [_parse_shape(s) for s in args.shapes.split(",")] if args.shapes else None
    try:
        if args.model:
            jobs = wu.model_jobs(args.model, shapes, dtype, max_seq_len=args.max_seq_len,
                                 paged=args.paged or None)  # fmt: skip
        else:
            ops = args.ops.split(",") if args.ops else list(wu.OPS)
            if shapes is None and not on_gpu:
                print("warmup: no CUDA GPU, so nothing to compile; running each op once "
                      "through Triton's CPU interpreter at small shapes",
                      file=sys.stderr)  # fmt: skip
                jobs = [j for op in ops
                        for j in wu.op_jobs([op], [_cpu_shape(wu, op)], dtype, on_gpu)]  # fmt: skip
            else:
                jobs = wu.op_jobs(ops, shapes, dtype, on_gpu)
        report = wu.warmup(jobs, args.jobs, tune=args.tune)
    except KernforgeError as e:
        print(f"kernforge warmup: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0 if report.ok else 1


def _cpu_shape(wu, op: str) -> tuple[int, ...]:
    """A tiny shape of ``op``'s format, for the CPU interpreter."""
    return {"ROWSxHIDDEN": (4, 32), "ROWSxCOLS": (4, 32), "ROWSxINTERMEDIATE": (4, 32),
            "BATCHxSEQxHEADSxHEAD_DIM": (1, 8, 2, 16), "MxNxK": (16, 16, 16),
            "TxNxKxG": (16, 16, 16, 2), "BATCHxCONTEXT[xPAGE_SIZE]": (1, 32),
            "ROWSxVOCAB": (4, 64)}[wu.OPS[op].shapes_help]  # fmt: skip


def _cache(args: argparse.Namespace) -> int:
    from .tune import cache

    if args.action == "info":
        rows = cache.info()
        print(f"{'part':13s} {'entries':>8s} {'files':>7s} {'size':>10s}  folder")
        for r in rows:
            print(f"{r.part:13s} {r.entries:8d} {r.files:7d} {cache.human(r.bytes):>10s}  {r.path}")
        total = sum(r.bytes for r in rows)
        print(f"total {cache.human(total)} (tune entries, measurement lines, generated sources, "
              "NVRTC cubins, Triton kernels)")  # fmt: skip
        return 0
    if args.action == "clear":
        parts = args.what.split(",") if args.what else list(cache.PARTS)
        bad = [p for p in parts if p not in cache.PARTS]
        if bad:
            print(f"kernforge cache clear: unknown part(s) {', '.join(bad)}; parts: "
                  f"{', '.join(cache.PARTS)}", file=sys.stderr)  # fmt: skip
            return 2
        files = {p: len(cache.part_files(p)) for p in parts}
        if not args.yes:
            print(f"would delete {sum(files.values())} file(s): {files}; run again with --yes "
                  "to delete them")  # fmt: skip
            return 1
        done = cache.clear(parts)
        print(f"deleted {sum(done.values())} file(s): {done}")
        return 0
    report = cache.prune(dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for path, why in report.removed:
        print(f"{verb} {path}: {why}")
    print(f"{verb} {len(report.removed)} stale or corrupt entr"
          f"{'y' if len(report.removed) == 1 else 'ies'}; kept {report.kept}")  # fmt: skip
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
        if args.warmup:  # compile every bucket's kernels in worker processes first
            from .tune.warmup import warmup_llm

            print(warmup_llm(llm, workers=args.jobs).summary(), file=sys.stderr)
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
    tune.add_argument("--export", action="store_true", help="write the remembered choices of "
                      "one arch into its pre-tuned table (merged with what is there)")  # fmt: skip
    tune.add_argument("--arch", help="with --export: the arch (default: this GPU's, e.g. sm_90)")
    tune.add_argument("-o", "--output", help="with --export: the table file (default: the "
                      "shipped kernforge/tune/pretuned/<arch>.json)")  # fmt: skip
    tune.add_argument("--model", choices=["train", "eval"], help="train the performance "
                      "model from the measurement store (held-out accuracy), or evaluate it "
                      "(top-k hit rate, fraction measured); --arch picks the arch")  # fmt: skip
    tune.add_argument("--kernel", dest="model_kernel", help="with --model: the kernel family "
                      "(matmul, attention; default: every one with measurements)")  # fmt: skip
    tune.add_argument("--topk", type=int, default=5, help="with --model: k of the top-k")
    tune.set_defaults(func=_tune)
    warm = sub.add_parser("warmup", help="compile (and with --tune, tune) every kernel a model "
                          "or an op list will use, in parallel processes, into the persistent "
                          "caches")  # fmt: skip
    warm.add_argument("--model", help="a model folder or random:NAME (its prefill and decode "
                      "kernels); default: --ops")  # fmt: skip
    warm.add_argument("--ops", help="comma-separated catalog ops (default: all warm-up knows)")
    warm.add_argument("--shapes", help="comma-separated shapes, sizes joined by x: per op its "
                      "format (rms_norm ROWSxHIDDEN, matmul MxNxK, ...); for --model "
                      "BATCHxPROMPT_TOKENS")  # fmt: skip
    warm.add_argument("--jobs", type=int, help="worker processes (default: up to 4; 0: this "
                      "process)")  # fmt: skip
    warm.add_argument("--tune", action="store_true", help="also measure configs that are "
                      "neither remembered nor shipped (one worker)")  # fmt: skip
    warm.add_argument("--dtype", choices=["bfloat16", "float16", "float32"])
    warm.add_argument("--max-seq-len", type=int, help="with --model: as LLM(max_seq_len=...)")
    warm.add_argument("--paged", action="store_true", help="with --model: paged KV cache")
    warm.set_defaults(func=_warmup)
    cache = sub.add_parser("cache", help="what kernforge keeps on disk: info, clear, prune")
    cache.add_argument("action", choices=["info", "clear", "prune"])
    cache.add_argument("--what", help="with clear: comma-separated parts (tune, measurements, "
                       "models, jit, cuda, triton, other; default all)")  # fmt: skip
    cache.add_argument("--yes", action="store_true", help="with clear: really delete")
    cache.add_argument("--dry-run", action="store_true", help="with prune: only report")
    cache.set_defaults(func=_cache)
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
    gen.add_argument(
        "--warmup",
        action="store_true",
        help="first compile the kernels of "
        "each batch and prompt bucket in worker processes (kernforge warmup)",
    )
    gen.add_argument("--jobs", type=int, help="with --warmup: worker processes")
    gen.set_defaults(func=_generate)
    info = sub.add_parser("info", help="device, versions, settings and registered ops")
    info.set_defaults(func=_info)
    from .cli_model import add_commands  # compile, run, inspect (the model compiler)

    add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kernforge`` console command."""
    args = build_parser().parse_args(argv)
    import kernforge  # noqa: F401  (sets up the device and registers the catalog)

    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
