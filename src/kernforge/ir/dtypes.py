"""The IR's dtypes: plain names, so the IR depends on neither NumPy nor torch.

Front ends map their own dtypes to these names (``kernforge.frontend`` for NumPy, the model
compiler for torch); back ends map them to theirs.
"""

from __future__ import annotations

from ..errors import DTypeError

BOOL = "bool"
INTS = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
FLOATS = ("float16", "bfloat16", "float32", "float64")
ALL = (BOOL, *INTS, *FLOATS)

ITEMSIZE = {
    "bool": 1, "int8": 1, "uint8": 1, "int16": 2, "uint16": 2, "int32": 4, "uint32": 4,
    "int64": 8, "uint64": 8, "float16": 2, "bfloat16": 2, "float32": 4, "float64": 8,
}  # fmt: skip


def check(name: str) -> str:
    """``name`` when it is an IR dtype, else a DTypeError listing the known ones."""
    if name not in ITEMSIZE:
        raise DTypeError(f"unknown IR dtype {name!r}; expected one of {', '.join(ALL)}")
    return name


def is_float(name: str) -> bool:
    return name in FLOATS


def is_int(name: str) -> bool:
    return name in INTS


def is_bool(name: str) -> bool:
    return name == BOOL


def is_low_precision(name: str) -> bool:
    """16-bit floats: kernels load them, compute in float32 and round on store."""
    return name in ("float16", "bfloat16")
