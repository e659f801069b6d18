"""What hardware kernforge runs on, and whether Triton kernels run compiled or interpreted.

With no CUDA GPU, Triton kernels run through Triton's CPU interpreter automatically. Triton
fixes that choice when a kernel is decorated, so it is made here, once, before any kernel
module is imported (``kernforge/__init__.py`` imports this module first).
"""

from __future__ import annotations

import functools
import os

import torch

from .config import settings


def cuda_available() -> bool:
    """True when torch sees at least one CUDA device."""
    return torch.cuda.is_available()


def _decide_interpret() -> bool:
    if os.environ.get("TRITON_INTERPRET", "") == "1":
        return True
    if settings.interpret == "1":
        return True
    if settings.interpret == "0":
        return False
    return not cuda_available()


#: Triton kernels run in the CPU interpreter (True) or compiled for the GPU (False).
INTERPRET: bool = _decide_interpret()
if INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"
    import numpy

    if tuple(int(p) for p in numpy.__version__.split(".")[:2]) >= (2, 4):
        import warnings

        # Measured: Triton 3.6's interpreter fails on loops with run-time bounds there.
        warnings.warn(
            f"NumPy {numpy.__version__} breaks Triton's CPU interpreter (loops with run-time "
            "bounds raise TypeError); install numpy<2.4 to run kernforge kernels on the CPU.",
            RuntimeWarning,
            stacklevel=2,
        )


@functools.cache
def require_triton_mode(interpret: bool, what: str, others: str) -> None:
    """Raise DeviceError when ``what`` asks for Triton's interpreter (``interpret``) in a
    process that compiles Triton for the GPU, or the other way round: Triton's own library
    (tl.sum, tl.sigmoid, ...) is compiled or interpreted for the whole process, decided when
    triton.language is first imported. ``others`` names the modes to use instead."""
    if interpret and not INTERPRET:
        from .errors import DeviceError

        raise DeviceError(
            f"{what} mode='interpret' needs Triton's interpreter for the whole process; on a GPU "
            f"machine start Python with KERNFORGE_INTERPRET=1 (or TRITON_INTERPRET=1), or use "
            f"{others}"
        )
    if not interpret and INTERPRET:
        from .errors import DeviceError

        raise DeviceError(
            f"{what} mode='gpu' needs a CUDA GPU that Triton compiles for; this process runs "
            f"Triton in its interpreter: use {others}"
        )


def capability(index: int = 0) -> tuple[int, int] | None:
    """Compute capability ``(major, minor)`` of CUDA device ``index``, or None without CUDA."""
    if not cuda_available():
        return None
    return torch.cuda.get_device_capability(index)


def arch(index: int = 0) -> str | None:
    """The GPU arch as ``"sm_90"``, or None without CUDA."""
    cap = capability(index)
    return None if cap is None else f"sm_{cap[0]}{cap[1]}"


@functools.cache
def num_sms(index: int = 0) -> int:
    """Streaming multiprocessors of CUDA device ``index`` (a small constant on the CPU)."""
    if not cuda_available():
        return 4  # the interpreter runs programs one after another: few is fastest
    return torch.cuda.get_device_properties(index).multi_processor_count


def triton_runs_on(device: torch.device) -> str | None:
    """None if Triton kernels can run on tensors of ``device``, else the reason why not."""
    if INTERPRET:
        if device.type == "cpu":
            return None
        return f"Triton runs in the CPU interpreter in this process; inputs are on {device}"
    if device.type == "cuda":
        return None
    return (
        f"inputs are on {device} and Triton kernels run on CUDA here "
        "(set KERNFORGE_INTERPRET=1 to run them in the CPU interpreter)"
    )


def describe() -> dict[str, str]:
    """Device and library versions, for ``kernforge info`` and benchmark records."""
    import triton

    info = {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": str(torch.version.cuda),
        "interpret": str(INTERPRET),
    }
    if cuda_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, arch=str(arch()), sms=str(props.multi_processor_count))
    else:
        info.update(gpu="none", arch="cpu")
    return info
