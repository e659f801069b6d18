"""Weight recipes: how each program weight follows from the source state dict.

A recipe is None (the source tensor of the weight's name, as is) or a nested tuple
``(op, *args)`` whose tensor arguments are source names (str) or nested recipes:

- ``("cast", src, dtype)``; ``("transpose", src, perm)`` (a contiguous permute);
  ``("reshape", src, shape)``;
- ``("fold_bn_weight", conv_w, bn_w, bn_b, mean, var, eps)``: ``conv_w * bn_w / sqrt(var + eps)``
  per output channel (axis 0); ``("fold_bn_bias", conv_b | None, bn_w, bn_b, mean, var, eps)``:
  ``(conv_b - mean) * bn_w / sqrt(var + eps) + bn_b``;
- ``("bn_scale", bn_w, var, eps)`` and ``("bn_shift", bn_w, bn_b, mean, var, eps)``: a lone
  BatchNorm as ``x * scale + shift``.

Folds compute in float64 and round once. :mod:`kernforge.runtime.recipes` evaluates them (the
same code loads a saved program's weights); this module holds the compiler's helpers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

Recipe = tuple | None


def evaluate(name: str, recipe: Recipe, source: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The program weight ``name`` made by ``recipe`` from ``source``."""
    from ..runtime import recipes

    return recipes.evaluate(name, recipe, source)


def strip_cast(recipe: Recipe, name: str) -> tuple[Any, str | None]:
    """(the recipe under an outer cast, or the source name; that cast's dtype or None)."""
    if recipe is None:
        return name, None
    if recipe[0] == "cast":
        return recipe[1], recipe[2]
    return recipe, None


def wrap_cast(inner: Any, dtype: str | None) -> Any:
    return inner if dtype is None else ("cast", inner, dtype)
