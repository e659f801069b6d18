"""The tuner: measure candidate configs once per (kernel, key, device), remember the best."""

from __future__ import annotations

import collections
import dataclasses
import datetime
import functools
import hashlib
import json
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import config, device
from ..errors import ArgumentError
from ..fileio import write_atomic
from ..progress import Progress

#: Bumped when the on-disk entry format changes: older entries are then re-measured.
#: 2: the device ident also holds the torch version and the GPU driver.
FORMAT = 2

_force = False
_TUNERS: dict[str, Tuner] = {}

#: Where :meth:`Tuner.pick`'s answers came from, counted since import: "memo", "disk",
#: "pretuned", "measured", "default". Warm-up and the cold-start benchmark read it.
stats: collections.Counter[str] = collections.Counter()


def bucket(n: int) -> int:
    """The shape bucket of a size: the next power of two (1 for 0 and 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


@contextmanager
def forcing() -> Iterator[None]:
    """Inside, :meth:`Tuner.pick` re-measures every key it is asked for, even remembered ones
    (``kernforge tune`` uses this), and stores the new choice."""
    global _force
    before, _force = _force, True
    try:
        yield
    finally:
        _force = before


def _plain(value: Any) -> Any:
    """A key part as JSON: tuples become lists, torch dtypes their names."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise ArgumentError(f"tune keys hold ints, floats, strs, bools and dtypes; got {value!r}")


def _driver_version() -> str:
    """The NVIDIA kernel driver's version ("580.159"), else the CUDA driver API's, else
    "none": a driver update can change what the JIT makes of the same PTX."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
        for word in text.split():
            if word.count(".") >= 1 and word.replace(".", "").isdigit():
                return word
    except OSError:
        pass
    try:
        import ctypes

        version = ctypes.c_int()
        ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version))
        return f"cuda{version.value}"
    except (OSError, AttributeError):
        return "none"


@functools.cache
def _device_id() -> list[str]:
    """[gpu name, arch, triton version, torch version, driver]: an entry measured under any
    other ident is ignored (and dropped by ``kernforge cache prune``)."""
    import triton

    info = device.describe()
    driver = _driver_version() if device.cuda_available() else "none"
    return [info.get("gpu", "none"), info.get("arch", "cpu"), triton.__version__,
            torch.__version__, driver]  # fmt: skip


def current_device_id() -> list[str]:
    """This install's device ident (see :func:`_device_id`)."""
    return list(_device_id())


class Tuner:
    """Candidate launch configs of one kernel, and the best one per key.

    ``configs`` are frozen dataclasses of one type (their fields, ints/strs/bools, are what the
    disk cache stores). ``version`` names the kernel's code: change it when the kernel changes,
    and older measurements are ignored and re-taken.
    """

    def __init__(self, name: str, configs: Sequence[Any], version: str = "1"):
        if not configs:
            raise ArgumentError(f"tune.Tuner({name!r}): no candidate configs")
        kinds = {type(c) for c in configs}
        if len(kinds) != 1 or not dataclasses.is_dataclass(configs[0]):
            raise ArgumentError(f"tune.Tuner({name!r}): configs must be dataclasses of one type")
        self.name, self.version = name, str(version)
        self.configs = list(dict.fromkeys(configs))  # unique, in order
        self._memo: dict[tuple, Any] = {}  # by key as given: the hot path hashes nothing else
        _TUNERS[name] = self

    def _ident(self, key: tuple) -> tuple[list, str]:
        full = [FORMAT, self.name, self.version, _device_id(), _plain(tuple(key))]
        text = json.dumps(full, separators=(",", ":"))
        return full, hashlib.sha256(text.encode()).hexdigest()[:24]

    def path(self, key: tuple) -> Path:
        """The file that remembers ``key``'s choice on this device."""
        _, digest = self._ident(key)
        return config.settings.cache_dir / "tune" / self.name / f"{digest}.json"

    def _config_of(self, fields: dict) -> Any | None:
        for c in self.configs:
            if dataclasses.asdict(c) == fields:
                return c
        from . import space  # a model-pruned tuning may choose from the family's wide space

        return space.config_in_space(self.name, fields)  # None: stale (no longer offered)

    def _load(self, key: tuple) -> Any | None:
        full, _ = self._ident(key)
        try:
            entry = json.loads(self.path(key).read_text())
            if not isinstance(entry, dict) or entry["ident"] != full:
                return None
            fields = entry["config"]
            return self._config_of(fields) if isinstance(fields, dict) else None
        except (OSError, ValueError, KeyError, TypeError):
            return None  # missing, truncated, garbage or foreign: measure again

    def _pretuned(self, key: tuple) -> Any | None:
        """The shipped table's config for ``key`` on this arch (kernforge.tune.pretuned), when
        it names this tuner version and a config still offered; else None."""
        if not config.settings.pretuned:
            return None
        from . import pretuned

        fields = pretuned.lookup(_device_id()[1], self.name, self.version, _plain(tuple(key)))
        return None if fields is None else self._config_of(fields)

    def pick(self, key: tuple, run: Callable[[Any], object], default: Any) -> Any:
        """The best config for ``key``: remembered in this process, else on disk (measured
        here before), else in the shipped table for this arch (``KERNFORGE_PRETUNED``), else
        measured with ``run`` (on a GPU, with ``KERNFORGE_TUNE=auto``), else ``default``.

        ``run(config)`` launches the kernel once on real buffers. Under the CPU interpreter,
        during CUDA-graph capture and with ``KERNFORGE_TUNE=off`` nothing is measured.
        """
        if not _force:
            hit = self._memo.get(key)
            if hit is not None:
                stats["memo"] += 1
                return hit
        if device.INTERPRET or not device.cuda_available():
            stats["default"] += 1
            return default
        if not _force:
            for source, find in (("disk", self._load), ("pretuned", self._pretuned)):
                hit = find(key)
                if hit is not None:
                    stats[source] += 1
                    self._memo[key] = hit
                    return hit
            if config.settings.tune == "off":
                stats["default"] += 1
                return default
        if torch.cuda.is_current_stream_capturing() or torch.compiler.is_compiling():
            stats["default"] += 1
            return default  # timing would break the capture; not remembered
        best = self.measure(key, run)
        stats["measured" if best is not None else "default"] += 1
        self._memo[key] = best if best is not None else default
        return self._memo[key]

    def measure(self, key: tuple, run: Callable[[Any], object]) -> Any | None:
        """Time every candidate for ``key`` with ``run`` and store the fastest (None when
        every candidate failed to compile or launch).

        With a trained performance model (:func:`kernforge.tune.model.plan`) the candidates
        are the kernel's wide space in the model's order, and only the first
        ``KERNFORGE_TUNE_TOPK`` that run are measured. Every timing is appended to the
        measurement store (:mod:`kernforge.tune.store`)."""
        from . import model as _model
        from . import store as _store

        timings: list[tuple[Any, float | None, str]] = []
        shown = ", ".join(map(str, key))
        plan = _model.plan(self.name, key)
        candidates = plan.candidates if plan is not None else self.configs
        want = plan.k if plan is not None else len(candidates)
        if plan is not None:
            note = (f"measuring {want} of {plan.total} configs (the performance model's top "
                    f"{want}; once per shape bucket; remembered on disk)")  # fmt: skip
        else:
            note = f"measuring {want} of {want} configs (once per shape bucket; remembered on disk)"
        print(f"kernforge.tune: {self.name} ({shown}): {note}", file=sys.stderr, flush=True)
        with Progress(want, f"tune {self.name}") as bar:
            for cfg in candidates:
                # Pruned: stop once ``want`` ran (a failure takes the next candidate, at most
                # 2 * want tries).
                if plan is not None and (
                    sum(ms is not None for _, ms, _ in timings) >= want or len(timings) >= 2 * want
                ):
                    break
                try:
                    ms = _time(run, cfg)
                    timings.append((cfg, ms, ""))
                except Exception as exc:  # noqa: BLE001  (any failure rules the config out)
                    timings.append((cfg, None, f"{type(exc).__name__}: {exc}"[:200]))
                bar.step(f"{cfg}"[:60])
        _store.record_tuning(self, key, timings)
        ok = [(ms, i) for i, (_, ms, _) in enumerate(timings) if ms is not None]
        if not ok:
            print(f"kernforge.tune: {self.name}: every config failed ({timings[0][2]})",
                  file=sys.stderr)  # fmt: skip
            return None
        best = timings[min(ok)[1]][0]
        full, _ = self._ident(key)
        entry = {
            "ident": full,
            "config": dataclasses.asdict(best),
            "ms": min(ok)[0],
            "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "timings": [[dataclasses.asdict(c), ms, err] for c, ms, err in timings],
        }
        write_atomic(self.path(key), json.dumps(entry, indent=1) + "\n")
        return best


