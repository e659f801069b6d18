"""Saving and loading compiled programs: a folder, or one ``.kf`` file (a zip archive, stored
without compression), holding two members and no pickle:

- ``program.json``: format ``kernforge.program/1``; the IR graph (``kernforge.ir/1``), the
  program's meta data, the generated kernel sources (for inspection, and to notice when this
  kernforge generates different code than the one that saved it), the buffer plan, the weights'
  names, shapes and dtypes, the versions of kernforge/torch/triton that wrote it, the size and
  sha256 of every other member, and the sha256 of the document itself (``digest``);
- ``weights.safetensors``: the program's weights (after BatchNorm folding, casts and layout
  changes: the recipes ran at compile time).

:func:`load` checks all of it before it builds anything: the format version, the document's
digest, each member's size and hash, the graph (``Graph.from_json`` re-infers every shape), and
every weight's name, shape and dtype against the graph's weight nodes. A truncated, corrupted or
edited file raises :class:`ProgramFormatError` naming the member and what was expected.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import KernforgeError
from ..fileio import write_atomic
from ..ir import Graph

FORMAT = "kernforge.program/1"
PROGRAM = "program.json"
WEIGHTS = "weights.safetensors"
#: File suffix of the single-file form; any other path is a folder.
SUFFIX = ".kf"


class ProgramFormatError(KernforgeError, ValueError):
    """A saved program is not readable: truncated, corrupted, edited, or of another format."""


@dataclass
class SavedProgram:
    """A checked saved program, before its kernels are built: the document, graph, weights."""

    path: Path
    doc: dict[str, Any]
    graph: Graph
    weights: dict[str, torch.Tensor]

    @property
    def meta(self) -> dict[str, Any]:
        return self.doc.get("meta", {})

    @property
    def kernel_sources(self) -> dict[str, str]:
        return {k["name"]: k["source"] for k in self.doc.get("kernels", [])}


# -- saving ----------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    import triton

    from .. import __version__

    out = {"kernforge": __version__, "torch": torch.__version__, "triton": triton.__version__}
    try:
        import safetensors

        out["safetensors"] = safetensors.__version__
    except ImportError:  # pragma: no cover (save needs it; load reports it missing)
        pass
    out["python"] = platform.python_version()
    return out


def _sources(program) -> dict[str, str]:
    """The program's generated kernel sources by kernel name (none when it has none)."""
    get = getattr(program, "kernel_sources", None)
    got = get() if callable(get) else get
    return dict(got or {})


def _plan(program) -> dict[str, Any] | None:
    plan = getattr(program, "buffer_plan", None)
    return plan.to_json() if plan is not None else None


