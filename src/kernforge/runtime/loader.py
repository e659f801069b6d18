"""Generated kernel source -> a launchable Triton kernel, cached in memory and on disk.

The source is written to ``KERNFORGE_CACHE_DIR/<folder>/k<hash>.py`` (atomically) and imported
from there, because Triton reads a kernel's source from its file. The hash of the source is
the key: the same source is imported once per process, and Triton's own cache keeps the
binary across processes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import threading
import types

from .. import config
from ..errors import CompileError
from ..fileio import write_atomic

_MODULES: dict[tuple[str, bool], types.ModuleType] = {}
_lock = threading.Lock()


def import_source(source: str, folder: str, tag: str = "") -> types.ModuleType:
    """A new module made from generated ``source``, imported from its file under
    ``KERNFORGE_CACHE_DIR/folder`` (a missing, truncated or stale file is written again).
    Callers keep the module: each call imports a fresh one (``tag`` tells them apart in
    ``sys.modules``)."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:24]
    path = config.settings.cache_dir / folder / f"k{digest}.py"
    try:
        current = path.read_text()
    except (OSError, UnicodeDecodeError):
        current = None
    if current != source:
        write_atomic(path, source)
    name = f"kernforge_{folder.replace('/', '_')}_{digest}{tag}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise CompileError(f"cannot import generated Triton module {path}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except Exception as exc:
        sys.modules.pop(name, None)
        msg = f"generated Triton module {path} failed to import: {exc}\n{source}"
        raise CompileError(msg) from exc
    return mod


def load(source: str, name: str, interpret: bool):
    """The kernel ``name`` defined in ``source``, as a Triton JIT function, or an interpreted
    one when ``interpret`` (whatever ``TRITON_INTERPRET`` says: modes can differ per call)."""
    key = (source, interpret)
    with _lock:
        mod = _MODULES.get(key)
        if mod is None:
            mod = import_source(source, "jit", f"_{int(interpret)}")
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
