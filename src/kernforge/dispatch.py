"""Backend dispatch for catalog ops.

A public op is a function decorated with :func:`dispatch`: its body only checks the inputs
(raising ``ShapeError``/``DTypeError``/``DeviceError``); the decorator then picks a backend
implementation registered with :func:`register_impl` and calls it with the bound arguments.

Backend choice, in order: the innermost ``with kernforge.backend(...)``, else
``kernforge.set_backend(...)``, else ``KERNFORGE_BACKEND``. ``"auto"`` takes the first backend
of :data:`PREFERENCE` that supports the inputs. When the chosen backend does not support them
(its ``supports`` returns a reason), the op falls back to ``torch`` with a one-time
:class:`FallbackWarning`, or raises :class:`~kernforge.errors.UnsupportedError` when
``KERNFORGE_DISABLE_FALLBACK=1``.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from . import config
from .errors import ConfigError, UnsupportedError

#: Backends tried by ``"auto"``, fastest first. ``torch`` is the fallback and always last.
PREFERENCE: tuple[str, ...] = ("triton", "cuda", "torch")
FALLBACK = "torch"

#: ``supports(**arguments) -> None`` when the backend can run the call, else the reason why not.
Supports = Callable[..., str | None]


class FallbackWarning(UserWarning):
    """A catalog op ran on the torch fallback because the chosen backend could not run it."""


@dataclass(frozen=True)
class Impl:
    """One backend's implementation of one op."""

    op: str
    backend: str
    fn: Callable[..., Any]
    supports: Supports | None = None
    auto: bool = True  # taken by "auto"; False: only when this backend is named

    def reason_unsupported(self, args: dict[str, Any]) -> str | None:
        return None if self.supports is None else self.supports(**args)


_IMPLS: dict[str, dict[str, Impl]] = {}
_OPS: dict[str, Callable[..., Any]] = {}
_default_backend: str | None = None  # set_backend(); None means "use the config"
_backend_stack: list[str] = []  # with backend(...)
_warned: set[tuple[str, str, str]] = set()


def _check_backend_name(name: str) -> str:
    if name not in config.BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; choose one of {', '.join(config.BACKENDS)}")
    return name


def register_impl(
    name: str, backend: str, supports: Supports | None = None, auto: bool = True
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``fn`` as ``backend``'s implementation of op ``name``.

    ``fn`` is called with the public op's arguments as keywords. ``supports``, when given, is
    called the same way and returns None or a one-line reason the inputs are not supported.
    ``auto=False`` keeps ``"auto"`` from choosing it (a reference is faster there): it runs
    only when its backend is named.
    """
    _check_backend_name(backend)

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        impls = _IMPLS.setdefault(name, {})
        if backend in impls:
            raise ValueError(f"op {name!r} already has a {backend!r} implementation")
        impls[backend] = Impl(name, backend, fn, supports, auto)
        return fn

    return deco


def set_backend(name: str) -> None:
    """Set the process-wide backend ("auto", "cuda", "triton" or "torch")."""
    global _default_backend
    _default_backend = _check_backend_name(name)


def get_backend() -> str:
    """The backend in force here: context, then ``set_backend``, then ``KERNFORGE_BACKEND``."""
    if _backend_stack:
        return _backend_stack[-1]
    if _default_backend is not None:
        return _default_backend
    return config.settings.backend


@contextmanager
def backend(name: str) -> Iterator[None]:
    """``with kernforge.backend("torch"): ...`` runs catalog ops on that backend inside."""
    _backend_stack.append(_check_backend_name(name))
    try:
        yield
    finally:
        _backend_stack.pop()


def registered() -> dict[str, list[str]]:
    """Every op with the backends that implement it."""
    return {op: sorted(impls) for op, impls in sorted(_IMPLS.items())}


def select(name: str, args: dict[str, Any]) -> Impl:
    """The implementation of op ``name`` that will run for ``args`` (see the module docs)."""
    impls = _IMPLS.get(name, {})
    wanted = get_backend()
    candidates = [b for b in PREFERENCE if b != FALLBACK] if wanted == "auto" else [wanted]
    reasons: list[str] = []
    for b in candidates:
        impl = impls.get(b)
        if impl is not None and wanted == "auto" and not impl.auto:
            continue  # named-only: a reference is faster for auto's purposes
        reason = f"no {b} implementation" if impl is None else impl.reason_unsupported(args)
        if reason is None:
            return impl  # type: ignore[return-value]
        reasons.append(f"{b}: {reason}")
    fallback = impls.get(FALLBACK)
    if wanted == FALLBACK or fallback is None:
        raise UnsupportedError(f"{name}: no backend can run these inputs ({'; '.join(reasons)})")
    why = "; ".join(reasons)
    if config.settings.disable_fallback:
        raise UnsupportedError(
            f"{name}: backend {wanted!r} cannot run these inputs ({why}), and "
            "KERNFORGE_DISABLE_FALLBACK=1 forbids the torch fallback. Change the inputs, "
            "or unset KERNFORGE_DISABLE_FALLBACK to accept the fallback."
        )
    key = (name, wanted, why)
    # Warning inside a torch.compile trace is a graph break: the eager call warns instead.
    if key not in _warned and not torch.compiler.is_compiling():
        _warned.add(key)
        warnings.warn(
            f"kernforge.{name}: backend {wanted!r} cannot run these inputs ({why}); "
            "falling back to torch (warned once).",
            FallbackWarning,
            stacklevel=3,  # the caller of the public op
        )
    return fallback


def dispatch(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Make ``fn`` the public entry point of op ``name``.

    ``fn``'s signature is the op's signature and its body checks the inputs; after it returns,
    the selected backend's implementation runs with the same arguments (defaults applied).
    """

    def deco(check: Callable[..., Any]) -> Callable[..., Any]:
        params = list(inspect.signature(check).parameters.values())
        names = [p.name for p in params]
        defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}

        @functools.wraps(check)
        def op(*args: Any, **kwargs: Any) -> Any:
            # Bind by hand (not inspect.Signature.bind) so torch.compile traces it cleanly.
            if len(args) > len(names):
                raise TypeError(f"{name}() takes {len(names)} arguments, got {len(args)}")
            bound = dict(zip(names, args, strict=False))
            for key, value in kwargs.items():
                if key not in defaults and key not in names:
                    raise TypeError(f"{name}() got an unexpected keyword argument {key!r}")
                if key in bound:
                    raise TypeError(f"{name}() got multiple values for argument {key!r}")
                bound[key] = value
            for key in names:
                if key not in bound:
                    if key not in defaults:
                        raise TypeError(f"{name}() missing required argument {key!r}")
                    bound[key] = defaults[key]
            check(**bound)
            return select(name, bound).fn(**bound)

        _OPS[name] = op
        return op

    return deco
