"""Input checks shared by the public ops: they run before any backend, so bad input raises a
clear kernforge error instead of a Triton traceback or a silent wrong answer."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from . import config
from .errors import DeviceError, DTypeError, ShapeError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(op: str, name: str, x: object, min_dim: int = 1) -> torch.Tensor:
    """``x`` must be a torch.Tensor of rank >= ``min_dim``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < min_dim:
        raise ShapeError(
            f"{op}: {name} must have at least {min_dim} dimension(s), got shape {tuple(x.shape)}"
        )
    return x


def floating(op: str, name: str, x: torch.Tensor) -> None:
    """``x`` must hold floating-point values (fp16, bf16, fp32, fp64)."""
    if x.dtype not in FLOAT_DTYPES:
        raise DTypeError(
            f"{op}: {name} has dtype {x.dtype}; expected a floating dtype "
            "(float16, bfloat16, float32 or float64). Cast it first, e.g. x.float()."
        )


def same_dtype(op: str, **tensors: torch.Tensor | None) -> None:
    """All given tensors (None skipped) share one dtype."""
    given = {k: v.dtype for k, v in tensors.items() if v is not None}
    if len(set(given.values())) > 1:
        listed = ", ".join(f"{k}={v}" for k, v in given.items())
        raise DTypeError(f"{op}: inputs must share one dtype, got {listed}. Cast them to match.")


def same_device(op: str, **tensors: torch.Tensor | None) -> None:
    """All given tensors (None skipped) live on one device."""
    given = {k: v.device for k, v in tensors.items() if v is not None}
    if len(set(given.values())) > 1:
        listed = ", ".join(f"{k} on {v}" for k, v in given.items())
        raise DeviceError(
            f"{op}: inputs must be on one device, got {listed}. Move them with .to()."
        )


def shape(op: str, name: str, x: torch.Tensor, expected: tuple[int, ...], why: str = "") -> None:
    """``x.shape`` must equal ``expected``."""
    if tuple(x.shape) != tuple(expected):
        extra = f" ({why})" if why else ""
        raise ShapeError(
            f"{op}: {name} has shape {tuple(x.shape)}, expected {tuple(expected)}{extra}"
        )


def last_dim_vector(op: str, name: str, w: torch.Tensor | None, x: torch.Tensor) -> None:
    """``w`` (when given) is a floating 1-D tensor of x's last size, on x's device."""
    if w is None:
        return
    tensor(op, name, w)
    floating(op, name, w)
    shape(op, name, w, (x.shape[-1],), f"one value per feature of x's last dimension {x.shape[-1]}")
    same_device(op, x=x, **{name: w})


_trusted = 0


@contextmanager
def trusted_indices() -> Iterator[None]:
    """Inside, the host-side index checks are skipped: for indices that are in range by
    construction (the MoE layer's expert ids from ``moe_route``, say)."""
    global _trusted
    _trusted += 1
    try:
        yield
    finally:
        _trusted -= 1


def index_checks_on() -> bool:
    """Whether ops check index inputs (position ids, group sizes, cu_seqlens, page tables, expert
    ids) against their bounds on the host. Those checks read device values, a sync, so they run
    only with ``KERNFORGE_CHECK_INDICES=1`` and never inside :func:`trusted_indices`, while
    torch.compile traces, or while a CUDA graph is captured (where a sync is not allowed)."""
    if not config.settings.check_indices or _trusted or torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())
