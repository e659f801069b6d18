"""NumPy and torch dtypes <-> IR dtype names, and NumPy 2 (NEP 50) type promotion plus bfloat16.

NumPy has no bfloat16. Traced values of IR dtype ``bfloat16`` report :data:`bfloat16` (a marker
object that compares equal to the string ``"bfloat16"`` and to ``torch.bfloat16``) as their
``.dtype``; NumPy code that computes on bfloat16 data holds it as float32 arrays.

Promotion follows NumPy 2: Python ``int``/``float`` scalars are *weak* (they take the array's
dtype of the same kind), NumPy scalars and arrays are strong. bfloat16 follows torch: with
float16 -> float32, with float32/float64 -> that, with integers, bools or Python scalars ->
bfloat16.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..errors import DTypeError
from ..ir import dtypes as ir


class BFloat16Type:
    """The dtype marker of bfloat16 traced values (``kernforge.np.bfloat16``)."""

    name = "bfloat16"
    kind = "f"
    itemsize = 2

    def __eq__(self, other: object) -> bool:
        if isinstance(other, BFloat16Type):
            return True
        if isinstance(other, str):
            return other in ("bfloat16", "bf16")
        return other is torch.bfloat16

    def __hash__(self) -> int:
        return hash("bfloat16")

    def __repr__(self) -> str:
        return "kernforge.np.bfloat16"

    def __str__(self) -> str:
        return "bfloat16"


bfloat16 = BFloat16Type()

_TORCH = {
    torch.bool: "bool", torch.int8: "int8", torch.int16: "int16", torch.int32: "int32",
    torch.int64: "int64", torch.uint8: "uint8", torch.uint16: "uint16", torch.uint32: "uint32",
    torch.uint64: "uint64", torch.float16: "float16", torch.bfloat16: "bfloat16",
    torch.float32: "float32", torch.float64: "float64",
}  # fmt: skip
_TO_TORCH = {v: k for k, v in _TORCH.items()}
_PY = {bool: "bool", int: "int64", float: "float64"}


def ir_dtype(x: Any) -> str:
    """The IR dtype name of ``x``: a NumPy dtype or scalar type, a torch dtype, a Python type
    (bool, int -> int64, float -> float64), a dtype name, the :data:`bfloat16` marker, or
    anything with a ``.dtype`` (arrays, tensors, traced values)."""
    if isinstance(x, BFloat16Type):
        return "bfloat16"
    if isinstance(x, str):
        if x in ("bfloat16", "bf16"):
            return "bfloat16"
        try:
            return ir.check(np.dtype(x).name)
        except TypeError:
            raise DTypeError(
                f"unknown dtype name {x!r}; expected one of {', '.join(ir.ALL)}"
            ) from None
    if isinstance(x, torch.dtype):
        if x not in _TORCH:
            raise DTypeError(f"torch dtype {x} has no IR dtype; expected one of {ir.ALL}")
        return _TORCH[x]
    if isinstance(x, type) and x in _PY:
        return _PY[x]
    if isinstance(x, np.dtype) or (isinstance(x, type) and issubclass(x, np.generic)):
        name = np.dtype(x).name
        if name not in ir.ITEMSIZE:
            raise DTypeError(f"NumPy dtype {name} has no IR dtype; expected one of {ir.ALL}")
        return name
    if hasattr(x, "dtype") and not isinstance(x, type):
        return ir_dtype(x.dtype)
    raise DTypeError(
        f"cannot read a dtype from {x!r} ({type(x).__name__}); pass a NumPy or "
        "torch dtype, a dtype name, or bool/int/float"
    )


def to_numpy(name: str) -> np.dtype:
    """The NumPy dtype that holds IR dtype ``name`` (bfloat16 is held as float32)."""
    return np.dtype("float32" if ir.check(name) == "bfloat16" else name)


def to_torch(name: str) -> torch.dtype:
    """The torch dtype of IR dtype ``name``."""
    return _TO_TORCH[ir.check(name)]


def public(name: str) -> np.dtype | BFloat16Type:
    """What a traced value reports as ``.dtype``: a NumPy dtype, or the bfloat16 marker."""
    return bfloat16 if name == "bfloat16" else np.dtype(name)


def _is_weak(x: Any) -> bool:
    return isinstance(x, int | float | complex) and not isinstance(x, bool | np.generic)


def _split(operands: Sequence[Any]) -> tuple[list[str], list[int | float]]:
    """Strong dtype names and weak Python scalars of ``operands``."""
    strong, weak = [], []
    for x in operands:
        if isinstance(x, complex):
            raise DTypeError(f"complex values ({x!r}) are not supported: the IR has no complex")
        if _is_weak(x):
            weak.append(x)
        elif isinstance(x, bool | np.bool_):
            strong.append("bool")
        elif isinstance(x, np.generic):
            strong.append(ir_dtype(x.dtype))
        else:
            strong.append(ir_dtype(x))
    return strong, weak


def _bf16_common(strong: Sequence[str]) -> str:
    """The result dtype of operands including bfloat16: other floats decide, ints do not."""
    floats = [s for s in strong if ir.is_float(s) and s != "bfloat16"]
    if not floats:
        return "bfloat16"
    if "float16" in floats:
        floats.append("float32")
    return np.result_type(*floats).name


def result_type(*operands: Any) -> str:
    """NumPy 2 (NEP 50) result dtype of ``operands`` as an IR name. Operands are dtypes (any
    form :func:`ir_dtype` takes), arrays/traced values (strong), or Python int/float scalars
    (weak). With bfloat16: see the module docstring."""
    strong, weak = _split(operands)
    if "bfloat16" in strong:
        return _bf16_common(strong)
    if not strong and not weak:
        raise DTypeError("result_type needs at least one operand")
    return ir.check(np.result_type(*(np.dtype(s) for s in strong), *weak).name)


def resolve_ufunc(ufunc: np.ufunc, operands: Sequence[Any]) -> tuple[list[str], list[str]]:
    """The loop dtypes NumPy picks for ``ufunc(*operands)``: (input dtypes, output dtypes) as IR
    names. ``operands`` as for :func:`result_type`. bfloat16 operands are resolved as float32
    and every float slot then takes the bfloat16-aware common dtype."""
    strong_names: list[str | None] = []
    args: list[Any] = []
    for x in operands:
        s, w = _split([x])
        if w:
            args.append(type(w[0]))
            strong_names.append(None)
        else:
            name = s[0]
            strong_names.append(name)
            args.append(np.dtype("float32" if name == "bfloat16" else name))
    try:
        dts = ufunc.resolve_dtypes((*args, *([None] * ufunc.nout)))
    except TypeError as e:  # NumPy's no-loop error is a TypeError
        given = ", ".join(
            n or type(x).__name__ for n, x in zip(strong_names, operands, strict=True)
        )
        raise DTypeError(f"np.{ufunc.__name__} does not take ({given}) ({e})") from None
    names = [d.name for d in dts]
    if "bfloat16" in strong_names:
        common = result_type(*operands)
        if ir.is_float(common):
            names = [common if ir.is_float(n) else n for n in names]
    for n in names:
        if n not in ir.ITEMSIZE:
            raise DTypeError(f"np.{ufunc.__name__} gives dtype {n}, which the IR does not have")
    return names[: ufunc.nin], names[ufunc.nin :]
