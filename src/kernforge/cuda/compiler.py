"""``compile(source, name) -> Kernel``: NVRTC, the cubin cache, and the launchable kernel."""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ArgumentError, CompileError
from . import cache, launch, nvrtc
from .signature import Param, parse_kernels

_SMEM_DEFAULT = 48 * 1024  # above this a kernel must opt in to dynamic shared memory


@dataclass(eq=False)
class Kernel:
    """A compiled ``extern "C" __global__`` kernel: its cubin, parameters and a launcher.

    ``origin`` says where the cubin came from in this call: ``"compiled"`` (NVRTC ran),
    ``"disk"`` (the on-disk cache) or ``"memory"``.
    """

    name: str
    arch: str
    cubin: bytes
    params: list[Param]
    key: str
    log: str = ""
    origin: str = "compiled"
    options: tuple[str, ...] = ()
    _functions: dict[int, Any] = field(default_factory=dict, repr=False)
    _modules: dict[int, Any] = field(default_factory=dict, repr=False)
    _smem_optin: dict[int, int] = field(default_factory=dict, repr=False)
    _configs: dict[tuple, tuple] = field(default_factory=dict, repr=False)
    _packers: list | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def signature(self) -> str:
        """The kernel's parameter list as C, e.g. ``(const float* x, int n)``."""
        return f"{self.name}({', '.join(str(p) for p in self.params)})"

    def check_args(self, *args: Any, require_cuda: bool = True) -> list:
        """Check launch arguments against :attr:`params` (no GPU needed); returns them packed.

        ``require_cuda=False`` accepts CPU tensors, so that the other checks run in CI.
        """
        return launch.check_args(self.name, self.params, args, require_cuda=require_cuda)

    def function(self, index: int):
        """The loaded ``CUfunction`` on device ``index`` (loaded on first use)."""
        fn = self._functions.get(index)
        if fn is None:
            with self._lock:
                fn = self._functions.get(index)
                if fn is None:
                    module, fn = launch.load_function(self.cubin, self.name, index)
                    self._modules[index] = module  # keep the module alive with the kernel
                    self._functions[index] = fn
        return fn

    def attributes(self, device: int | None = None) -> dict[str, int]:
        """Registers per thread, static shared memory, max threads per block and local memory
        of the loaded kernel on ``device`` (GPU only)."""
        cu = launch._driver()
        index = torch.cuda.current_device() if device is None else device
        fn = self.function(index)
        a = cu.CUfunction_attribute
        names = {
            "num_regs": a.CU_FUNC_ATTRIBUTE_NUM_REGS,
            "shared_size_bytes": a.CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES,
            "max_threads_per_block": a.CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK,
            "local_size_bytes": a.CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES,
        }
        return {k: int(launch.drv(cu.cuFuncGetAttribute(v, fn), k)) for k, v in names.items()}

    def launch(self, *args: Any, grid: int | Sequence[int], block: int | Sequence[int],
               shared_mem: int = 0, stream: Any = None, pdl: bool = False) -> None:  # fmt: skip
        """Launch on the GPU: ``args`` are torch CUDA tensors for pointer parameters and
        Python/NumPy numbers for scalars, checked against :attr:`params` first
        (``ArgumentError``). ``stream`` None is torch's current stream on the tensors' device.
        Dynamic ``shared_mem`` over 48 KiB is opted in to automatically. ``pdl``: a
        programmatic dependent launch (see :func:`kernforge.cuda.launch.launch_function`)."""
        # Hot path: a few microseconds of host time (decode GEMVs launch per token).
        try:
            cfg = self._configs.get((grid, block, shared_mem))
        except TypeError:  # unhashable (lists): check every time
            cfg = None
        if cfg is None:
            cfg = launch.check_config(self.name, grid, block, shared_mem)
            with contextlib.suppress(TypeError):
                self._configs[(grid, block, shared_mem)] = cfg
        g, b, smem = cfg
        packers = self._packers
        if packers is None:
            packers = self._packers = [launch.make_packer(p, self.name) for p in self.params]
        if len(args) != len(packers):
            launch.check_args(self.name, self.params, args)  # raises the count error
        packed = [pack(a) for pack, a in zip(packers, args, strict=True)]
        index = -1
        for a in args:
            if isinstance(a, torch.Tensor):
                d = a.get_device()
                if index < 0:
                    index = d
                elif d != index:
                    launch.check_args(self.name, self.params, args)  # names the tensor
        if index < 0:
            index = torch.cuda.current_device()
        fn = self._functions.get(index)
        if fn is None:
            fn = self.function(index)
        if smem > _SMEM_DEFAULT and self._smem_optin.get(index, _SMEM_DEFAULT) < smem:
            launch.check_config(self.name, g, b, smem, launch.max_shared_optin(index))
            cu = launch._driver()
            attr = cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            launch.drv(cu.cuFuncSetAttribute(fn, attr, smem), "cuFuncSetAttribute")
            self._smem_optin[index] = smem
        if stream is None:
            handle = launch.current_stream(index)
        else:
            handle = launch.stream_handle(stream, torch.device("cuda", index))
        with launch.ContextGuard(index):
            try:
                launch.launch_function(fn, packed, g, b, smem, handle, pdl)
            except Exception as exc:
                raise type(exc)(
                    f"launching {self.signature} with grid={g}, block={b}, shared_mem={smem}: {exc}"
                ) from exc

    __call__ = launch


