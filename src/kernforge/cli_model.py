"""The model compiler's commands: ``kernforge compile``, ``kernforge run`` and
``kernforge inspect`` (registered in :mod:`kernforge.cli`).

``kernforge compile MODULE:FACTORY --input-shape 1x3x224x224 -o model.kf`` imports ``MODULE`` (a
``.py`` file or a dotted module name), calls ``FACTORY()`` for the model, makes random inputs of
the given shapes, compiles and saves. ``kernforge run model.kf`` loads it and runs it on random
inputs, printing the outputs' statistics and the time per call. ``kernforge inspect model.kf``
prints what the program holds (``Program.describe()``).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from .errors import ArgumentError, KernforgeError

MODES = ("gpu", "interpret", "numpy")


def _shapes(texts: list[str] | None) -> list[tuple[int, ...]]:
    """``["1x3x224x224", "2x8,4"]`` -> one shape per input (commas separate inputs too)."""
    out = []
    for text in texts or []:
        for part in text.split(","):
            if not re.fullmatch(r"\d+(x\d+)*", part.strip().lower()):
                raise ArgumentError(
                    f"bad input shape {part!r}: write sizes joined by x, e.g. 1x3x224x224; "
                    "repeat --input-shape (or separate with commas) for several inputs"
                )
            out.append(tuple(int(d) for d in part.strip().lower().split("x")))
    return out


def load_factory(spec: str):
    """The callable named by ``MODULE:FACTORY``: ``MODULE`` is a ``.py`` file path or a dotted
    module name (importable from the current folder)."""
    mod_name, sep, attr = spec.rpartition(":")
    if not sep or not mod_name or not attr:
        raise ArgumentError(
            f"expected MODULE:FACTORY (e.g. models.py:make_resnet or mypkg.nets:build), "
            f"got {spec!r}"
        )
    path = Path(mod_name)
    if mod_name.endswith(".py") or path.is_file():
        if not path.is_file():
            raise ArgumentError(f"no Python file {mod_name!r}")
        name = f"kernforge_user_{path.stem}"
        mspec = importlib.util.spec_from_file_location(name, path)
        if mspec is None or mspec.loader is None:
            raise ArgumentError(f"cannot import {mod_name!r} as a Python module")
        module = importlib.util.module_from_spec(mspec)
        sys.modules[name] = module
        sys.path.insert(0, str(path.resolve().parent))  # its own imports of its neighbours
        try:
            mspec.loader.exec_module(module)
        finally:
            sys.path.remove(str(path.resolve().parent))
    else:
        if "" not in sys.path and str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))
        try:
            module = importlib.import_module(mod_name)
        except ImportError as e:
            raise ArgumentError(f"cannot import module {mod_name!r}: {e}") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ArgumentError(f"{mod_name!r} has no callable {attr!r}")
    return fn


def random_inputs(shapes, dtypes: list[str], seed: int = 0, int_high: int = 100) -> list[Any]:
    """Random tensors of ``shapes``: normal floats, integers in ``[0, int_high)``; ``dtypes``
    has one name per input, or one for all."""
    import torch

    if len(dtypes) not in (1, len(shapes)):
        raise ArgumentError(f"give one --input-dtype, or one per input ({len(shapes)})")
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, shape in enumerate(shapes):
        name = dtypes[0] if len(dtypes) == 1 else dtypes[i]
        dt = getattr(torch, name, None)
        if not isinstance(dt, torch.dtype):
            raise ArgumentError(f"unknown input dtype {name!r} (e.g. float32, bfloat16, int64)")
        if dt.is_floating_point:
            out.append(torch.randn(shape, generator=gen).to(dt))
        elif dt == torch.bool:
            out.append(torch.randint(0, 2, shape, generator=gen).bool())
        else:
            out.append(torch.randint(0, int_high, shape, generator=gen).to(dt))
    return out


def _default_mode() -> str:
    import torch

    from . import device

    return "gpu" if torch.cuda.is_available() and not device.INTERPRET else "interpret"


def _summary(name: str, t) -> str:
    import torch

    if not isinstance(t, torch.Tensor):
        return f"{name}: {type(t).__name__} {t!r}"[:200]
    x = t.detach().float().cpu()
    finite = torch.isfinite(x)
    bad = int((~finite).sum())
    x = x[finite]
    stats = (
        f"mean {x.mean():.4g} std {x.std() if x.numel() > 1 else 0:.4g} "
        f"min {x.min():.4g} max {x.max():.4g}"
        if x.numel()
        else "no finite values"
    )
    extra = f", {bad} non-finite" if bad else ""
    return f"{name}: {str(t.dtype).removeprefix('torch.')}{list(t.shape)} {stats}{extra}"


def _flat(out) -> list:
    if isinstance(out, list | tuple):
        return [y for x in out for y in _flat(x)]
    return [out]


def _compile(args: argparse.Namespace) -> int:
    import torch

    from .progress import Progress

    try:
        shapes = _shapes(args.input_shape)
        if not shapes:
            raise ArgumentError("give the example inputs' shapes: --input-shape 1x3x224x224")
        dtype = getattr(torch, args.dtype) if args.dtype else None
        in_dtypes = args.input_dtype.split(",") if args.input_dtype else ["float32"]
        out = Path(args.output)
        mode = args.mode or _default_mode()
        with Progress(4, "compile") as bar:
            t0 = time.perf_counter()
            factory = load_factory(args.target)
            model = factory()
            if not isinstance(model, torch.nn.Module):
                raise ArgumentError(f"{args.target}() returned a {type(model).__name__}, "
                                    "not a torch.nn.Module")  # fmt: skip
            model.eval()
            inputs = random_inputs(shapes, in_dtypes, args.seed)
            bar.step(f"model {type(model).__name__} built")
            from .compiler import compile_model

            t1 = time.perf_counter()
            prog = compile_model(model, tuple(inputs), dtype=dtype, mode=mode)
            compile_s = time.perf_counter() - t1
            bar.step(f"compiled in {compile_s:.1f}s")
            err = None
            if args.check:
                err = _check(prog, model, inputs, mode)
            bar.step("checked" if args.check else "not checked (--check compares with eager)")
            path = prog.save(out) if hasattr(prog, "save") else _save(prog, out)
            bar.step(f"saved {path}")
    except KernforgeError as e:
        print(f"kernforge compile: {e}", file=sys.stderr)
        return 2
    size = path.stat().st_size if path.is_file() else sum(
        p.stat().st_size for p in path.iterdir()
    )  # fmt: skip
    print(f"compiled {args.target} in {compile_s:.1f}s (total {time.perf_counter() - t0:.1f}s) "
          f"-> {path} ({size / 2**20:.2f} MiB)")  # fmt: skip
    plan = getattr(prog, "buffer_plan", None)
    if plan is not None:
        print(plan.describe())
    if err is not None:
        print(f"largest relative error against eager torch: {err:.3g}")
    return 0


def _save(prog, path: Path) -> Path:
    from .runtime.archive import save

    return save(prog, path)


def _check(prog, model, inputs, mode: str) -> float:
    """The largest norm-wise relative error of the program's outputs against the model's,
    run eagerly in float32."""
    import torch

    dev = "cuda" if mode == "gpu" else "cpu"
    ins = [x.to(dev) for x in inputs]
    with torch.no_grad():
        ref = [x.float() if x.is_floating_point() else x for x in ins]
        want = _flat(model.to(dev).float()(*ref))
    got = _flat(prog.run(*ins, mode=mode))
    worst = 0.0
    for a, b in zip(got, want, strict=False):
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
            worst = max(worst, float((a64 - b64).norm() / b64.norm().clamp_min(1e-30)))
    return worst


def _run(args: argparse.Namespace) -> int:
    import torch

    from .runtime.archive import load

    try:
        prog = load(args.program)
        mode = args.mode or _default_mode()
        graph_inputs = prog.graph.inputs
        shapes = _shapes(args.input_shape) or [v.shape for v in graph_inputs]
        if len(shapes) != len(graph_inputs):
            raise ArgumentError(
                f"the program takes {len(graph_inputs)} inputs, {len(shapes)} shapes given"
            )
        dtypes = [v.dtype for v in graph_inputs]
        inputs = random_inputs(shapes, dtypes, args.seed)
        if mode == "gpu":
            inputs = [x.cuda() for x in inputs]
        sync = torch.cuda.synchronize if mode == "gpu" else (lambda: None)
        t0 = time.perf_counter()
        out = prog.run(*inputs, mode=mode)
        sync()
        first = time.perf_counter() - t0
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            out = prog.run(*inputs, mode=mode)
            sync()
            times.append(time.perf_counter() - t0)
    except KernforgeError as e:
        print(f"kernforge run: {e}", file=sys.stderr)
        return 2
    for i, t in enumerate(_flat(out)):
        print(_summary(f"output {i}", t))
    line = f"mode {mode}: first call {1e3 * first:.2f} ms"
    if times:
        line += f", median of {len(times)} calls {1e3 * statistics.median(times):.3f} ms"
    print(line)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .runtime.archive import load, read, summary

    try:
        print(summary(args.program))
        if args.graph:
            print(read(args.program).graph)
        print(load(args.program).describe())
    except KernforgeError as e:
        print(f"kernforge inspect: {e}", file=sys.stderr)
        return 2
    return 0


def add_commands(sub) -> None:
    """Register ``compile``, ``run`` and ``inspect`` on the ``kernforge`` parser's
    subcommands."""
    comp = sub.add_parser("compile", help="compile a torch model into a saved kernforge "
                          "program (.kf file, or a folder)")  # fmt: skip
    comp.add_argument("target", metavar="MODULE:FACTORY", help="a .py file or dotted module, "
                      "and the function in it that returns the model")  # fmt: skip
    comp.add_argument("--input-shape", action="append", required=True, help="an example "
                      "input's shape, e.g. 1x3x224x224 (repeat, or separate with commas, for "
                      "several inputs)")  # fmt: skip
    comp.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                      help="compute dtype of the program (default: the model's)")  # fmt: skip
    comp.add_argument("--input-dtype", help="dtype of the random example inputs, one or "
                      "one per input, comma-separated (default: float32, the program casts to "
                      "--dtype itself; "
                      "int64 for token ids)")  # fmt: skip
    comp.add_argument("--mode", choices=MODES, help="where the program will run (default: "
                      "gpu with a CUDA GPU, else interpret)")  # fmt: skip
    comp.add_argument("-o", "--output", required=True, help="out.kf (one file) or a folder")
    comp.add_argument("--check", action="store_true", help="run the program once and print "
                      "its error against the eager model")  # fmt: skip
    comp.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    comp.set_defaults(func=_compile)
    run = sub.add_parser("run", help="run a saved program on random inputs: output "
                         "statistics and time per call")  # fmt: skip
    run.add_argument("program", help="a .kf file or program folder")
    run.add_argument("--mode", choices=MODES, help="gpu (default with a CUDA GPU), interpret "
                     "(the generated kernels in Triton's CPU interpreter) or numpy")  # fmt: skip
    run.add_argument("--input-shape", action="append", help="input shapes (default: the "
                     "shapes it was compiled for)")  # fmt: skip
    run.add_argument("--repeat", type=int, default=10, help="timed calls after the first")
    run.add_argument("--seed", type=int, default=0)
    run.set_defaults(func=_run)
    insp = sub.add_parser("inspect", help="print what a saved program holds: kernels, "
                          "partitions, buffers, weights")  # fmt: skip
    insp.add_argument("program", help="a .kf file or program folder")
    insp.add_argument("--graph", action="store_true", help="print the IR graph too")
    insp.set_defaults(func=_inspect)
