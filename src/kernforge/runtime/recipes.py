"""Weight recipes: how a compiled program's weight is computed from the source model's state
dict, and loading a program's weights from a safetensors file or a state dict.

A program's ``weight`` node has attributes ``name`` (the program's weight name) and ``recipe``.
A recipe is plain, JSON-able data, so passes rewrite it and archives store it:

- ``None``: the weight is the source tensor called ``name``, as it is;
- a string: the source tensor of that name;
- a tuple ``(op, *args)``: ``op`` applied to its arguments, where the tensor arguments are
  themselves recipes (so recipes compose, e.g. ``("cast", ("fold_bn_weight", ...), "bfloat16")``)
  and the rest are plain numbers, strings or tuples. The ops:

  =====================================================  =========================================
  ``("fold_bn_weight", w, gamma, beta, mean, var, eps)``  ``w * gamma / sqrt(var + eps)`` per output
                                                          channel (axis 0 of ``w``)
  ``("fold_bn_bias", b, gamma, beta, mean, var, eps)``    ``(b - mean) * gamma / sqrt(var + eps) +
                                                          beta``; ``b`` None: a conv without bias
  ``("bn_scale", gamma, var, eps)``                       a lone BatchNorm as ``x * scale + shift``:
                                                          ``gamma / sqrt(var + eps)``
  ``("bn_shift", gamma, beta, mean, var, eps)``           ``beta - mean * gamma / sqrt(var + eps)``
  ``("cast", x, dtype)``                                  ``x`` as IR dtype ``dtype``
  ``("transpose", x, perm)``                              axes permuted, contiguous
  ``("reshape", x, shape)``                               new shape, same elements
  ``("pad", x, widths, value=0)``                         ``widths``: ``(before, after)`` per axis
  ``("slice", x, axis, start, stop)``                     ``x[..., start:stop, ...]`` on ``axis``
  ``("concat", (x, y, ...), axis)``                       tensors joined along ``axis``
  ``("scale", x, factor)``                                ``x * factor`` (a float)
  =====================================================  =========================================

  ``gamma``/``beta`` may be None (BatchNorm without affine parameters). Batch-norm folding runs
  in float64 and rounds once to ``w``'s dtype, so a folded float32 weight is as exact as float32
  allows. New ops are added with :func:`register`.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ArgumentError, DTypeError, KernforgeError, ShapeError

Recipe = Any  # None | str | tuple


@dataclass(frozen=True)
class RecipeOp:
    """One recipe op: ``fn(*args)``, where the arguments at ``tensor_args`` are evaluated
    recipes (``"list"`` at that position: a tuple of recipes) and the rest are passed as is."""

    name: str
    fn: Callable[..., torch.Tensor]
    tensor_args: tuple[int, ...]
    list_args: tuple[int, ...] = ()
    optional: tuple[int, ...] = ()  # tensor arguments that may be None


OPS: dict[str, RecipeOp] = {}


def register(
    name: str,
    fn: Callable[..., torch.Tensor],
    tensor_args: tuple[int, ...],
    list_args: tuple[int, ...] = (),
    optional: tuple[int, ...] = (),
) -> None:
    """Add recipe op ``name`` (positions count the arguments after the op name)."""
    OPS[name] = RecipeOp(name, fn, tensor_args, list_args, optional)


def _bn_scale(gamma, var, eps: float) -> torch.Tensor:
    inv = torch.rsqrt(var.to(torch.float64) + float(eps))
    return inv if gamma is None else gamma.to(torch.float64) * inv


def _check_channels(what: str, n: int, **stats) -> None:
    for k, t in stats.items():
        if t is not None and tuple(t.shape) != (n,):
            raise ShapeError(f"{what}: {k} has shape {tuple(t.shape)}, expected ({n},)")


def fold_bn_weight(w, gamma, beta, mean, var, eps) -> torch.Tensor:
    """A conv (or linear) weight with an inference BatchNorm after it folded in."""
    _check_channels("fold_bn_weight", w.shape[0], gamma=gamma, beta=beta, mean=mean, var=var)
    scale = _bn_scale(gamma, var, eps)
    out = w.to(torch.float64) * scale.reshape(-1, *([1] * (w.ndim - 1)))
    return out.to(w.dtype)


def fold_bn_bias(b, gamma, beta, mean, var, eps) -> torch.Tensor:
    """The bias of a conv with an inference BatchNorm after it folded in (``b`` None: the conv
    has no bias)."""
    n = var.shape[0]
    _check_channels("fold_bn_bias", n, b=b, gamma=gamma, beta=beta, mean=mean)
    scale = _bn_scale(gamma, var, eps)
    b64 = torch.zeros(n, dtype=torch.float64, device=var.device) if b is None else b.double()
    out = (b64 - mean.to(torch.float64)) * scale
    if beta is not None:
        out = out + beta.to(torch.float64)
    return out.to(_float_dtype(b, gamma, mean))


def bn_scale(gamma, var, eps) -> torch.Tensor:
    """A lone inference BatchNorm as ``x * scale + shift``: the scale ``gamma / sqrt(var +
    eps)``."""
    _check_channels("bn_scale", var.shape[0], gamma=gamma)
    return _bn_scale(gamma, var, eps).to(_float_dtype(gamma, var))


def bn_shift(gamma, beta, mean, var, eps) -> torch.Tensor:
    """A lone inference BatchNorm's shift: ``beta - mean * gamma / sqrt(var + eps)``."""
    _check_channels("bn_shift", var.shape[0], gamma=gamma, beta=beta, mean=mean)
    out = -mean.to(torch.float64) * _bn_scale(gamma, var, eps)
    if beta is not None:
        out = out + beta.to(torch.float64)
    return out.to(_float_dtype(gamma, var))


