"""The IR evaluated op by op with NumPy: the ``simulate`` mode, and the definition of what each
op computes (constant folding uses it too).

Values are NumPy arrays of :func:`kernforge.frontend.dtypes.to_numpy` dtypes. bfloat16 values
are float32 arrays holding bfloat16 numbers: every op whose result is bfloat16 computes in
float32 and rounds to bfloat16 (round to nearest even). float16 ops compute in float32 and
round to float16 once (as the kernels do, and as NumPy's own float16 loops do). Integer
``floordiv``/``mod`` and float ``mod`` follow NumPy (floor division; the remainder takes the
divisor's sign); ``div`` takes floats only (front ends cast integers, as NumPy's true division
does). ``take`` indices are in ``[0, n)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ..errors import DTypeError, ShapeError, UnsupportedError
from ..ir import Graph, Node
from ..ir import dtypes as ir


def to_numpy(name: str) -> np.dtype:
    """The NumPy dtype holding IR dtype ``name`` (bfloat16 as float32)."""
    return np.dtype("float32" if name == "bfloat16" else name)


def round_bf16(a: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16 (ties to even), still as float32."""
    a = np.array(a, dtype=np.float32, order="C")  # (not ascontiguousarray: it makes 0-d 1-d)
    u = a.view(np.uint32)
    r = (u + (((u >> 16) & 1) + np.uint32(0x7FFF))) & np.uint32(0xFFFF0000)
    return np.where(np.isnan(a), a, r.view(np.float32))


def _store(x: Any, dtype: str) -> np.ndarray:
    """``x`` as the array that holds IR dtype ``dtype``."""
    x = np.asarray(x)
    if dtype == "bfloat16":
        return round_bf16(x.astype(np.float32))
    return x.astype(to_numpy(dtype), copy=False)


def _compute(dtype: str) -> np.dtype:
    """The dtype elementwise math runs in for IR dtype ``dtype``."""
    return np.dtype(np.float32) if ir.is_low_precision(dtype) else to_numpy(dtype)


def _erf(x: np.ndarray) -> np.ndarray:
    return torch.special.erf(torch.from_numpy(np.array(x, order="C"))).numpy()


UNARY: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "neg": np.negative, "abs": np.abs, "exp": np.exp, "exp2": np.exp2, "log": np.log,
    "log2": np.log2, "log1p": np.log1p, "expm1": np.expm1, "sqrt": np.sqrt,
    "rsqrt": lambda x: 1 / np.sqrt(x), "sin": np.sin, "cos": np.cos, "tanh": np.tanh,
    "sigmoid": lambda x: 1 / (1 + np.exp(-x)), "erf": _erf, "floor": np.floor,
    "ceil": np.ceil, "sign": np.sign, "isnan": np.isnan, "isinf": np.isinf,
    "logical_not": np.logical_not,
}  # fmt: skip

BINARY: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.true_divide,
    "floordiv": np.floor_divide, "mod": np.remainder, "pow": np.power, "maximum": np.maximum,
    "minimum": np.minimum, "eq": np.equal, "ne": np.not_equal, "lt": np.less,
    "le": np.less_equal, "gt": np.greater, "ge": np.greater_equal,
    "logical_and": np.logical_and, "logical_or": np.logical_or, "logical_xor": np.logical_xor,
}  # fmt: skip


def _elementwise(node: Node, args: list[np.ndarray]) -> np.ndarray:
    op, out = node.op, node.output.dtype
    if node.op == "cast":
        (x,) = args
        return _store(x, out)
    if op == "where":
        c, a, b = args
        return _store(np.where(c, a, b), out)
    in_dt = node.inputs[0].dtype if node.inputs else out
    if op == "div" and not ir.is_float(in_dt):
        raise DTypeError(
            f"simulate: div of {in_dt} values at {node.loc}; the IR's div takes "
            "floats (cast first) and floordiv does integer division"
        )
    if op in ("pow",) and ir.is_int(in_dt) and np.any(args[1] < 0):
        raise ValueError(f"{node.loc}: integers to negative integer powers are not allowed")
    xs = [a.astype(_compute(in_dt), copy=False) for a in args]
    fn = UNARY.get(op) or BINARY.get(op)
    if fn is None:
        raise UnsupportedError(f"simulate: no evaluator for elementwise op {op!r}")
    return _store(fn(*xs), out)


def _reduce(node: Node, args: list[np.ndarray]) -> np.ndarray:
    (x,) = args
    axes, keep = tuple(node.attrs["axes"]), bool(node.attrs.get("keepdims", False))
    dt = node.inputs[0].dtype
    if node.op in ("argmax", "argmin"):
        fn = np.argmax if node.op == "argmax" else np.argmin
        return fn(x, axis=axes[0], keepdims=keep).astype(np.int64)
    if node.op in ("max", "min"):
        fn = np.max if node.op == "max" else np.min
        return _store(fn(x, axis=axes, keepdims=keep), node.output.dtype)
    fn = np.sum if node.op == "sum" else np.prod
    acc = _compute(dt) if ir.is_float(dt) else to_numpy(dt)
    if dt == "bool":
        acc = np.dtype(np.int64)
    return _store(fn(x, axis=axes, keepdims=keep, dtype=acc), node.output.dtype)


