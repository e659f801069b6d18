"""Launch arguments: check them against a kernel's parameters and pack them for the driver.

Everything here but :func:`launch_cubin` runs without a GPU, so CI tests the checks.
"""

from __future__ import annotations

import ctypes
import functools
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..errors import ArgumentError, DeviceError, UnsupportedError
from .signature import Param

# Pointee C type -> the tensor dtypes a pointer of that type may receive.
_I16 = (torch.int16, torch.uint16, torch.float16, torch.bfloat16)  # raw 16-bit words
POINTEE_DTYPES: dict[str, tuple[torch.dtype, ...]] = {
    "float": (torch.float32,),
    "float2": (torch.float32,),
    "float4": (torch.float32,),
    "double": (torch.float64,),
    "double2": (torch.float64,),
    "__half": (torch.float16,),
    "__half2": (torch.float16,),
    "__nv_bfloat16": (torch.bfloat16,),
    "__nv_bfloat162": (torch.bfloat16,),
    "__nv_fp8_e4m3": (torch.float8_e4m3fn,),
    "__nv_fp8_e5m2": (torch.float8_e5m2,),
    "int": (torch.int32,),
    "unsigned int": (torch.int32, torch.uint32),
    "long long": (torch.int64,),
    "unsigned long long": (torch.int64, torch.uint64),
    "short": (torch.int16,),
    "unsigned short": _I16,
    "signed char": (torch.int8,),
    "char": (torch.int8, torch.uint8, torch.bool),
    "unsigned char": (torch.uint8, torch.bool, torch.int8),
    "bool": (torch.bool,),
}
#: Pointee types that read raw memory of any dtype (16-byte vector loads and ``void*``).
RAW_POINTEES = {
    "void", "uint4", "int4", "uint2", "int2", "uint1", "int1", "ulonglong2", "longlong2",
    "char4", "uchar4",
}  # fmt: skip
_ALIGN = {
    "float2": 8, "float4": 16, "double": 8, "double2": 16, "__half2": 4, "__nv_bfloat162": 4,
    "int": 4, "unsigned int": 4, "float": 4, "long long": 8, "unsigned long long": 8,
    "__half": 2, "__nv_bfloat16": 2, "short": 2, "unsigned short": 2, "uint4": 16, "int4": 16,
    "uint2": 8, "int2": 8, "ulonglong2": 16, "longlong2": 16, "uint1": 4, "int1": 4,
    "char4": 4, "uchar4": 4,
}  # fmt: skip

# Scalar C type -> (ctypes type, lowest, highest) for integers; floats have no range.
_INT_SCALARS: dict[str, tuple[type, int, int]] = {
    "int": (ctypes.c_int32, -(2**31), 2**31 - 1),
    "unsigned int": (ctypes.c_uint32, 0, 2**32 - 1),
    "long long": (ctypes.c_int64, -(2**63), 2**63 - 1),
    "unsigned long long": (ctypes.c_uint64, 0, 2**64 - 1),
    "short": (ctypes.c_int16, -(2**15), 2**15 - 1),
    "unsigned short": (ctypes.c_uint16, 0, 2**16 - 1),
    "signed char": (ctypes.c_int8, -128, 127),
    "char": (ctypes.c_int8, -128, 127),
    "unsigned char": (ctypes.c_uint8, 0, 255),
    "bool": (ctypes.c_bool, 0, 1),
}
_FLOAT_SCALARS = {"float": ctypes.c_float, "double": ctypes.c_double}
_HALF_SCALARS = {"__half": torch.float16, "__nv_bfloat16": torch.bfloat16}


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer, np.bool_)) and not isinstance(x, float)


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor on {x.device} of shape {tuple(x.shape)}"
    return f"{type(x).__name__} {x!r}"


