"""Pre-tuned configs shipped per GPU arch, so that a fresh install tunes nothing for common shapes.

``kernforge/tune/pretuned/<arch>.json`` (``sm_90.json`` first) holds, per tuner name and
version, tuner key -> best config fields, measured on that arch by ``benchmarks/pretune.py``
and written by ``kernforge tune --export``. :meth:`kernforge.tune.Tuner.pick` consults it after
the in-memory and on-disk choices and before measuring; an entry for another tuner version, or
naming a config the tuner no longer offers, is ignored. The file::

    {"format": 1, "arch": "sm_90", "device": "...", "versions": {...}, "generated": "...",
     "tuners": {"<name>": {"version": "5", "entries": [{"key": [...], "config": {...},
                                                         "ms": 0.12}, ...]}}}

Keys are the tuner keys as JSON (tuples as lists, dtypes by name), so a lookup is exact: the
shape bucketing is the kernel's (``tune.bucket(m)`` at the call site).
"""

from __future__ import annotations

import datetime
import functools
import json
import warnings
from pathlib import Path
from typing import Any

from ..errors import ArgumentError
from ..fileio import write_atomic

#: The folder of the shipped tables (package data).
TABLE_DIR = Path(__file__).parent / "pretuned"
#: Bumped when the table layout changes: a table of another format is ignored.
TABLE_FORMAT = 1


def _key_text(key: Any) -> str:
    return json.dumps(key, separators=(",", ":"))


def table_path(arch: str) -> Path:
    """The shipped table of ``arch`` ("sm_90"); it may not exist."""
    if not arch or "/" in arch or arch.startswith("."):
        raise ArgumentError(f"pretuned: bad arch {arch!r}; expected a name like 'sm_90'")
    return TABLE_DIR / f"{arch}.json"


def empty_table(arch: str) -> dict:
    """A table with no entries for ``arch``."""
    return {"format": TABLE_FORMAT, "arch": arch, "tuners": {}}


