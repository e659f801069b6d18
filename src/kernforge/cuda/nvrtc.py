"""NVRTC: CUDA C++ source to cubin, with no GPU, nvcc or host compiler needed.

This calls NVRTC through ``cuda.bindings.nvrtc`` (the layer ``cuda.core.Program`` is built
on) because kernforge takes NVRTC options as plain strings (``"-DBLOCK=256"``), needs the raw
compile log for :class:`~kernforge.errors.CompileError`, and keys its cache on
``nvrtcVersion()``; all three are direct there. ``cuda.bindings`` is imported lazily so that
``kernforge.cuda`` imports on machines without it.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..errors import ArgumentError, CompileError, UnsupportedError

#: The headers shipped with kernforge (``#include <kernforge/dims.cuh>``).
INCLUDE_DIR = Path(__file__).resolve().parent.parent / "include"

_INSTALL_HINT = (
    "install the CUDA extra (pip install 'kernforge[cuda]': cuda-bindings and "
    "nvidia-cuda-nvrtc) to compile CUDA C++ kernels"
)
_ARCH = re.compile(r"^sm_(\d+)([af]?)$")


def _nvrtc():
    try:
        from cuda.bindings import nvrtc
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise UnsupportedError(f"cuda.bindings is not importable ({exc}); {_INSTALL_HINT}") from exc
    return nvrtc


def _check(result, what: str):
    """Unpack a cuda.bindings NVRTC result tuple, raising on a failed call."""
    nvrtc = _nvrtc()
    err, *rest = result
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        _, msg = nvrtc.nvrtcGetErrorString(err)
        raise CompileError(f"NVRTC {what} failed: {msg.decode(errors='replace')}")
    return rest[0] if len(rest) == 1 else rest


@functools.cache
def version() -> tuple[int, int]:
    """NVRTC's ``(major, minor)`` version; raises ``UnsupportedError`` when NVRTC is missing."""
    nvrtc = _nvrtc()
    try:
        major, minor = _check(nvrtc.nvrtcVersion(), "nvrtcVersion")
    except RuntimeError as exc:
        raise UnsupportedError(f"NVRTC cannot be loaded ({exc}); {_INSTALL_HINT}") from exc
    return int(major), int(minor)


@functools.cache
def cuda_include_dirs() -> tuple[str, ...]:
    """Directories holding the CUDA toolkit headers (``cuda_fp16.h``, ``cuda_bf16.h``, ...).

    NVRTC has no default search path for them. Looked for, in order: ``cuda.pathfinder``
    (nvidia wheels or a toolkit it knows of), ``$CUDA_HOME``/``$CUDA_PATH``, and
    ``/usr/local/cuda``.
    """
    found: list[str] = []
    try:
        from cuda import pathfinder

        d = pathfinder.find_nvidia_header_directory("cudart")
        if d:
            found.append(str(d))
    except Exception:  # noqa: BLE001 - older pathfinder or no headers: try the others
        pass
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            found.append(os.path.join(os.environ[var], "include"))
    found.append("/usr/local/cuda/include")
    out = []
    for d in found:
        if os.path.isfile(os.path.join(d, "cuda_fp16.h")) and d not in out:
            out.append(d)
            # CCCL (cuda/std/...) lives one level down since CUDA 13.
            if os.path.isdir(os.path.join(d, "cccl")):
                out.append(os.path.join(d, "cccl"))
            break
    return tuple(out)


def normalize_arch(arch: str) -> str:
    """``"sm_90a"``, ``"90a"``, ``"compute_90"`` -> ``"sm_90a"``; ``ArgumentError`` otherwise."""
    a = str(arch).strip().lower()
    a = a.removeprefix("compute_")
    if not a.startswith("sm_"):
        a = "sm_" + a
    if not _ARCH.match(a):
        raise ArgumentError(
            f"arch={arch!r} is not a CUDA arch; expected a name such as 'sm_90a', 'sm_90' or "
            "'sm_80'"
        )
    return a


def default_arch() -> str:
    """The current GPU's arch (``sm_90a`` on Hopper, ``sm_100a`` on Blackwell), or ``sm_90a``
    with no GPU. The ``a`` variants unlock arch-specific instructions (wgmma, setmaxnreg)."""
    from .. import device

    cap = device.capability()
    if cap is None:
        return "sm_90a"
    major, minor = cap
    suffix = "a" if major >= 9 and minor == 0 else ""
    return f"sm_{major}{minor}{suffix}"


