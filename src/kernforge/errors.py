"""Error types raised by kernforge.

Every message says what was given, what was expected, and what to do. The types also derive
from the matching built-in exception so that ``except ValueError`` style code keeps working.
"""

from __future__ import annotations


class KernforgeError(Exception):
    """Base class of every error kernforge raises on purpose."""


class UnsupportedError(KernforgeError, NotImplementedError):
    """A backend cannot run this op for these inputs (dtype, arch, shape, device)."""


class ShapeError(KernforgeError, ValueError):
    """Input shapes (rank, sizes, strides) do not fit the op."""


class DTypeError(KernforgeError, TypeError):
    """An input has a dtype the op does not accept, or dtypes that must match do not."""


class DeviceError(KernforgeError, ValueError):
    """Inputs live on devices the op cannot combine (e.g. a CPU weight for a GPU input)."""


class CompileError(KernforgeError, RuntimeError):
    """Kernel source failed to compile; the message carries the compiler log."""


class ConfigError(KernforgeError, ValueError):
    """A ``KERNFORGE_*`` setting has a value kernforge does not understand."""


class ArgumentError(KernforgeError, ValueError):
    """A non-tensor argument (dim, layout, mode name) is out of range or unknown."""


class TraceError(KernforgeError, TypeError):
    """Traced code needs a value that is only known when the kernel runs (data-dependent control
    flow, ``float(x)``, ``np.asarray(x)``); the message names the user's source line."""