# Kernels by (source digest, name, arch, options, headers): skips hashing on repeated calls.
_kernels: dict[tuple, Kernel] = {}


def _defines(options: Sequence[str]) -> dict[str, str]:
    out = {}
    for o in options:
        if o.startswith("-D") and len(o) > 2:
            k, _, v = o[2:].partition("=")
            out[k] = v or "1"
    return out


def compile(  # noqa: A001 - the natural name, and the API contract's
    source: str,
    name: str,
    *,
    arch: str | None = None,
    options: Sequence[str] = (),
    headers: Mapping[str, str] | None = None,
    filename: str | None = None,
) -> Kernel:
    """Compile the ``extern "C" __global__`` kernel ``name`` of CUDA C++ ``source``.

    ``arch``: ``"sm_90a"``, ``"sm_80"``...; None is the current GPU's (``sm_90a`` on Hopper,
    and with no GPU). ``options``: extra NVRTC options (``"-DBLOCK=256"``). ``headers``:
    in-memory files for ``#include "name"``. ``/*@kf ... @kf*/`` blocks are expanded first
    (see :mod:`kernforge.cuda.dims`). ``<kernforge/...>`` headers are always on the include
    path. Cached in memory and under ``KERNFORGE_CACHE_DIR/cuda``. Raises ``CompileError``
    (with NVRTC's log and the offending lines) and ``ArgumentError`` for bad arguments.
    """
    if not isinstance(source, str) or not isinstance(name, str):
        raise ArgumentError(
            f"compile(source, name) takes two strings; got {type(source).__name__}, "
            f"{type(name).__name__}"
        )
    if isinstance(options, str):
        raise ArgumentError(f"options={options!r}; pass a sequence of strings, e.g. ('-DN=4',)")
    arch = nvrtc.default_arch() if arch is None else nvrtc.normalize_arch(arch)
    options = tuple(str(o) for o in options)
    headers = dict(headers or {})
    digest = hashlib.sha1(source.encode()).hexdigest()
    fast_key = (digest, name, arch, options, tuple(sorted(headers.items())), filename)
    kernel = _kernels.get(fast_key)
    if kernel is not None:
        cache.stats.memory_hits += 1
        return kernel

    filename = filename or f"{name}.cu"
    files = {filename: source, **headers}
    text = source
    if "/*@kf" in source:
        from .dims import expand

        text, generated = expand(source, filename=filename)
        files.update(generated)
    kernels = parse_kernels(text, _defines(options), headers.values())
    if name not in kernels:
        found = ", ".join(sorted(kernels)) or "none"
        raise CompileError(
            f'no extern "C" __global__ kernel named {name!r} in {filename} (found: {found}). '
            'Declare it as extern "C" __global__ void ' + name + "(...) so its name is not "
            "mangled"
        )
    version = nvrtc.version()
    key = cache.make_key(
        text, arch=arch, options=options, nvrtc_version=version, headers=headers,
        include_dirs=nvrtc.cuda_include_dirs(),
    )  # fmt: skip
    with cache.key_lock(key):
        entry = cache.get_memory(key)
        origin = "memory"
        if entry is None:
            entry = cache.get_disk(key)
            origin = "disk"
        if entry is None:
            origin = "compiled"
            cubin, log = nvrtc.compile_cubin(
                text, filename=filename, arch=arch, options=options, headers=headers,
                kernel=name, files=files,
            )  # fmt: skip
            cache.stats.misses += 1
            entry = cache.Entry(cubin=cubin, log=log, meta={"arch": arch, "name": name})
            cache.put(key, entry)
    kernel = Kernel(
        name=name, arch=arch, cubin=entry.cubin, params=kernels[name], key=key, log=entry.log,
        origin=origin, options=options,
    )  # fmt: skip
    _kernels[fast_key] = kernel
    return kernel


def clear_memory_cache() -> None:
    """Forget compiled kernels and in-memory cubins (disk entries stay)."""
    _kernels.clear()
    cache.clear_memory()