def read_table(path: Path) -> dict | None:
    """The table in ``path``, or None when it is missing, unreadable, of another format or not
    laid out as a table (a warning says so, except for a missing file)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        warnings.warn(f"kernforge.tune: pre-tuned table {path} is unreadable ({exc}); ignored",
                      stacklevel=2)  # fmt: skip
        return None
    if (
        not isinstance(data, dict)
        or data.get("format") != TABLE_FORMAT
        or not isinstance(data.get("tuners"), dict)
    ):
        warnings.warn(f"kernforge.tune: pre-tuned table {path} is not a format-{TABLE_FORMAT} "
                      "table; ignored", stacklevel=2)  # fmt: skip
        return None
    return data


@functools.cache
def _index(path: str) -> dict[tuple[str, str], dict[str, dict]]:
    """(tuner name, version) -> key text -> config fields, of the table at ``path``."""
    data = read_table(Path(path))
    index: dict[tuple[str, str], dict[str, dict]] = {}
    if data is None:
        return index
    for name, part in data["tuners"].items():
        if not isinstance(part, dict) or not isinstance(part.get("entries"), list):
            continue
        found = index.setdefault((str(name), str(part.get("version"))), {})
        for e in part["entries"]:
            if isinstance(e, dict) and isinstance(e.get("config"), dict) and "key" in e:
                found[_key_text(e["key"])] = e["config"]
    return index


def lookup(arch: str, name: str, version: str, key: Any) -> dict | None:
    """The shipped config fields of tuner ``name`` at ``version`` for ``key`` (the tuner key as
    JSON: lists, dtype names) on ``arch``, or None."""
    if not arch or not arch.startswith("sm_"):
        return None  # the CPU, or an unknown device: nothing shipped
    part = _index(str(table_path(arch))).get((name, str(version)))
    return None if part is None else part.get(_key_text(key))


def clear_memo() -> None:
    """Forget the tables read so far (after a table file was rewritten)."""
    _index.cache_clear()


def size(path: Path) -> dict[str, int]:
    """Entries per tuner in the table at ``path`` (empty when there is none)."""
    data = read_table(path) or empty_table("")
    return {n: len(p.get("entries", [])) for n, p in sorted(data["tuners"].items())}


def merge(table: dict, entries: list[dict], arch: str, versions: dict[str, str]) -> int:
    """Fold on-disk tuning ``entries`` (:func:`kernforge.tune.entries`, newest first) of
    ``arch`` into ``table``: per tuner, entries of the tuner's current version (``versions``:
    name -> version) replace the table's for the same key; a tuner whose version changed
    loses its old entries. Returns how many keys were added or replaced."""
    changed = 0
    seen: set[tuple[str, str]] = set()
    for e in entries:
        ident = e.get("ident")
        if not (isinstance(ident, list) and len(ident) == 5 and isinstance(ident[3], list)):
            continue
        name, version, dev, key = str(ident[1]), str(ident[2]), ident[3], ident[4]
        if len(dev) < 2 or dev[1] != arch or versions.get(name, version) != version:
            continue
        if not isinstance(e.get("config"), dict):
            continue
        text = _key_text(key)
        if (name, text) in seen:
            continue  # entries come newest first: an older measurement of the same key
        seen.add((name, text))
        part = table["tuners"].get(name)
        if part is None or str(part.get("version")) != version:
            part = table["tuners"][name] = {"version": version, "entries": []}
        kept = [x for x in part["entries"] if _key_text(x.get("key")) != text]
        kept.append({"key": key, "config": e["config"], "ms": e.get("ms"),
                     "device": dev[0]})  # fmt: skip
        part["entries"] = sorted(kept, key=lambda x: _key_text(x["key"]))
        changed += 1
    for name, part in list(table["tuners"].items()):
        if name in versions and str(part.get("version")) != versions[name]:
            del table["tuners"][name]  # measured for code that has since changed
    return changed


def export(arch: str, out: Path | None = None, entries: list[dict] | None = None,
           versions: dict[str, str] | None = None) -> tuple[Path, int]:  # fmt: skip
    """Write the table of ``arch`` to ``out`` (default: the shipped file), merging the existing
    table there with the on-disk tuning entries of ``arch`` (default: all of
    ``KERNFORGE_CACHE_DIR/tune``). ``versions`` (default: the tuners loaded in this process)
    decides which entries are current. Returns (path, keys added or replaced)."""
    from . import tuner

    path = Path(out) if out is not None else table_path(arch)
    table = read_table(path) or empty_table(arch)
    table["arch"] = arch
    if entries is None:
        entries = tuner.entries()
    if versions is None:
        versions = {name: t.version for name, t in tuner._TUNERS.items()}
    changed = merge(table, entries, arch, versions)
    devices = sorted({x.get("device", "") for p in table["tuners"].values()
                      for x in p["entries"]} - {""})  # fmt: skip
    import torch
    import triton

    table.update(
        device=", ".join(devices),
        versions={"triton": triton.__version__, "torch": torch.__version__},
        generated=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    )
    write_atomic(path, dumps(table))
    clear_memo()
    return path, changed


def dumps(table: dict) -> str:
    """The table as JSON text with one entry per line (readable diffs when it is regenerated)."""
    head = [f' "{k}": {json.dumps(table.get(k))},'
            for k in ("format", "arch", "device", "versions", "generated")]  # fmt: skip
    parts = []
    for name, part in sorted(table["tuners"].items()):
        rows = ",\n".join("    " + json.dumps(e) for e in part["entries"])
        parts.append(f'  {json.dumps(name)}: {{"version": {json.dumps(part["version"])}, '
                     f'"entries": [\n{rows}\n  ]}}')  # fmt: skip
    body = "{\n" + ",\n".join(parts) + "\n }" if parts else "{}"
    return "{\n" + "\n".join(head) + f'\n "tuners": {body}\n}}\n'