def _float_dtype(*ts) -> torch.dtype:
    """The dtype of the first floating-point tensor given (float32 when none is)."""
    return next((t.dtype for t in ts if t is not None and t.is_floating_point()), torch.float32)


def _cast(x: torch.Tensor, dtype: str) -> torch.Tensor:
    from ..frontend.dtypes import to_torch

    return x.to(to_torch(dtype))


def _transpose(x: torch.Tensor, perm) -> torch.Tensor:
    if sorted(perm) != list(range(x.ndim)):
        raise ShapeError(f"transpose recipe: {tuple(perm)} is not a permutation of {x.ndim} axes")
    return x.permute(*perm).contiguous()


def _reshape(x: torch.Tensor, shape) -> torch.Tensor:
    if x.numel() != _prod(shape) or any(int(n) < 0 for n in shape):
        raise ShapeError(f"reshape recipe: cannot reshape {tuple(x.shape)} into {tuple(shape)}")
    return x.reshape(tuple(int(n) for n in shape)).contiguous()


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _pad(x: torch.Tensor, widths, value: float = 0) -> torch.Tensor:
    if len(widths) != x.ndim or any(len(p) != 2 or min(p) < 0 for p in widths):
        raise ShapeError(
            f"pad recipe: widths {widths} must be one non-negative (before, after) pair per "
            f"axis of a {x.ndim}-d tensor"
        )
    out = torch.full(
        tuple(n + a + b for n, (a, b) in zip(x.shape, widths, strict=True)), value, dtype=x.dtype
    )
    out[tuple(slice(a, a + n) for n, (a, _) in zip(x.shape, widths, strict=True))] = x
    return out


def _slice(x: torch.Tensor, axis: int, start: int, stop: int) -> torch.Tensor:
    if not -x.ndim <= axis < x.ndim or not 0 <= start <= stop <= x.shape[axis]:
        raise ShapeError(
            f"slice recipe: [{start}:{stop}] on axis {axis} does not fit shape {tuple(x.shape)}"
        )
    return x.narrow(axis, start, stop - start).contiguous()


def _concat(xs: list[torch.Tensor], axis: int) -> torch.Tensor:
    try:
        return torch.cat(xs, dim=axis)
    except RuntimeError as e:
        shapes = [tuple(x.shape) for x in xs]
        msg = f"concat recipe on axis {axis}: shapes {shapes} do not join: {e}"
        raise ShapeError(msg) from None


def _scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    return (x.to(torch.float64) * float(factor)).to(x.dtype)


register("fold_bn_weight", fold_bn_weight, (0, 1, 2, 3, 4), optional=(1, 2))
register("fold_bn_bias", fold_bn_bias, (0, 1, 2, 3, 4), optional=(0, 1, 2))
register("bn_scale", bn_scale, (0, 1), optional=(0,))
register("bn_shift", bn_shift, (0, 1, 2, 3), optional=(0, 1))
register("cast", _cast, (0,))
register("transpose", _transpose, (0,))
register("reshape", _reshape, (0,))
register("pad", _pad, (0,))
register("slice", _slice, (0,))
register("concat", _concat, (), list_args=(0,))
register("scale", _scale, (0,))


def sources(recipe: Recipe, name: str | None = None) -> list[str]:
    """The source tensor names ``recipe`` reads, in order, without repeats (``name`` stands for
    a None recipe)."""
    out: list[str] = []

    def walk(r: Recipe, top: bool) -> None:
        if r is None:
            if top and name is not None:
                out.append(name)
            return
        if isinstance(r, str):
            out.append(r)
            return
        op = _op(r)
        args = r[1:]
        for i in (*op.tensor_args, *op.list_args):
            if i >= len(args):
                continue
            for sub in args[i] if i in op.list_args else (args[i],):
                walk(sub, False)

    walk(recipe, True)
    return list(dict.fromkeys(out))


