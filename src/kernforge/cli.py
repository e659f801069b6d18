"""The ``kernforge`` command: ``kernforge bench`` and ``kernforge info``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _bench(args: argparse.Namespace) -> int:
    import torch

    from .bench import FAMILIES, cases_for, run_cases, write_results
    from .bench.harness import environment, table
    from .bench.suites import notes_for

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
        paths = write_results(family, rows, fam_env, out, notes_for(family, fam_env))
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
    from .bench.suites import notes_for

    for family in families:
        path = out / f"{family}.json"
        if not path.exists():
            print(f"no {path}; skipped", file=sys.stderr)
            continue
        name, results, env = load_results(path)
        paths = write_results(name, results, env, out, notes_for(name, env))
        print(f"rendered {', '.join(str(p) for p in paths)}")
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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``kernforge`` command."""
    parser = argparse.ArgumentParser(prog="kernforge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="benchmark catalog families against torch and "
                           "torch.compile; writes JSON, Markdown and PNG results")  # fmt: skip
    bench.add_argument("families", nargs="*", help="families to run (default: all): "
                       "rms_norm layer_norm softmax glu rope")  # fmt: skip
    bench.add_argument("--quick", action="store_true", help="one shape, forward only")
    bench.add_argument("--out", help="results folder (default: benchmarks/results on a GPU, "
                       "bench-out/cpu without one)")  # fmt: skip
    bench.add_argument("--render", action="store_true", help="measure nothing: rewrite the "
                       "Markdown and PNG of each family from its JSON in --out")  # fmt: skip
    bench.set_defaults(func=_bench)
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
