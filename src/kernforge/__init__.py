"""kernforge: fast, testable deep-learning kernels for NVIDIA GPUs (Hopper first).

Public API: :mod:`kernforge.ops` (the catalog), :mod:`kernforge.nn` (layers: the MoE expert
layer), :mod:`kernforge.tune` (autotuning with an on-disk cache), :func:`jit` and
:mod:`kernforge.np` (NumPy code to fused kernels), :func:`elementwise` and :func:`rowwise`
(expression kernels),
:func:`set_backend`, :func:`backend`, :func:`get_backend`, and the error types in
:mod:`kernforge.errors`.
"""

from . import (  # noqa: F401  (kernels registers the impls)
    config,
    device,  # first: decides Triton interpretation before any kernel is defined
    errors,
    kernels,
    nn,  # torch.nn layers on the catalog ops (docs/moe.md)
    ops,
    tune,
)
from .compiler import compile_model, supported_ops  # whole models (docs/compiler.md)
from .dispatch import FallbackWarning, backend, get_backend, registered, set_backend
from .errors import (
    ArgumentError,
    CompileError,
    ConfigError,
    DeviceError,
    DTypeError,
    KernforgeError,
    ShapeError,
    TraceError,
    UnsupportedError,
)
from .expr import elementwise, rowwise  # expression kernels (docs/expressions.md)
from .frontend import np_api as np  # kf.np: NumPy functions for traced code (docs/jit.md)
from .frontend.jit import jit  # NumPy code to fused kernels (docs/jit.md)
from .hf import patch, unpatch  # Hugging Face models on kernforge (docs/hf.md)
from .runtime.archive import load  # a saved compiled Program (docs/compiler.md)

__version__ = "0.1.0"

__all__ = [
    "ArgumentError", "CompileError", "ConfigError", "DTypeError", "DeviceError", "FallbackWarning",
    "KernforgeError", "ShapeError", "UnsupportedError", "backend", "config", "device",
    "errors", "get_backend", "ops", "registered", "set_backend", "__version__",
    "elementwise", "rowwise", "TraceError", "jit", "np", "nn", "tune",
    "patch", "unpatch", "compile_model", "supported_ops", "load",
]  # fmt: skip