def pack_arg(
    p: Param, x: Any, kernel: str, *, require_cuda: bool = True, device: torch.device | None = None
) -> ctypes._SimpleCData | ctypes.Structure:
    """Check ``x`` against parameter ``p`` and return it as a ctypes value for the launch.

    Raises ``ArgumentError`` naming the kernel and the parameter when ``x`` does not fit.
    """
    where = f"kernel {kernel!r} parameter {p.name!r} ({p})"
    if isinstance(x, (ctypes._SimpleCData, ctypes.Structure)) and not p.is_pointer:
        return x  # escape hatch for by-value structs: the caller vouches for the layout
    if p.is_pointer:
        if x is None:
            return ctypes.c_void_p(0)
        if not isinstance(x, torch.Tensor):
            raise ArgumentError(
                f"{where}: got {_describe(x)}; a pointer parameter takes a torch tensor (or None "
                "for a null pointer)"
            )
        if require_cuda and x.device.type != "cuda":
            raise ArgumentError(
                f"{where}: got {_describe(x)}; CUDA kernels need tensors on a CUDA device "
                "(move it with .cuda())"
            )
        if device is not None and x.device != device:
            raise ArgumentError(
                f"{where}: got {_describe(x)} but the launch runs on {device}; put every "
                "tensor argument on one device"
            )
        base = p.ctype
        if base not in RAW_POINTEES and "*" not in base:
            allowed = POINTEE_DTYPES.get(base)
            if allowed is not None and x.dtype not in allowed:
                want = " or ".join(str(d) for d in allowed)
                raise ArgumentError(
                    f"{where}: got {_describe(x)}; a {base}* takes {want} tensors. Convert "
                    f"the tensor (.to({allowed[0]})) or change the kernel's parameter type"
                )
        align = _ALIGN.get(base, 1)
        ptr = x.data_ptr()
        if ptr % align:
            raise ArgumentError(
                f"{where}: the tensor's data pointer {ptr:#x} is not {align}-byte aligned as "
                f"{base}* needs (a sliced view?); pass a contiguous copy (.contiguous() of a "
                "fresh tensor) or use a narrower pointee type"
            )
        return ctypes.c_void_p(ptr)
    # Scalars.
    if isinstance(x, torch.Tensor):
        raise ArgumentError(
            f"{where}: got {_describe(x)}; a scalar parameter takes a Python or NumPy number "
            "(use .item() for a one-element tensor)"
        )
    ct = p.ctype
    if ct in _INT_SCALARS:
        ctype, lo, hi = _INT_SCALARS[ct]
        if not _is_int(x):
            raise ArgumentError(
                f"{where}: got {_describe(x)}; an integer parameter takes a Python or NumPy integer"
            )
        v = int(x)
        if not lo <= v <= hi:
            raise ArgumentError(
                f"{where}: {v} is out of range for {ct} [{lo}, {hi}]; use a wider parameter type "
                "(long long) or split the work"
            )
        return ctype(v)
    if ct in _FLOAT_SCALARS or ct in _HALF_SCALARS:
        if not isinstance(x, (numbers.Real, np.floating, np.integer)) or isinstance(x, np.bool_):
            raise ArgumentError(f"{where}: got {_describe(x)}; a {ct} parameter takes a number")
        if ct in _FLOAT_SCALARS:
            return _FLOAT_SCALARS[ct](float(x))
        bits = torch.tensor(float(x), dtype=_HALF_SCALARS[ct]).view(torch.int16).item()
        return ctypes.c_uint16(bits & 0xFFFF)
    raise ArgumentError(
        f"{where}: kernforge cannot pack a by-value {ct!r} from {_describe(x)}; pass a ctypes "
        "instance of the exact layout, or take the value through a pointer"
    )


def check_args(kernel: str, params: Sequence[Param], args: Sequence[Any], *,
               require_cuda: bool = True) -> list:  # fmt: skip
    """Check ``args`` against ``params`` (count, pointer vs scalar, dtypes, devices, ranges)
    and return them packed as ctypes values. Runs without a GPU; raises ``ArgumentError``."""
    if len(args) != len(params):
        sig = ", ".join(str(p) for p in params)
        raise ArgumentError(
            f"kernel {kernel!r} takes {len(params)} arguments ({sig}); got {len(args)}"
        )
    device = None
    if require_cuda:
        for a in args:
            if isinstance(a, torch.Tensor) and a.device.type == "cuda":
                device = a.device
                break
    return [pack_arg(p, a, kernel, require_cuda=require_cuda, device=device)
            for p, a in zip(params, args, strict=True)]  # fmt: skip