def _op(recipe: tuple) -> RecipeOp:
    if not isinstance(recipe, tuple | list) or not recipe or recipe[0] not in OPS:
        head = recipe[0] if isinstance(recipe, tuple | list) and recipe else recipe
        raise ArgumentError(
            f"unknown weight recipe {head!r}; expected None, a source tensor name, or a tuple "
            f"starting with one of {', '.join(sorted(OPS))}"
        )
    return OPS[recipe[0]]


def evaluate(name: str | None, recipe: Recipe, source: Mapping[str, torch.Tensor]):
    """The program weight ``name`` computed by ``recipe`` from the ``source`` tensors (the
    source tensor ``name`` as it is when ``recipe`` is None). A missing source tensor raises
    MissingWeightError (a KeyError) naming it and the closest names present."""

    def get(key: str) -> torch.Tensor:
        if key not in source:
            close = difflib.get_close_matches(key, list(source), n=3)
            hint = f"; close names: {', '.join(close)}" if close else ""
            raise MissingWeightError(
                f"source tensor {key!r} (needed by weight {name!r}) is not in the source "
                f"({len(source)} tensors){hint}"
            )
        return source[key]

    def run(r: Recipe, optional: bool = False) -> torch.Tensor | None:
        if r is None and optional:
            return None
        if isinstance(r, str):
            return get(r)
        op = _op(r)
        args = list(r[1:])
        for i in op.tensor_args:
            if i < len(args):
                if args[i] is None and i not in op.optional:
                    raise ArgumentError(
                        f"weight {name!r}: recipe op {r[0]!r} needs a tensor as argument "
                        f"{i + 1}, got None"
                    )
                args[i] = run(args[i], i in op.optional)
        for i in op.list_args:
            args[i] = [run(x) for x in args[i]]
        try:
            return op.fn(*args)
        except TypeError as e:
            raise ArgumentError(f"weight {name!r}: bad arguments to recipe {r[0]!r}: {e}") from e

    return get(name) if recipe is None else run(recipe)


class MissingWeightError(KernforgeError, KeyError):
    """A source tensor a weight recipe needs is not in the state dict or file."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def _source_from(source: str | os.PathLike | Mapping[str, torch.Tensor], needed: list[str]):
    """The source tensors: a mapping as is, or the ``needed`` tensors of a safetensors file
    (only those are read; a missing one is left out so the error names it)."""
    if isinstance(source, Mapping):
        return source
    path = Path(source)
    if not path.is_file():
        raise ArgumentError(f"load_weights: no file {str(path)!r} (give a .safetensors file)")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            out = {k: f.get_tensor(k) for k in needed if k in keys}
            # Names only (no data) for the error's "close names" hint.
            out.update({k: None for k in keys - out.keys()})
    except Exception as e:  # safetensors raises its own error type for a corrupt header
        raise ArgumentError(f"load_weights: cannot read {str(path)!r} as safetensors: {e}") from e
    return out


def evaluate_weights(graph, source) -> dict[str, torch.Tensor]:
    """Every weight of ``graph`` (its ``weight`` nodes) computed from ``source`` (a state dict
    or a safetensors file path) by its recipe, checked against the node's shape and dtype."""
    from ..frontend.dtypes import to_torch

    nodes = [n for n in graph.nodes if n.op == "weight"]
    needed = [s for n in nodes for s in sources(n.attrs.get("recipe"), n.attrs["name"])]
    src = _source_from(source, list(dict.fromkeys(needed)))
    out: dict[str, torch.Tensor] = {}
    for n in nodes:
        name, v = n.attrs["name"], n.output
        t = evaluate(name, n.attrs.get("recipe"), src)
        if not isinstance(t, torch.Tensor):
            raise ArgumentError(f"weight {name!r}: recipe gave {type(t).__name__}, not a tensor")
        want = to_torch(v.dtype)
        if tuple(t.shape) != v.shape:
            raise ShapeError(
                f"weight {name!r}: recipe {n.attrs.get('recipe')!r} gives shape "
                f"{tuple(t.shape)}, the program expects {v.shape} (was the program compiled "
                "from a model of another size?)"
            )
        if t.dtype != want:
            raise DTypeError(
                f"weight {name!r}: recipe gives {t.dtype}, the program expects {want} "
                "(a recipe without its final cast?)"
            )
        out[name] = t.detach().contiguous()
    return out


def load_weights(program, source) -> dict[str, torch.Tensor]:
    """Compute every weight of ``program`` from ``source`` (a safetensors file of the original
    model's state dict, or the state dict itself) through the recipes its compile recorded
    (BatchNorm folds, casts, layout changes), install them in the program, and return them."""
    weights = evaluate_weights(program.graph, source)
    setter = getattr(program, "set_weights", None)
    if setter is not None:
        setter(weights)
    else:
        program.weights = weights
    return weights