def _slice(x: np.ndarray, attrs: dict) -> np.ndarray:
    index = []
    for start, step, size in zip(attrs["starts"], attrs["steps"], attrs["shape"], strict=True):
        if size == 0:
            index.append(slice(0, 0))
            continue
        stop = start + step * size
        index.append(slice(start, None if stop < 0 else stop, step))
    return x[tuple(index)]


def _iota(attrs: dict) -> np.ndarray:
    shape, axis = tuple(attrs["shape"]), attrs["axis"]
    ramp = np.arange(shape[axis]).reshape([-1 if i == axis else 1 for i in range(len(shape))])
    return _store(np.broadcast_to(ramp, shape), attrs["dtype"])


def _matmul(node: Node, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    dt = node.output.dtype
    if ir.is_low_precision(dt):
        a, b = a.astype(np.float32), b.astype(np.float32)
    return _store(np.matmul(a, b), dt)


def evaluate(node: Node, args: list[np.ndarray]) -> np.ndarray:
    """The output of ``node`` given its input arrays."""
    op, attrs = node.op, node.attrs
    kind = node.kind
    if kind == "elementwise":
        return _elementwise(node, args)
    if kind == "reduce":
        return _reduce(node, args)
    if op == "reshape":
        return args[0].reshape(attrs["shape"])
    if op == "transpose":
        return np.transpose(args[0], attrs["perm"])
    if op == "broadcast_to":
        return np.broadcast_to(args[0], attrs["shape"])
    if op == "slice":
        return _slice(args[0], attrs)
    if op == "concat":
        return np.concatenate(args, axis=attrs["axis"])
    if op == "take":
        x, idx = args
        n = x.shape[attrs["axis"]]
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise ShapeError(f"take at {node.loc}: index out of [0, {n}) on axis {attrs['axis']}")
        return np.take(x, idx, axis=attrs["axis"])
    if op == "full":
        return _store(np.full(attrs["shape"], attrs["value"]), attrs["dtype"])
    if op == "iota":
        return _iota(attrs)
    if op == "constant":
        data = np.array(attrs["data"], dtype=to_numpy(attrs["dtype"]))
        return _store(data.reshape(attrs["shape"]), attrs["dtype"])
    if op == "matmul":
        return _matmul(node, *args)
    if op == "alias":
        return args[0]
    if kind in ("catalog", "fallback"):
        from .model_ops import evaluate_torch

        dt = node.output.dtype
        ts = [_to_compute_tensor(a, v.dtype) for a, v in zip(args, node.inputs, strict=True)]
        out = evaluate_torch(node, ts)
        return _store(out.detach().float().numpy() if out.dtype == torch.bfloat16 else out, dt)
    raise UnsupportedError(f"simulate: no evaluator for op {op!r}")


def _to_compute_tensor(a: np.ndarray, dtype: str) -> torch.Tensor:
    """Model-level ops run with torch on the CPU, floats in float32 (float64 stays float64):
    the reference the kernels are checked against, rounded to the output dtype by the caller."""
    t = torch.from_numpy(np.array(a, order="C"))
    return t.float() if ir.is_low_precision(dtype) else t


def _input(x: Any, v: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        x = (t.float() if t.dtype == torch.bfloat16 else t).numpy()
    a = np.asarray(x)
    if a.shape != v.shape:
        raise ShapeError(f"simulate: input {v!r} got an array of shape {a.shape}")
    want = to_numpy(v.dtype)
    if a.dtype != want:
        raise DTypeError(
            f"simulate: input {v!r} got dtype {a.dtype}, expected {want}"
            + (" (bfloat16 data as float32)" if v.dtype == "bfloat16" else "")
        )
    return round_bf16(a) if v.dtype == "bfloat16" else a


def run(
    graph: Graph, inputs: Sequence[np.ndarray], weights: dict[str, Any] | None = None
) -> list[np.ndarray]:
    """Evaluate ``graph`` on ``inputs`` (NumPy arrays, bfloat16 ones as float32; torch tensors
    are converted), returning one new NumPy array per graph output. ``weights`` holds the
    tensors of the graph's ``weight`` nodes, by name (compiled models)."""
    if len(inputs) != len(graph.inputs):
        raise ShapeError(
            f"simulate: graph {graph.name} takes {len(graph.inputs)} inputs, got {len(inputs)}"
        )
    env: dict[int, np.ndarray] = {}
    for v, x in zip(graph.inputs, inputs, strict=True):
        env[id(v)] = _input(x, v)
    with np.errstate(all="ignore"):  # inf/NaN results are values here, as on the GPU
        for node in graph.nodes:
            if node.op == "weight":
                if weights is None or node.attrs["name"] not in weights:
                    raise ShapeError(f"simulate: no tensor for weight {node.attrs['name']!r}")
                env[id(node.output)] = _input(weights[node.attrs["name"]], node.output)
                continue
            out = evaluate(node, [env[id(v)] for v in node.inputs])
            if out.shape != node.output.shape:  # an evaluator bug, not a user error
                raise AssertionError(f"simulate {node.op}: shape {out.shape} != {node.output!r}")
            env[id(node.output)] = out
    return [np.array(env[id(v)], copy=True) for v in graph.outputs]
