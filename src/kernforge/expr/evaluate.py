"""Evaluate trees and programs with torch ops: the torch backend and the reference.

Values are tensors of one compute dtype (float32, or float64 for float64 inputs); constants and
parameters become 0-dim tensors, so every operation broadcasts as torch does. Row reductions
run over the last dimension. Autograd flows through everything, which is how tests check the
symbolically derived gradients against an independent derivation.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .program import N, Program
from .snippets import FUNCTIONS
from .tree import Node, Num, Op, Var, walk

Value = torch.Tensor

_BINARY = {
    "add": torch.add,
    "sub": torch.sub,
    "mul": torch.mul,
    "div": torch.div,
    "lt": torch.lt,
    "le": torch.le,
    "gt": torch.gt,
    "ge": torch.ge,
    "eq": torch.eq,
    "ne": torch.ne,
    "and": torch.logical_and,
    "or": torch.logical_or,
}


def evaluate(
    node: Node,
    env: Mapping[str, Value | float],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    memo: dict[Node, Value] | None = None,
) -> Value:
    """The value of ``node`` with variables from ``env`` (tensors or floats)."""
    memo = {} if memo is None else memo

    def scalar(v: float | Value) -> Value:
        if isinstance(v, torch.Tensor):
            return v if v.dtype == dtype or v.dtype == torch.bool else v.to(dtype)
        return torch.tensor(float(v), dtype=dtype, device=device)

    for n in walk(node):
        if n in memo:
            continue
        if isinstance(n, Num):
            memo[n] = scalar(n.value)
        elif isinstance(n, Var):
            if n.name not in env:
                raise KeyError(f"no value for variable {n.name!r}")
            memo[n] = scalar(env[n.name])
        else:
            assert isinstance(n, Op)
            args = [memo[a] for a in n.args]
            memo[n] = _apply(n.op, args, dtype)
    return memo[node]


def _apply(name: str, args: list[Value], dtype: torch.dtype) -> Value:
    if name in _BINARY:
        return _BINARY[name](args[0], args[1])
    if name == "neg":
        return torch.neg(args[0])
    if name == "not":
        return torch.logical_not(args[0])
    if name == "float":
        return args[0].to(dtype)
    if name == "where":
        return torch.where(args[0], args[1], args[2])
    if name == "pow" and args[1].dim() == 0 and not args[1].requires_grad:
        # A constant exponent: torch's pow then has a clean derivative at base 0.
        exponent = float(args[1])
        if exponent == int(exponent):
            return torch.pow(args[0], int(exponent))
        return torch.pow(args[0], exponent)
    return FUNCTIONS[name].torch(*args)


def run(
    program: Program,
    operands: Mapping[str, Value],
    params: Mapping[str, float],
    shape: tuple[int, ...],
    dtype: torch.dtype,
) -> list[Value]:
    """Run ``program`` over ``shape``: element operands broadcast to ``shape``, row operands to
    ``shape[:-1] + (1,)``; reductions run over the last dimension. Returns the outputs in the
    compute ``dtype``: per-element ones of ``shape``, per-row ones of ``shape[:-1]``."""
    device = next(iter(operands.values())).device
    env: dict[str, Value | float] = {}
    for name in program.operands:
        env[name] = operands[name].to(dtype)
    for name in program.row_operands:
        env[name] = operands[name].to(dtype).unsqueeze(-1)
    env.update(params)
    if shape:
        env.setdefault(N, float(shape[-1]))
    memo: dict[Node, Value] = {}
    for r in program.reductions:
        v = evaluate(r.expr, env, dtype, device, memo).expand(shape)
        if r.kind == "sum":
            env[r.name] = v.sum(-1, keepdim=True)
        elif r.kind == "mean":
            env[r.name] = v.mean(-1, keepdim=True)
        elif r.kind == "max":
            env[r.name] = v.amax(-1, keepdim=True)
        else:
            env[r.name] = v.amin(-1, keepdim=True)
    outs = []
    for i, out in enumerate(program.outputs):
        v = evaluate(out, env, dtype, device, memo)
        if program.output_per_row(i):
            outs.append(v.expand((*shape[:-1], 1)).squeeze(-1))
        else:
            outs.append(v.expand(shape))
    return outs