def make_packer(p: Param, kernel: str):
    """A fast ``pack(x) -> ctypes value`` for parameter ``p`` on the launch path.

    It handles the common cases (a CUDA tensor of an allowed dtype, a Python int in range, a
    Python float) inline and defers everything else to :func:`pack_arg`, which accepts the
    same values and raises the errors, so the two never disagree.
    """
    slow = functools.partial(pack_arg, p, kernel=kernel)
    if p.is_pointer:
        raw = p.ctype in RAW_POINTEES or "*" in p.ctype or p.ctype not in POINTEE_DTYPES
        allowed = frozenset(POINTEE_DTYPES.get(p.ctype, ()))
        align = _ALIGN.get(p.ctype, 1)
        Tensor, c_void_p = torch.Tensor, ctypes.c_void_p

        def pack(x):
            if isinstance(x, Tensor) and x.is_cuda and (raw or x.dtype in allowed):
                ptr = x.data_ptr()
                if ptr % align == 0:
                    return c_void_p(ptr)
            return slow(x)

        return pack
    if p.ctype in _INT_SCALARS and p.ctype != "bool":
        ctype, lo, hi = _INT_SCALARS[p.ctype]

        def pack(x):
            if type(x) is int and lo <= x <= hi:
                return ctype(x)
            return slow(x)

        return pack
    if p.ctype in _FLOAT_SCALARS:
        ftype = _FLOAT_SCALARS[p.ctype]

        def pack(x):
            if type(x) is float or type(x) is int:
                return ftype(x)
            return slow(x)

        return pack
    return slow


def dims3(value: int | Sequence[int], what: str, kernel: str) -> tuple[int, int, int]:
    """``grid``/``block`` as three positive ints; ``ArgumentError`` otherwise."""
    try:
        vals = (value,) if _is_int(value) else tuple(value)  # type: ignore[arg-type]
    except TypeError:
        vals = ()
    if not 1 <= len(vals) <= 3 or not all(_is_int(v) for v in vals):
        raise ArgumentError(
            f"kernel {kernel!r}: {what}={value!r}; expected an int or a tuple of 1 to 3 ints"
        )
    vals = tuple(int(v) for v in vals) + (1,) * (3 - len(vals))
    if any(v < 1 for v in vals):
        raise ArgumentError(f"kernel {kernel!r}: {what}={value!r}; every size must be >= 1")
    return vals  # type: ignore[return-value]


def check_config(kernel: str, grid, block, shared_mem: int,
                 max_shared: int | None = None) -> tuple[tuple, tuple, int]:  # fmt: skip
    """Check a launch configuration against CUDA's limits; returns normalized values."""
    g = dims3(grid, "grid", kernel)
    b = dims3(block, "block", kernel)
    if b[0] * b[1] * b[2] > 1024 or b[2] > 64:
        raise ArgumentError(
            f"kernel {kernel!r}: block={block!r} has {b[0] * b[1] * b[2]} threads; CUDA allows "
            "at most 1024 per block (and block.z <= 64)"
        )
    if g[0] > 2**31 - 1 or g[1] > 65535 or g[2] > 65535:
        raise ArgumentError(
            f"kernel {kernel!r}: grid={grid!r} is too large; CUDA allows x < 2^31 and y, z <= "
            "65535. Loop inside the kernel (grid-stride) instead"
        )
    if not _is_int(shared_mem) or shared_mem < 0:
        raise ArgumentError(f"kernel {kernel!r}: shared_mem={shared_mem!r}; expected an int >= 0")
    if max_shared is not None and shared_mem > max_shared:
        raise ArgumentError(
            f"kernel {kernel!r}: shared_mem={shared_mem} bytes exceeds this GPU's "
            f"{max_shared} bytes of dynamic shared memory per block"
        )
    return g, b, int(shared_mem)


# ---------------------------------------------------------------------------------------------
# The driver side (GPU only).


def _driver():
    try:
        from cuda.bindings import driver
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise UnsupportedError(
            f"cuda.bindings is not importable ({exc}); install 'kernforge[cuda]' to launch "
            "CUDA C++ kernels"
        ) from exc
    return driver


def drv(result, what: str):
    """Unpack a cuda.bindings driver result tuple, raising ``DeviceError`` on failure."""
    cu = _driver()
    err, *rest = result if isinstance(result, tuple) else (result,)
    if err != cu.CUresult.CUDA_SUCCESS:
        _, name = cu.cuGetErrorName(err)
        _, text = cu.cuGetErrorString(err)
        raise DeviceError(
            f"{what} failed: {name.decode() if name else err} "
            f"({text.decode() if text else 'no description'})"
        )
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else rest


_primary: dict[int, Any] = {}
_max_optin: dict[int, int] = {}


