"""CUDA C++ kernels from Python: NVRTC compilation, a cubin cache, checked launches, and typed
dimensions.

```python
from kernforge import cuda as kcuda

k = kcuda.compile(source, "vadd")          # NVRTC -> cubin, cached in memory and on disk
k.params                                    # [Param(name='x', ctype='float', ...), ...]
k.launch(x, y, out, n, grid=kcuda.cdiv(n, 256), block=256)   # torch's current stream
```

Importing this module needs neither a GPU nor ``cuda-bindings``: compiling needs NVRTC
(``pip install 'kernforge[cuda]'``), launching a GPU. :func:`available` says whether kernels
can launch here. See ``docs/cuda.md``.
"""

from __future__ import annotations

import functools

from ..errors import ArgumentError, CompileError
from . import cache
from .compiler import Kernel, clear_memory_cache, compile
from .launch import check_args, check_config
from .nvrtc import INCLUDE_DIR, default_arch, normalize_arch
from .signature import Param, parse_kernels


def cdiv(a: int, b: int) -> int:
    """Ceiling division, for grid sizes: ``cdiv(n, block)``."""
    return -(-a // b)


@functools.cache
def compile_available() -> str | None:
    """None when NVRTC can compile here (no GPU needed), else the reason."""
    try:
        from . import nvrtc

        nvrtc.version()
    except Exception as exc:  # noqa: BLE001 - any failure means "cannot compile here"
        return f"NVRTC is not usable: {exc}"
    return None


def available() -> str | None:
    """None when CUDA C++ kernels can compile and launch here, else the reason (no GPU, no
    cuda-bindings/NVRTC). Meant for dispatch ``supports=`` functions."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU (torch.cuda.is_available() is False)"
    reason = compile_available()
    if reason:
        return reason
    try:
        from cuda.bindings import driver  # noqa: F401
    except ImportError as exc:
        return f"cuda.bindings is not importable ({exc}); install 'kernforge[cuda]'"
    return None


def cache_stats() -> dict[str, int]:
    """Cubin cache counters: memory_hits, disk_hits, misses (NVRTC ran), corrupt, writes."""
    return cache.stats.as_dict()


def __getattr__(name: str):
    # kernforge.cuda.dims is imported on first use (it is pure Python, but not always needed).
    if name == "dims":
        from . import dims

        return dims
    raise AttributeError(f"module 'kernforge.cuda' has no attribute {name!r}")


__all__ = [
    "INCLUDE_DIR", "ArgumentError", "CompileError", "Kernel", "Param", "available", "cache",
    "cache_stats", "cdiv", "check_args", "check_config", "clear_memory_cache", "compile",
    "compile_available", "default_arch", "normalize_arch", "parse_kernels",
]  # fmt: skip
