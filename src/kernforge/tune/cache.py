"""What kernforge keeps on disk, and keeping it clean: ``kernforge cache {info,clear,prune}``.

The parts (under ``KERNFORGE_CACHE_DIR`` unless noted):

- ``tune``: the tuner's remembered choices, ``tune/<tuner>/<hash>.json`` (kernforge.tune);
- ``measurements``: the measurement store, ``tune/measurements/*.jsonl`` (kernforge.tune.store);
- ``models``: the learned performance models, ``tune/models/*.json`` (kernforge.tune.model);
- ``jit``: generated Triton sources (``jit/`` of kf.jit, ``expr/`` of expressions);
- ``cuda``: NVRTC cubins, ``cuda/<xx>/<key>.kfcubin`` (kernforge.cuda.cache);
- ``triton``: Triton's compiled binaries, ``TRITON_CACHE_DIR`` (``KERNFORGE_CACHE_DIR/triton``
  unless the user set it; see kernforge.config);
- ``other``: anything else under ``KERNFORGE_CACHE_DIR``.

Every entry is keyed so that a stale one is never used: a tune entry carries its format, tuner
version and device ident (GPU, arch, triton, torch, driver) and is re-measured when any differs;
a cubin carries its key, size and checksum; Triton's binaries are keyed by Triton itself.
:func:`prune` deletes what this install can no longer use (and corrupt files); it never deletes
what it cannot judge.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .. import config

PARTS = ("tune", "measurements", "models", "jit", "cuda", "triton", "other")
#: Folders under ``tune/`` that hold no tuner entries.
_NOT_TUNERS = ("measurements", "models")
#: Temporary files (an interrupted atomic write) older than this are dropped by prune.
STALE_TMP_S = 3600.0
#: A Triton cache folder with no group file, older than this, was never completed.
INCOMPLETE_TRITON_S = 600.0


def _root() -> Path:
    return Path(config.settings.cache_dir)


def _files(folder: Path) -> Iterator[Path]:
    if folder.is_dir():
        yield from (p for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def part_files(part: str) -> list[Path]:
    """The files of one part of the cache (see the module docstring)."""
    root = _root()
    if part == "tune":
        return [
            p for p in _files(root / "tune")
            if p.relative_to(root / "tune").parts[0] not in _NOT_TUNERS
        ]  # fmt: skip
    if part in _NOT_TUNERS:
        return list(_files(root / "tune" / part))
    if part == "jit":
        return [*_files(root / "jit"), *_files(root / "expr")]
    if part == "cuda":
        return list(_files(root / "cuda"))
    if part == "triton":
        return list(_files(config.triton_cache_dir()))
    if part == "other":
        known = {root / "tune", root / "jit", root / "expr", root / "cuda"}
        triton_dir = config.triton_cache_dir()
        return [
            p for p in _files(root)
            if not any(p.is_relative_to(k) for k in known) and not p.is_relative_to(triton_dir)
        ]  # fmt: skip
    raise ValueError(f"unknown cache part {part!r}; parts: {', '.join(PARTS)}")


def _entries(part: str, files: list[Path]) -> int:
    """Entries of a part: tune JSON files, measurement lines, sources, cubins, Triton kernels."""
    if part == "tune":
        return sum(1 for p in files if p.suffix == ".json")
    if part == "measurements":
        n = 0
        for p in files:
            try:
                with p.open("rb") as f:
                    n += sum(1 for _ in f)
            except OSError:
                pass
        return n
    if part == "jit":
        return sum(1 for p in files if p.suffix == ".py")
    if part == "cuda":
        return sum(1 for p in files if p.suffix == ".kfcubin")
    if part == "triton":
        return len({p.parent for p in files})  # one folder per compiled kernel
    return len(files)


@dataclass
class PartInfo:
    """Size of one part of the cache."""

    part: str
    path: str
    files: int
    entries: int
    bytes: int


def info() -> list[PartInfo]:
    """Files, entries and bytes of each part of the cache."""
    out = []
    root = _root()
    where = {"tune": root / "tune", "measurements": root / "tune" / "measurements",
             "models": root / "tune" / "models",
             "jit": root / "jit", "cuda": root / "cuda", "triton": config.triton_cache_dir(),
             "other": root}  # fmt: skip
    for part in PARTS:
        files = part_files(part)
        size = 0
        for p in files:
            with contextlib.suppress(OSError):
                size += p.stat().st_size
        out.append(PartInfo(part, str(where[part]), len(files), _entries(part, files), size))
    return out


def clear(parts: Sequence[str] = PARTS) -> dict[str, int]:
    """Delete the files of ``parts``; returns files deleted per part. Folders left empty are
    removed too."""
    done = {}
    for part in parts:
        files = part_files(part)
        for p in files:
            p.unlink(missing_ok=True)
        done[part] = len(files)
        base = {"triton": config.triton_cache_dir(), "cuda": _root() / "cuda",
                "jit": _root() / "jit"}.get(part)  # fmt: skip
        if base is not None:
            _drop_empty_dirs(base)
    _drop_empty_dirs(_root() / "tune")
    _drop_empty_dirs(_root() / "expr")
    return done


def _drop_empty_dirs(folder: Path) -> None:
    if not folder.is_dir():
        return
    for d in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):  # not empty
            d.rmdir()


# ------------------------------------------------------------------------------ prune


@dataclass
class PruneReport:
    """What :func:`prune` deleted (paths, with why) and kept."""

    removed: list[tuple[str, str]] = field(default_factory=list)
    kept: dict[str, int] = field(default_factory=dict)

    def drop(self, path: Path, why: str, dry_run: bool) -> None:
        """Record (and unless ``dry_run`` delete) ``path``."""
        self.removed.append((str(path), why))
        if not dry_run:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def tune_entry_problem(path: Path, device_id: list[str] | None = None) -> str | None:
    """Why the tune entry at ``path`` can never be used by this install (corrupt, another entry
    format, another device ident, an older version of a loaded tuner, or a config that tuner no
    longer offers), or None when it is current (or belongs to a tuner not loaded here, which
    cannot be judged)."""
    from . import tuner

    try:
        entry = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return "corrupt (not JSON)"
    if not isinstance(entry, dict):
        return "corrupt (not an entry)"
    ident = entry.get("ident")
    if not (isinstance(ident, list) and len(ident) == 5 and isinstance(entry.get("config"), dict)):
        return "corrupt (no ident or config)"
    if ident[0] != tuner.FORMAT:
        return f"entry format {ident[0]!r}, current {tuner.FORMAT}"
    dev = device_id if device_id is not None else tuner.current_device_id()
    if ident[3] != dev:
        return f"measured on {ident[3]}, this install is {dev}"
    owner = tuner._TUNERS.get(str(ident[1]))
    if owner is None:
        return None
    if str(ident[2]) != owner.version:
        return f"tuner {ident[1]} version {ident[2]!r}, current {owner.version!r}"
    if owner._config_of(entry["config"]) is None:
        return "config no longer offered"
    _, digest = owner._ident(tuple(_tupled(ident[4])))
    if path.stem != digest:
        return "file name does not match its key"
    return None


def _tupled(value):
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value


def prune(dry_run: bool = False, device_id: list[str] | None = None) -> PruneReport:
    """Delete what this install can never use: tune entries that are corrupt or of another
    format, device ident (GPU, arch, triton, torch, driver) or tuner version; measurement lines
    of another record schema are left to the store (it skips them); cubins that fail their
    checks; Triton cache folders never completed; temporary files of interrupted writes.
    ``dry_run`` reports without deleting. ``device_id`` overrides this install's ident
    (tests)."""
    import kernforge  # noqa: F401  (registers the catalog's tuners, so versions can be judged)

    from ..cuda import cache as cubins

    report = PruneReport()
    now = time.time()
    for part in PARTS:
        kept = 0
        for p in part_files(part):
            why = None
            if p.name.startswith(".") and p.name.endswith(".tmp"):
                if now - _mtime(p) > STALE_TMP_S:
                    why = "interrupted write (temporary file)"
            elif part == "tune" and p.suffix == ".json":
                why = tune_entry_problem(p, device_id)
            elif part == "cuda" and p.suffix == ".kfcubin":
                try:
                    ok = cubins.decode(p.stem, p.read_bytes()) is not None
                except OSError:
                    ok = False
                why = None if ok else "corrupt or stale cubin (key, size or checksum)"
            if why:
                report.drop(p, why, dry_run)
            else:
                kept += 1
        report.kept[part] = kept
    tdir = config.triton_cache_dir()
    if tdir.is_dir():
        for d in tdir.iterdir():
            incomplete = d.is_dir() and not any(d.glob("__grp__*.json"))
            if incomplete and now - _mtime(d) > INCOMPLETE_TRITON_S:
                report.drop(d, "incomplete Triton cache folder (no group file)", dry_run)
    return report


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0


def human(n: float) -> str:
    """Bytes as ``12.3 MB``."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"
