"""Generated kernel source -> a launchable Triton kernel, cached in memory and on disk.

The source is written to ``KERNFORGE_CACHE_DIR/jit/<hash>.py`` (atomically) and imported from
there, because Triton reads a kernel's source from its file. The hash of the source is the
key: the same source is compiled once per process, and Triton's own cache keeps the binary
across processes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
import types
from pathlib import Path

from .. import config

_MODULES: dict[tuple[str, bool], types.ModuleType] = {}
FORMAT = 1  # bump when the generated-module layout changes


def source_key(source: str) -> str:
    return hashlib.sha256(f"kernforge.jit/{FORMAT}\n{source}".encode()).hexdigest()[:24]


def _write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically; an existing file with other content (truncated,
    corrupt) is replaced."""
    try:
        if path.read_text() == text:
            return
    except (OSError, UnicodeDecodeError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def load(source: str, name: str, interpret: bool):
    """The kernel ``name`` defined in ``source``, as a Triton JIT function, or an interpreted
    one when ``interpret`` (whatever ``TRITON_INTERPRET`` says: modes can differ per call)."""
    key = (source_key(source), interpret)
    mod = _MODULES.get(key)
    if mod is None:
        path = Path(config.settings.cache_dir) / "jit" / f"k{key[0]}.py"
        _write(path, source)
        modname = f"kernforge_jit_{key[0]}_{int(interpret)}"
        spec = importlib.util.spec_from_file_location(modname, path)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[modname] = mod
        spec.loader.exec_module(mod)
        _wrap(mod, interpret)
        _MODULES[key] = mod
    return getattr(mod, name)


def forget() -> None:
    """Drop the in-memory kernels (benchmarks of first-call time use this)."""
    _MODULES.clear()


def _wrap(mod: types.ModuleType, interpret: bool) -> None:
    from triton.runtime.jit import JITFunction

    if interpret:
        from triton.runtime.interpreter import InterpretedFunction as wrap
    else:
        wrap = JITFunction
    for k, v in list(vars(mod).items()):
        if isinstance(v, types.FunctionType) and v.__module__ == mod.__name__:
            setattr(mod, k, wrap(v))