def base_options(arch: str, options: Sequence[str]) -> list[str]:
    """The full NVRTC option list: arch, C++17, include paths, then the caller's options."""
    opts = [f"-arch={arch}"]
    if not any(o.startswith(("-std", "--std")) for o in options):
        opts.append("-std=c++17")
    opts.append(f"-I{INCLUDE_DIR}")
    opts += [f"-I{d}" for d in cuda_include_dirs()]
    opts.append("-DKERNFORGE_NVRTC=1")
    return opts + list(options)


_LOG_LOCATION = re.compile(
    r"^(?P<file>[^\n(]*?)\((?P<line>\d+)\): (?P<kind>error|warning|catastrophic error)", re.M
)


def quote_lines(log: str, files: Mapping[str, str], context: int = 1) -> str:
    """The source lines that ``log``'s errors point at, numbered, from ``files`` (name ->
    text) or from disk for headers NVRTC found on the include path."""
    out: list[str] = []
    seen: set[tuple[str, int]] = set()
    for m in _LOG_LOCATION.finditer(log):
        if "error" not in m.group("kind"):
            continue
        fname, line = m.group("file"), int(m.group("line"))
        if (fname, line) in seen:
            continue
        seen.add((fname, line))
        text = files.get(fname)
        if text is None and os.path.isfile(fname):
            try:
                text = Path(fname).read_text(errors="replace")
            except OSError:
                text = None
        if text is None:
            continue
        lines = text.splitlines()
        lo, hi = max(1, line - context), min(len(lines), line + context)
        out.append(f"{fname}:")
        for n in range(lo, hi + 1):
            mark = ">" if n == line else " "
            out.append(f"  {mark}{n:5d} | {lines[n - 1]}")
        if len(seen) >= 8:
            break
    return "\n".join(out)


def compile_cubin(
    source: str,
    *,
    filename: str,
    arch: str,
    options: Sequence[str],
    headers: Mapping[str, str] | None = None,
    kernel: str = "",
    files: Mapping[str, str] | None = None,
) -> tuple[bytes, str]:
    """Compile ``source`` to a cubin for ``arch``; returns ``(cubin, log)``.

    ``headers`` are in-memory files (``#include "name"`` finds them); ``files`` (name ->
    text) are what error messages quote from (default: ``source`` and ``headers``). Raises
    ``CompileError`` with NVRTC's log and the offending source lines when compilation fails.
    """
    nvrtc = _nvrtc()
    headers = dict(headers or {})
    opts = base_options(arch, options)
    prog = _check(
        nvrtc.nvrtcCreateProgram(
            source.encode(),
            filename.encode(),
            len(headers),
            [v.encode() for v in headers.values()],
            [k.encode() for k in headers],
        ),
        "nvrtcCreateProgram",
    )
    try:
        (res,) = nvrtc.nvrtcCompileProgram(prog, len(opts), [o.encode() for o in opts])
        size = _check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
        # Fresh mutable buffers: NVRTC writes into them (a bytes object such as b" " * 1 is a
        # shared singleton, and writing into it corrupts the interpreter).
        buf = bytearray(size)
        _check(nvrtc.nvrtcGetProgramLog(prog, buf), "nvrtcGetProgramLog")
        log = bytes(buf).rstrip(b"\x00").decode(errors="replace").strip()
        if res != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            _, msg = nvrtc.nvrtcGetErrorString(res)
            quoted = quote_lines(log, files or {filename: source, **headers})
            what = f"kernel {kernel!r} " if kernel else ""
            raise CompileError(
                f"NVRTC {version()[0]}.{version()[1]} could not compile {what}({filename}) for "
                f"{arch}: {msg.decode(errors='replace')}\n"
                f"--- NVRTC log ---\n{log}\n"
                + (f"--- offending lines ---\n{quoted}\n" if quoted else "")
                + f"--- options ---\n{' '.join(opts)}\n"
                "Fix the source (the log gives file(line)); the options show the include path."
            )
        size = _check(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
        cubin = bytearray(size)
        _check(nvrtc.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
        return bytes(cubin), log
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