def primary_context(index: int):
    """The primary context of device ``index`` (the one torch uses), retained once."""
    ctx = _primary.get(index)
    if ctx is None:
        cu = _driver()
        drv(cu.cuInit(0), "cuInit")
        dev = drv(cu.cuDeviceGet(index), "cuDeviceGet")
        ctx = drv(cu.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
        _primary[index] = ctx
        attr = cu.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
        _max_optin[index] = int(drv(cu.cuDeviceGetAttribute(attr, dev), "cuDeviceGetAttribute"))
    return ctx


def max_shared_optin(index: int) -> int:
    """Most dynamic shared memory a block may opt in to on device ``index``, in bytes."""
    primary_context(index)
    return _max_optin[index]


class ContextGuard:
    """Make device ``index``'s primary context current for a block, if it is not already."""

    def __init__(self, index: int):
        self.ctx = primary_context(index)
        self.pushed = False

    def __enter__(self):
        cu = _driver()
        cur = drv(cu.cuCtxGetCurrent(), "cuCtxGetCurrent")
        if cur is None or int(cur) != int(self.ctx):
            drv(cu.cuCtxPushCurrent(self.ctx), "cuCtxPushCurrent")
            self.pushed = True
        return self

    def __exit__(self, *exc):
        if self.pushed:
            drv(_driver().cuCtxPopCurrent(), "cuCtxPopCurrent")


def load_function(cubin: bytes, name: str, index: int):
    """Load ``cubin`` into device ``index``'s primary context; returns (module, function)."""
    cu = _driver()
    with ContextGuard(index):
        try:
            module = drv(cu.cuModuleLoadData(cubin), "cuModuleLoadData")
        except DeviceError as exc:
            raise DeviceError(
                f"cannot load the cubin of kernel {name!r} on cuda:{index} ({exc}); it was "
                "compiled for another arch: compile with arch=None (this GPU) or its sm_XY"
            ) from exc
        fn = drv(cu.cuModuleGetFunction(module, name.encode()), f"cuModuleGetFunction({name})")
    return module, fn


def current_stream(index: int) -> int:
    """The raw handle of torch's current stream on device ``index``."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # what Inductor calls: fast
    if raw is not None:
        return int(raw(index))
    return int(torch.cuda.current_stream(index).cuda_stream)


def stream_handle(stream: Any, device: torch.device) -> int:
    """The ``CUstream`` handle of ``stream``: None means torch's current stream on ``device``."""
    if stream is None:
        return current_stream(device.index if device.index is not None else 0)
    if isinstance(stream, torch.cuda.Stream):
        return int(stream.cuda_stream)
    if _is_int(stream):
        return int(stream)
    if hasattr(stream, "__cuda_stream__"):
        return int(stream.__cuda_stream__()[1])
    if hasattr(stream, "cuda_stream"):
        return int(stream.cuda_stream)
    if hasattr(stream, "handle"):
        return int(stream.handle)
    raise ArgumentError(
        f"stream={stream!r}; expected None (torch's current stream), a torch.cuda.Stream, an "
        "object with __cuda_stream__, or a raw CUstream handle (int)"
    )


def launch_function(
    fn, packed: list, grid, block, shared_mem: int, stream: int, pdl: bool = False
) -> None:
    """``cuLaunchKernel`` with ``packed`` ctypes values (the current context must be right).

    ``pdl``: launch with programmatic stream serialization (Hopper's programmatic dependent
    launch), so the kernel may start while the previous one on the stream finishes; the kernel
    must then wait (``griddepcontrol.wait``) before touching what that one writes or reads."""
    cu = _driver()
    n = len(packed)
    ptrs = (ctypes.c_void_p * max(n, 1))(*[ctypes.addressof(v) for v in packed])
    if pdl:
        cfg = cu.CUlaunchConfig()
        cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ = grid
        cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ = block
        cfg.sharedMemBytes, cfg.hStream = shared_mem, cu.CUstream(stream)
        attr = cu.CUlaunchAttribute()
        attr.id = cu.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
        attr.value.programmaticStreamSerializationAllowed = 1
        cfg.attrs, cfg.numAttrs = [attr], 1
        params = ctypes.addressof(ptrs) if n else 0
        drv(cu.cuLaunchKernelEx(cfg, fn, params, 0), "cuLaunchKernelEx")
        return
    drv(
        cu.cuLaunchKernel(
            fn, grid[0], grid[1], grid[2], block[0], block[1], block[2], shared_mem,
            cu.CUstream(stream), ctypes.addressof(ptrs) if n else 0, 0,
        ),
        "cuLaunchKernel",
    )  # fmt: skip