def _digest(doc: Mapping[str, Any]) -> str:
    """sha256 of the document without its ``digest`` field, in one canonical spelling."""
    body = {k: v for k, v in doc.items() if k != "digest"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _weights_for_file(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors; ones that share storage (tied weights) copied, because
    safetensors stores each tensor's bytes once and refuses shared ones."""
    out, seen = {}, set()
    for name, t in weights.items():
        if not isinstance(t, torch.Tensor):
            raise ProgramFormatError(f"weight {name!r} is a {type(t).__name__}, not a tensor")
        t = t.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
        if key is not None and (key in seen or t.untyped_storage().nbytes() != t.nbytes):
            t = t.clone()
        seen.add(key)
        out[name] = t
    return out


def _hash_file(path: Path) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def _document(program, weights: Mapping[str, torch.Tensor], members: dict) -> dict[str, Any]:
    from ..frontend.dtypes import ir_dtype as from_torch

    meta = dict(getattr(program, "meta", None) or {})
    try:
        meta = json.loads(json.dumps(meta, allow_nan=True))
    except (TypeError, ValueError) as e:
        raise ProgramFormatError(
            f"program meta data must be JSON-able (numbers, strings, lists, dicts): {e}"
        ) from e
    sources = _sources(program)
    doc = {
        "format": FORMAT,
        "versions": _versions(),
        "meta": meta,
        "graph": json.loads(program.graph.to_json()),
        "weights": {
            k: {"shape": list(t.shape), "dtype": from_torch(t.dtype)} for k, t in weights.items()
        },
        "kernels": [
            {"name": k, "sha256": hashlib.sha256(s.encode()).hexdigest(), "source": s}
            for k, s in sources.items()
        ],
        "buffer_plan": _plan(program),
        "members": members,
    }
    doc = json.loads(json.dumps(doc, allow_nan=True))  # the spelling load will see
    doc["digest"] = _digest(doc)
    return doc


def save(program, path: str | os.PathLike) -> Path:
    """Write ``program`` (its graph, weights, meta, kernel sources and buffer plan) to ``path``:
    one ``.kf`` file when the path ends in ``.kf``, else a folder. Files are written atomically
    (a reader sees the old program or the new one). Returns the path."""
    from safetensors.torch import save_file

    path = Path(path)
    weights = _weights_for_file(dict(program.weights))
    folder = path.parent if path.suffix == SUFFIX else path
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".weights.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        save_file(weights, str(tmp), metadata={"format": FORMAT})
        sha, size = _hash_file(tmp)
        doc = _document(program, weights, {WEIGHTS: {"sha256": sha, "bytes": size}})
        text = json.dumps(doc, indent=1, allow_nan=True)
        if path.suffix == SUFFIX:
            fd, tmpzip = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
            os.close(fd)
            try:
                with zipfile.ZipFile(tmpzip, "w", zipfile.ZIP_STORED) as zf:
                    zf.writestr(PROGRAM, text)
                    zf.write(tmp, WEIGHTS)
                os.replace(tmpzip, path)
            except BaseException:
                Path(tmpzip).unlink(missing_ok=True)
                raise
        else:
            os.replace(tmp, path / WEIGHTS)
            write_atomic(path / PROGRAM, text)  # last: a half-written folder has none
    finally:
        tmp.unlink(missing_ok=True)
    return path


# -- loading ---------------------------------------------------------------------------------


class _Folder:
    def __init__(self, path: Path) -> None:
        self.path = path

    def names(self) -> set[str]:
        return {p.name for p in self.path.iterdir() if p.is_file()}

    def read(self, name: str) -> bytes:
        return (self.path / name).read_bytes()

    def close(self) -> None:
        pass


class _Zip:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.zf = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as e:
            raise ProgramFormatError(
                f"{str(path)!r} is not a readable kernforge program archive ({e}); the file "
                "is truncated or not a .kf file: save the program again"
            ) from None

    def names(self) -> set[str]:
        return set(self.zf.namelist())

    def read(self, name: str) -> bytes:
        try:
            return self.zf.read(name)
        except (zipfile.BadZipFile, OSError, EOFError) as e:  # CRC mismatch, cut-off data
            raise ProgramFormatError(
                f"{str(self.path)!r}: member {name!r} is corrupted or truncated ({e})"
            ) from None

    def close(self) -> None:
        self.zf.close()


def _open(path: Path) -> _Folder | _Zip:
    if path.is_dir():
        return _Folder(path)
    if path.is_file():
        return _Zip(path)
    raise ProgramFormatError(
        f"no saved program at {str(path)!r} (expected a .kf file or a folder with {PROGRAM})"
    )


def _check_doc(where: str, raw: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError) as e:
        raise ProgramFormatError(f"{where}: {PROGRAM} is not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise ProgramFormatError(f"{where}: {PROGRAM} holds a {type(doc).__name__}, not an object")
    fmt = doc.get("format")
    if fmt != FORMAT:
        newer = isinstance(fmt, str) and fmt.startswith("kernforge.program/")
        hint = (
            " (written by another kernforge version; load it with that version, or compile the "
            "model again)"
            if newer
            else ""
        )
        raise ProgramFormatError(
            f"{where}: {PROGRAM} has format {fmt!r}, this kernforge reads {FORMAT!r}{hint}"
        )
    missing = [k for k in ("graph", "weights", "members", "digest", "meta") if k not in doc]
    if missing:
        raise ProgramFormatError(f"{where}: {PROGRAM} lacks the field(s) {', '.join(missing)}")
    got = _digest(doc)
    if doc["digest"] != got:
        raise ProgramFormatError(
            f"{where}: {PROGRAM} was changed after it was saved (its sha256 is {got}, the "
            f"digest it records is {doc['digest']})"
        )
    return doc


def _check_member(where: str, name: str, data: bytes, want: Mapping[str, Any]) -> None:
    if len(data) != want.get("bytes"):
        raise ProgramFormatError(
            f"{where}: member {name!r} has {len(data)} bytes, {PROGRAM} records "
            f"{want.get('bytes')} (truncated or replaced)"
        )
    got = hashlib.sha256(data).hexdigest()
    if got != want.get("sha256"):
        raise ProgramFormatError(
            f"{where}: member {name!r} has sha256 {got}, {PROGRAM} records {want.get('sha256')} "
            "(corrupted or edited)"
        )


def _check_weights(where: str, graph: Graph, weights: Mapping[str, torch.Tensor]) -> None:
    from ..frontend.dtypes import ir_dtype as from_torch

    nodes = {n.attrs["name"]: n.output for n in graph.nodes if n.op == "weight"}
    for name, v in nodes.items():
        if name not in weights:
            raise ProgramFormatError(f"{where}: {WEIGHTS} has no tensor {name!r} (the graph uses)")
        t = weights[name]
        if tuple(t.shape) != v.shape or from_torch(t.dtype) != v.dtype:
            raise ProgramFormatError(
                f"{where}: weight {name!r} is {from_torch(t.dtype)}{list(t.shape)} in {WEIGHTS}, "
                f"the graph expects {v.dtype}{list(v.shape)}"
            )
    extra = sorted(set(weights) - set(nodes))
    if extra:
        raise ProgramFormatError(
            f"{where}: {WEIGHTS} holds tensors the graph does not use: {', '.join(extra[:5])}"
        )


def read(path: str | os.PathLike) -> SavedProgram:
    """Read and check a saved program (format, digests, graph, weights) without building its
    kernels; :func:`load` builds the runnable Program from it."""
    from safetensors.torch import load as st_load

    path = Path(path)
    where = str(path)
    box = _open(path)
    try:
        names = box.names()
        if PROGRAM not in names:
            raise ProgramFormatError(f"{where}: member {PROGRAM!r} is missing")
        doc = _check_doc(where, box.read(PROGRAM))
        members = doc["members"]
        if WEIGHTS not in members:
            raise ProgramFormatError(f"{where}: {PROGRAM} lists no {WEIGHTS!r} member")
        for name in members:
            if name not in names:
                raise ProgramFormatError(f"{where}: member {name!r} is missing")
        data = box.read(WEIGHTS)
        _check_member(where, WEIGHTS, data, members[WEIGHTS])
        for name, want in members.items():
            if name != WEIGHTS:
                _check_member(where, name, box.read(name), want)
    finally:
        box.close()
    try:
        weights = st_load(data)
    except Exception as e:  # safetensors raises its own error type for a bad header
        raise ProgramFormatError(f"{where}: {WEIGHTS} is not readable safetensors: {e}") from e
    try:
        graph = Graph.from_json(json.dumps(doc["graph"], allow_nan=True))
    except (KernforgeError, KeyError, TypeError, ValueError) as e:
        raise ProgramFormatError(f"{where}: the graph in {PROGRAM} does not verify: {e}") from e
    for i, (node, d) in enumerate(zip(graph.nodes, doc["graph"]["nodes"], strict=True)):
        v, rec = node.output, d["output"]
        if [v.dtype, list(v.shape)] != [rec.get("dtype"), rec.get("shape")]:
            raise ProgramFormatError(
                f"{where}: the graph in {PROGRAM}: node {i} ({node.op}) records "
                f"{rec.get('dtype')}{rec.get('shape')}, its inputs give {v.dtype}{list(v.shape)}"
            )
    _check_weights(where, graph, weights)
    return SavedProgram(path, doc, graph, weights)


def load(path: str | os.PathLike, *, program_cls=None, strict: bool = False, **kwargs):
    """Load a program saved by :func:`save` (``kernforge.load``): check everything (see
    :func:`read`), then build it with ``program_cls(graph, weights, meta, **kwargs)`` (default
    :class:`kernforge.runtime.model.Program`). When the kernels it generates differ from the
    saved sources (another kernforge version), warn, or raise with ``strict``."""
    saved = read(path)
    if program_cls is None:
        from .model import Program as program_cls
    program = program_cls(saved.graph, saved.weights, saved.meta, **kwargs)
    now = {k: hashlib.sha256(s.encode()).hexdigest() for k, s in _sources(program).items()}
    # Sources are per target ("<mode>/..." keys: the interpreter's differ from the GPU's):
    # compare only those made for the target this process generates for.
    targets = {k.split("/", 1)[0] for k in now}
    stored = {
        k["name"]: k["sha256"]
        for k in saved.doc.get("kernels", [])
        if k["name"].split("/", 1)[0] in targets
    }
    if stored and now != stored:
        changed = sorted(k for k in stored.keys() | now.keys() if stored.get(k) != now.get(k))
        msg = (
            f"{str(path)!r}: {len(changed)} kernel(s) generated now differ from the saved "
            f"sources ({', '.join(changed[:4])}); saved by kernforge "
            f"{saved.doc.get('versions', {}).get('kernforge')}, this is {_versions()['kernforge']}"
        )
        if strict:
            raise ProgramFormatError(msg)
        warnings.warn(msg, stacklevel=2)
    prepare = getattr(program, "prepare", None)
    return prepare() if prepare is not None else program  # on a GPU: allocate and capture now


def summary(path: str | os.PathLike) -> str:
    """A few lines on a saved program, read from its ``program.json`` only (no weights
    loaded, nothing checked beyond the format): versions, inputs, outputs, weights, kernels."""
    box = _open(Path(path))
    try:
        doc = _check_doc(str(path), box.read(PROGRAM))
    finally:
        box.close()
    g = doc["graph"]
    n_weights = sum(_numel(w["shape"]) for w in doc["weights"].values())
    ty = lambda d: f"{d['dtype']}[{','.join(map(str, d['shape']))}]"  # noqa: E731
    outs = {n["output"]["id"]: n["output"] for n in g["nodes"]} | {i["id"]: i for i in g["inputs"]}
    lines = [
        f"{FORMAT} program {g['name']!r} saved by "
        + ", ".join(f"{k} {v}" for k, v in doc.get("versions", {}).items()),
        f"inputs: {', '.join(ty(i) for i in g['inputs'])}",
        f"outputs: {', '.join(ty(outs[i]) for i in g['outputs'])}",
        f"{len(g['nodes'])} nodes, {len(doc['weights'])} weights ({n_weights:,} values), "
        f"{len(doc.get('kernels', []))} kernel sources",
    ]
    if doc.get("buffer_plan"):
        from .memory import BufferPlan

        lines.append(BufferPlan.from_json(doc["buffer_plan"]).describe())
    return "\n".join(lines)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


__all__ = ["FORMAT", "ProgramFormatError", "SavedProgram", "load", "read", "save", "summary"]