def _time(run: Callable[[Any], object], cfg: Any) -> float:
    """Median ms of ``run(cfg)``'s GPU work. The launch is captured in a CUDA graph and the
    replays are timed, so that a short kernel's figure is the kernel's and not the Python
    launch's (a 10 us kernel takes as long to launch); a launch that cannot be captured (one
    that syncs, say) is timed call by call instead."""
    import triton.testing

    run(cfg)  # compiles; a config over the shared-memory budget fails here
    torch.cuda.synchronize()
    fn: Callable[[], object] = lambda: run(cfg)  # noqa: E731
    try:
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            run(cfg)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.cuda.graph(graph, stream=stream):
                run(cfg)
        # An empty graph (the launch went to another stream) would time nothing.
        if not any("empty" in str(w.message) for w in caught):
            fn = graph.replay
    except Exception:  # noqa: BLE001  (not capturable: time the launches)
        torch.cuda.synchronize()
    return float(triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median"))


@dataclass(frozen=True)
class CliEntry:
    """A kernel that ``kernforge tune`` can tune: ``run(shape, dtype)`` calls it once."""

    run: Callable[[tuple[int, ...], torch.dtype], object]
    shapes_help: str
    default_shapes: tuple[tuple[int, ...], ...] = ()


_CLI: dict[str, CliEntry] = {}


def register_cli(
    name: str,
    run: Callable[[tuple[int, ...], torch.dtype], object],
    shapes_help: str,
    default_shapes: Sequence[tuple[int, ...]] = (),
) -> None:
    """Make ``kernforge tune <name> --shapes ...`` call ``run(shape, dtype)`` once per shape
    under :func:`forcing`, so that every tuner it reaches re-measures. ``shapes_help`` names
    the dimensions (``"MxNxK"``); ``default_shapes`` are tuned when none are given."""
    _CLI[name] = CliEntry(run, shapes_help, tuple(tuple(s) for s in default_shapes))


def tunable() -> dict[str, CliEntry]:
    """The kernels registered for ``kernforge tune``, by name."""
    return dict(sorted(_CLI.items()))


def entries(name: str | None = None) -> list[dict]:
    """Remembered choices on disk (of kernel ``name``, or all), newest first."""
    root = config.settings.cache_dir / "tune"
    found = []
    for path in sorted(root.glob(f"{name or '*'}/*.json")):
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        # Only tuner entries: tune/models/*.json (learned models) share the folder.
        if isinstance(entry, dict) and isinstance(entry.get("ident"), list) and "config" in entry:
            found.append({"kernel": path.parent.name, "path": str(path), **entry})
    return sorted(found, key=lambda e: e.get("when", ""), reverse=True)
