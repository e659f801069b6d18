"""The measurement store: every timing the tuner takes, kept as a dataset to learn from.

Each measurement is one JSON line in ``KERNFORGE_CACHE_DIR/tune/measurements/<kernel>.jsonl``
(``kernel``: the kernel family, e.g. ``matmul_tma``, shared by the tuners of its shape
classes)::

    {"v": 1, "kernel": "matmul_tma", "tuner": "matmul_tma_large", "version": "5",
     "source": "5", "arch": "sm_90", "gpu": "NVIDIA H100 80GB HBM3", "triton": "3.6.0",
     "torch": "2.11.0", "key": [4096, 4096, 4096, "bfloat16", 0, 1, 1, 0],
     "features": {"m": 4096, ...}, "dtype": "bfloat16", "config": {"block_m": 128, ...},
     "ms": 0.183, "error": "", "when": "2026-11-24T15:02:11+00:00"}

``ms`` is null (and ``error`` says why) for a config that failed to compile or launch.

Concurrency: a line is written with one ``os.write`` on a file opened ``O_APPEND``, so lines of
several processes never interleave (the kernel positions and writes an append atomically on a
local file system). A reader skips a line that does not parse (a writer killed mid-line, a
disk that filled up): a damaged store loses that line, never the rest.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .. import config

#: Record format: bumped when a field changes meaning (older lines are then skipped).
SCHEMA = 1


def root() -> Path:
    """The folder of the measurement files (under ``KERNFORGE_CACHE_DIR``)."""
    return config.settings.cache_dir / "tune" / "measurements"


def path(kernel: str) -> Path:
    """The measurement file of kernel family ``kernel``."""
    if not kernel or "/" in kernel or kernel.startswith("."):
        from ..errors import ArgumentError

        raise ArgumentError(f"tune.store: bad kernel name {kernel!r}; use a plain file name")
    return root() / f"{kernel}.jsonl"


def now() -> str:
    """The current UTC time as an ISO string (seconds)."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def make_record(
    kernel: str,
    tuner: str,
    version: str,
    key: Any,
    config_fields: dict,
    ms: float | None,
    error: str = "",
    *,
    features: dict | None = None,
    dtype: str = "",
    source: str | None = None,
    device_id: dict | None = None,
) -> dict:
    """One measurement as a store record (see the module docstring for the fields).

    ``device_id``: {"gpu", "arch", "triton", "torch"} (default: this process's device)."""
    dev = device_id if device_id is not None else device_fields()
    return {
        "v": SCHEMA,
        "kernel": kernel,
        "tuner": tuner,
        "version": str(version),
        "source": str(source or version),
        "arch": dev.get("arch", "cpu"),
        "gpu": dev.get("gpu", "none"),
        "triton": dev.get("triton", ""),
        "torch": dev.get("torch", ""),
        "key": key,
        "features": dict(features or {}),
        "dtype": dtype,
        "config": dict(config_fields),
        "ms": None if ms is None else float(ms),
        "error": "" if ms is not None else (error or "failed")[:300],
        "when": now(),
    }


def device_fields() -> dict:
    """gpu, arch and the triton/torch versions of this process (the record's device part)."""
    import torch
    import triton

    from .. import device

    info = device.describe()
    return {
        "gpu": str(info.get("gpu", "none")),
        "arch": str(info.get("arch", "cpu")),
        "triton": triton.__version__,
        "torch": torch.__version__.split("+")[0],
    }


def _torch_version() -> str:
    import torch

    return torch.__version__.split("+")[0]


def append(kernel: str, records: Iterable[dict]) -> int:
    """Append ``records`` to ``kernel``'s file, one ``os.write`` per line (safe beside other
    processes appending to the same file). Returns how many were written."""
    lines = [json.dumps(r, separators=(",", ":"), sort_keys=True) + "\n" for r in records]
    if not lines:
        return 0
    target = path(kernel)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        for line in lines:
            os.write(fd, line.encode())
    finally:
        os.close(fd)
    return len(lines)


def _lines(file: Path) -> Iterator[dict]:
    try:
        data = file.read_bytes()
    except OSError:
        return
    for raw in data.split(b"\n"):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except ValueError:
            continue  # a line cut short (a killed writer) or damaged: skipped, never fatal
        if isinstance(rec, dict) and rec.get("v") == SCHEMA and "config" in rec:
            yield rec


def load(kernel: str, arch: str | None = None, **match: Any) -> list[dict]:
    """The records of ``kernel`` (optionally only of ``arch``, and of fields equal to
    ``match``, e.g. ``version="5"``), in the order they were written."""
    out = []
    for rec in _lines(path(kernel)):
        if arch is not None and rec.get("arch") != arch:
            continue
        if any(rec.get(k) != v for k, v in match.items()):
            continue
        out.append(rec)
    return out


def kernels() -> list[str]:
    """Kernel families with a measurement file."""
    return sorted(p.stem for p in root().glob("*.jsonl"))


def best_by_key(records: Iterable[dict]) -> dict[str, tuple[float, dict]]:
    """The fastest measured (ms, config) of each key (keys as their JSON text)."""
    best: dict[str, tuple[float, dict]] = {}
    for rec in records:
        ms = rec.get("ms")
        if ms is None:
            continue
        k = json.dumps(rec["key"], separators=(",", ":"))
        if k not in best or ms < best[k][0]:
            best[k] = (ms, rec["config"])
    return best


def record_tuning(tuner: Any, key: tuple, timings: Sequence[tuple[Any, float | None, str]]) -> None:
    """Append a tuner's measurements of ``key`` (``(config, ms or None, error)`` each) to the
    store, under its family's name. A store that cannot be written is reported, never fatal:
    tuning goes on without it."""
    import dataclasses
    import sys

    from . import space
    from .tuner import _device_id, _plain

    try:
        fam = space.family_of(tuner.name)
        plain = _plain(tuple(key))
        if fam is not None:
            kernel, features, dtype = fam.name, fam.features(tuple(key)), fam.dtype(tuple(key))
        else:
            kernel, dtype = tuner.name, ""
            features = {f"k{i}": v for i, v in enumerate(plain) if isinstance(v, int | float)}
            dtype = next((v for v in plain if isinstance(v, str) and "float" in v), "")
        ident = list(_device_id())  # the tuner's ident of this device (tests fake it)
        dev = {"gpu": ident[0], "arch": ident[1], "triton": ident[2],
               "torch": ident[3] if len(ident) > 3 else _torch_version()}  # fmt: skip
        source = getattr(tuner, "source_hash", None) or tuner.version
        append(kernel, [
            make_record(kernel, tuner.name, tuner.version, plain, dataclasses.asdict(cfg), ms,
                        err, features=features, dtype=dtype, source=source, device_id=dev)
            for cfg, ms, err in timings
        ])  # fmt: skip
    except Exception as exc:  # noqa: BLE001  (the store is a by-product: never break tuning)
        print(f"kernforge.tune: measurements of {tuner.name} not stored ({exc})",
              file=sys.stderr)  # fmt: skip
