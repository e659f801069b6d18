"""``kf.elementwise`` and ``kf.rowwise``: expression ops as dispatchable, differentiable ops.

Each definition becomes a catalog-style op named ``expr.<name>`` with ``triton``, ``cuda`` and
``torch`` implementations registered in :mod:`kernforge.dispatch`, so ``kf.backend(...)``,
fallback and ``KERNFORGE_DISABLE_FALLBACK`` work as for every other op. Kernel backends run
through two ``torch.library`` custom ops (``kernforge::expr_fwd``/``expr_bwd``, keyed by the
op's name) with fake implementations, so ``torch.compile`` traces calls without graph breaks.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .. import checks
from ..dispatch import dispatch, register_impl
from ..errors import ArgumentError, ShapeError
from ..kernels.common import MAX_ROW, TRITON_DTYPES, new_output, op_call, triton_reason
from . import evaluate, layout
from .program import DY, N, Program
from .spec import ExprSpec, elementwise_spec, rowwise_spec

_SPECS: dict[str, ExprSpec] = {}  # by op name
_OPS: dict[tuple[str, str], ExprOp] = {}  # by (definition, name)
_lock = threading.Lock()


def _out_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    dt = tensors[0].dtype
    for t in tensors[1:]:
        dt = torch.promote_types(dt, t.dtype)
    return dt


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _shape(spec: ExprSpec, tensors: Sequence[torch.Tensor]) -> tuple[int, ...]:
    return tuple(torch.broadcast_shapes(*(t.shape for t in tensors)))


def _out_shape(spec: ExprSpec, shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape[:-1] if spec.forward.output_per_row(0) else shape


def _param_values(prog: Program, params: Mapping[str, float], shape: tuple[int, ...]) -> list:
    return [float(shape[-1]) if p == N else float(params[p]) for p in prog.params]


def _launcher(backend: str):
    if backend == "cuda":
        from . import cuda as gen
    else:
        from . import triton as gen
    return gen.launch


def _kernel_forward(spec: ExprSpec, backend: str, tensors: list[torch.Tensor],
                    params: Mapping[str, float]) -> torch.Tensor:  # fmt: skip
    shape = _shape(spec, tensors)
    prog = spec.forward
    named = dict(zip(spec.inputs, tensors, strict=True))
    out = new_output(_out_shape(spec, shape), _out_dtype(tensors), tensors[0].device)
    if out.numel() == 0:
        return out
    lay, views = layout.plan([named[x] for x in prog.operands], shape, spec.rowwise)
    _launcher(backend)(
        prog, lay, views, [], [out], _param_values(prog, params, shape), spec.rowwise
    )
    return out


def _kernel_backward(
    spec: ExprSpec,
    backend: str,
    dy: torch.Tensor,
    tensors: list[torch.Tensor],
    params: Mapping[str, float],
    needs: tuple[bool, ...],
) -> list[torch.Tensor]:
    shape = _shape(spec, tensors)
    prog = spec.backward_program(needs)
    named: dict[str, torch.Tensor] = dict(zip(spec.inputs, tensors, strict=True))
    rows: list[torch.Tensor] = []
    if DY in prog.row_operands:
        rows = [dy.expand(shape[:-1]).contiguous().reshape(-1)]
    else:
        named[DY] = dy
    wanted = [t for t, need in zip(tensors, needs, strict=True) if need]
    dev = tensors[0].device
    bufs = []
    for t in wanted:
        direct = tuple(t.shape) == shape
        # A broadcast input gets a full-size fp32 gradient first, summed down below.
        bufs.append(new_output(shape, t.dtype if direct else torch.float32, dev))
    if bufs and bufs[0].numel():
        lay, views = layout.plan([named[x] for x in prog.operands], shape, spec.rowwise)
        _launcher(backend)(prog, lay, views, rows, bufs, _param_values(prog, params, shape),
                           spec.rowwise)  # fmt: skip
    return [_reduce_to(b, t) for b, t in zip(bufs, wanted, strict=True)]


def _reduce_to(grad: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``grad`` (of the broadcast shape) summed down to ``t``'s shape, in ``t``'s dtype."""
    if tuple(grad.shape) != tuple(t.shape):
        grad = grad.sum_to_size(t.shape)
    return grad.to(t.dtype)


def _fresh(v: torch.Tensor, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """``v`` as a new contiguous tensor that aliases none of ``inputs``."""
    v = v.contiguous()
    ptr = v.untyped_storage().data_ptr()
    if any(t.untyped_storage().data_ptr() == ptr for t in inputs):
        v = v.clone()
    return v


def _torch_forward(spec: ExprSpec, tensors: list[torch.Tensor],
                   params: Mapping[str, float]) -> torch.Tensor:  # fmt: skip
    shape = _shape(spec, tensors)
    dtype = _out_dtype(tensors)
    named = dict(zip(spec.inputs, tensors, strict=True))
    (out,) = evaluate.run(spec.forward, named, params, shape, _compute_dtype(dtype))
    return _fresh(out.to(dtype), tensors)


def _torch_backward(
    spec: ExprSpec,
    dy: torch.Tensor,
    tensors: list[torch.Tensor],
    params: Mapping[str, float],
    needs: tuple[bool, ...],
) -> list[torch.Tensor]:
    shape = _shape(spec, tensors)
    prog = spec.backward_program(needs)
    named = dict(zip(spec.inputs, tensors, strict=True))
    named[DY] = dy
    dtype = _compute_dtype(_out_dtype(tensors))
    outs = evaluate.run(prog, named, params, shape, dtype)
    wanted = [t for t, need in zip(tensors, needs, strict=True) if need]
    return [_fresh(_reduce_to(g, t), tensors) for g, t in zip(outs, wanted, strict=True)]


@torch.library.custom_op("kernforge::expr_fwd", mutates_args=())
def expr_fwd(
    name: str, backend: str, tensors: list[torch.Tensor], params: list[float]
) -> torch.Tensor:
    """Forward of expression op ``name`` on a kernel backend ("triton" or "cuda")."""
    spec = _SPECS[name]
    return _kernel_forward(spec, backend, tensors, dict(zip(spec.params, params, strict=True)))


@expr_fwd.register_fake
def _(name, backend, tensors, params):
    spec = _SPECS[name]
    shape = _out_shape(spec, _shape(spec, tensors))
    return torch.empty(shape, dtype=_out_dtype(tensors), device=tensors[0].device)


@torch.library.custom_op("kernforge::expr_bwd", mutates_args=())
def expr_bwd(
    name: str,
    backend: str,
    dy: torch.Tensor,
    tensors: list[torch.Tensor],
    params: list[float],
    needs: list[bool],
) -> list[torch.Tensor]:
    """Gradients of expression op ``name`` for the inputs flagged in ``needs``."""
    spec = _SPECS[name]
    pmap = dict(zip(spec.params, params, strict=True))
    return _kernel_backward(spec, backend, dy, tensors, pmap, tuple(needs))


@expr_bwd.register_fake
def _(name, backend, dy, tensors, params, needs):
    return [torch.empty(t.shape, dtype=t.dtype, device=t.device)
            for t, need in zip(tensors, needs, strict=True) if need]  # fmt: skip


class ExprFunction(torch.autograd.Function):
    """Autograd for expression ops: the backward runs the gradient program on the same
    backend, recomputing the forward's values from the saved inputs."""

    @staticmethod
    def forward(ctx, name, backend, params, *tensors):
        ctx.save_for_backward(*tensors)
        ctx.name, ctx.backend, ctx.params = name, backend, params
        spec = _SPECS[name]
        if backend == "torch":
            return _torch_forward(spec, list(tensors), dict(zip(spec.params, params, strict=True)))
        return op_call(expr_fwd, name, backend, list(tensors), list(params))

    @staticmethod
    def backward(ctx, dy):
        tensors = list(ctx.saved_tensors)
        needs = tuple(bool(n) for n in ctx.needs_input_grad[3:])
        none = (None, None, None)
        if not any(needs):
            return (*none, *(None for _ in tensors))
        spec = _SPECS[ctx.name]
        if ctx.backend == "torch":
            pmap = dict(zip(spec.params, ctx.params, strict=True))
            grads = _torch_backward(spec, dy, tensors, pmap, needs)
        else:
            grads = op_call(expr_bwd, ctx.name, ctx.backend, dy, tensors, list(ctx.params),
                            list(needs))  # fmt: skip
        it = iter(grads)
        return (*none, *(next(it) if n else None for n in needs))


class ExprOp:
    """An expression op: call it like a function of its inputs (and parameters)."""

    def __init__(self, spec: ExprSpec) -> None:
        self.spec = spec
        self.name = f"expr.{spec.name}"
        self._op = _register(self)

    @property
    def inputs(self) -> tuple[str, ...]:
        """Input tensor names, in call order."""
        return self.spec.inputs

    @property
    def params(self) -> dict[str, float | None]:
        """Scalar parameters and their defaults (None: required)."""
        return dict(self.spec.defaults)

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Run the op on the backend dispatch picks (see :mod:`kernforge.dispatch`)."""
        return self._op(*args, **kwargs)

    def expression(self, which: str = "forward") -> list[str]:
        """The simplified expressions (``"forward"`` or ``"backward"``, every input's
        gradient) as text, one per output, reductions listed first as ``name = kind(expr)``."""
        if which == "forward":
            prog = self.spec.forward
        elif which == "backward":
            prog = self.spec.backward_program(tuple(True for _ in self.inputs))
        else:
            raise ArgumentError(f"which={which!r}; use 'forward' or 'backward'")
        lines = [f"{r.name} = row{r.kind}({r.expr})" for r in prog.reductions]
        return lines + [str(o) for o in prog.outputs]

    def triton_source(self, backward: bool = False) -> str:
        """The generated Triton module (forward, or the backward of every input)."""
        from . import triton as gen

        return gen.source(self._program(backward))

    def cuda_source(self, backward: bool = False, dtype: torch.dtype = torch.float32,
                    rank: int = 1) -> str:  # fmt: skip
        """The generated CUDA C++ source for inputs of ``dtype`` with ``rank`` outer
        dimensions (see :mod:`kernforge.expr.layout`)."""
        from . import cuda as gen

        prog = self._program(backward)
        return gen.source(prog, rank, self._dtypes(prog, dtype, backward), self.spec.rowwise)

    def compile_cuda(self, arch: str | None = None, backward: bool = False,
                     dtype: torch.dtype = torch.float32, rank: int = 1):  # fmt: skip
        """Compile the generated CUDA source with NVRTC (no GPU needed); returns the
        kernforge.cuda Kernel. Raises ``CompileError`` with the log if it does not compile."""
        from . import cuda as gen

        prog = self._program(backward)
        dtypes = self._dtypes(prog, dtype, backward)
        return gen.compile_program(prog, rank, dtypes, self.spec.rowwise, arch=arch)

    def _program(self, backward: bool) -> Program:
        if backward:
            return self.spec.backward_program(tuple(True for _ in self.inputs))
        return self.spec.forward

    def _dtypes(self, prog: Program, dtype: torch.dtype, backward: bool) -> list[torch.dtype]:
        n = len(prog.operands) + len(prog.row_operands) + len(prog.outputs)
        return [dtype] * n

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self.spec.defaults)
        return (
            f"<kernforge {self.spec.kind} op {self.name!r}: ({', '.join(self.inputs)}"
            f"{'; ' + params if params else ''}) -> {' ; '.join(self.expression())}>"
        )


def _check_call(op: ExprOp, bound: dict[str, Any]) -> None:
    spec = op.spec
    name = op.name
    tensors = []
    for x in spec.inputs:
        t = bound[x]
        if not isinstance(t, torch.Tensor):
            raise ArgumentError(
                f"{name}: input {x!r} must be a torch.Tensor, got {type(t).__name__} (scalars "
                "go in params=)"
            )
        checks.floating(name, x, t)
        tensors.append(t)
    checks.same_device(name, **dict(zip(spec.inputs, tensors, strict=True)))
    try:
        shape = torch.broadcast_shapes(*(t.shape for t in tensors))
    except RuntimeError as exc:
        shapes = ", ".join(f"{x}={tuple(t.shape)}" for x, t in zip(spec.inputs, tensors,
                                                                    strict=True))  # fmt: skip
        raise ShapeError(
            f"{name}: input shapes do not broadcast together ({shapes}); inputs must be "
            "broadcastable as in torch"
        ) from exc
    if spec.rowwise and len(shape) == 0:
        raise ShapeError(f"{name}: rowwise ops reduce along the last dimension; inputs are 0-D")
    if spec.rowwise and shape[-1] == 0:
        raise ShapeError(
            f"{name}: the rows have 0 features (shape {tuple(shape)}); there is nothing to reduce"
        )
    for p, _ in spec.defaults:
        v = bound[p]
        if v is None:
            raise ArgumentError(f"{name}: parameter {p!r} is required (it has no default)")
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ArgumentError(f"{name}: parameter {p!r} must be a number, got {v!r}")


def _triton_supports(op: ExprOp):
    def supports(**bound):
        tensors = [bound[x] for x in op.inputs]
        reason = triton_reason(*tensors)
        if reason is None and op.spec.rowwise:
            n = torch.broadcast_shapes(*(t.shape for t in tensors))[-1]
            if n > MAX_ROW:
                reason = f"rows of {n} exceed the single-pass rowwise limit of {MAX_ROW}"
        return reason

    return supports


_cuda_reason: list[str | None] = []


def _cuda_available() -> str | None:
    """``kernforge.cuda.available()``, asked once, eagerly (when the first op is defined):
    torch.compile cannot trace NVRTC's version query, and the answer does not change."""
    if not _cuda_reason:
        from .. import cuda as kcuda

        _cuda_reason.append(kcuda.available())
    return _cuda_reason[0]


def _cuda_supports(op: ExprOp):
    def supports(**bound):
        reason = _cuda_available()
        if reason is not None:
            return reason
        for x in op.inputs:
            t = bound[x]
            if t.device.type != "cuda":
                return f"input {x!r} is on {t.device}, not a CUDA device"
            if t.dtype not in TRITON_DTYPES:
                return f"dtype {t.dtype} (CUDA expression kernels take float16, bfloat16, float32)"
        return None

    return supports


def _register(op: ExprOp):
    spec = op.spec
    P = inspect.Parameter
    params = [P(x, P.POSITIONAL_OR_KEYWORD) for x in spec.inputs]
    required = [(p, d) for p, d in spec.defaults if d is None]
    optional = [(p, d) for p, d in spec.defaults if d is not None]
    params += [P(p, P.POSITIONAL_OR_KEYWORD) for p, _ in required]
    params += [P(p, P.POSITIONAL_OR_KEYWORD, default=d) for p, d in optional]

    def check(**bound):
        _check_call(op, bound)

    check.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    check.__name__ = spec.name
    check.__qualname__ = spec.name
    check.__doc__ = f"Expression op {op.name}: {spec.definition}"

    def impl(backend: str):
        def run(**bound):
            tensors = [bound[x] for x in spec.inputs]
            pvals = tuple(float(bound[p]) for p in spec.params)
            return ExprFunction.apply(spec.name, backend, pvals, *tensors)

        return run

    _cuda_available()  # now, outside any torch.compile trace
    register_impl(op.name, "triton", supports=_triton_supports(op))(impl("triton"))
    register_impl(op.name, "cuda", supports=_cuda_supports(op))(impl("cuda"))
    register_impl(op.name, "torch")(impl("torch"))
    return dispatch(op.name)(check)


def _build(spec: ExprSpec) -> ExprOp:
    with _lock:
        existing = _OPS.get((spec.definition, spec.name))
        if existing is not None:
            return existing
        if spec.name in _SPECS:
            raise ArgumentError(
                f"an expression op named {spec.name!r} already exists with another definition "
                f"({_SPECS[spec.name].definition}); choose another name"
            )
        _SPECS[spec.name] = spec
        op = ExprOp(spec)
        _OPS[(spec.definition, spec.name)] = op
        return op


def elementwise(
    expr: str,
    *,
    inputs: Sequence[str] | None = None,
    params: Mapping[str, float | None] | Sequence[str] | None = None,
    grad: Mapping[str, str] | None = None,
    name: str | None = None,
) -> ExprOp:
    """An elementwise op from a C-like expression, e.g. ``elementwise("silu(x) * y")``.

    - ``inputs``: tensor names in call order (default: the expression's free names, in order
      of appearance, less the params). Inputs broadcast as in torch; float16, bfloat16 and
      float32 run on the kernels (math in fp32), float64 on torch; the output has the promoted
      dtype.
    - ``params``: scalar parameters, ``{"alpha": 0.1}`` (defaults; None: required) or a list of
      names; passed per call as keywords (``op(x, alpha=0.2)``), not compiled in.
    - ``grad``: ``{input: expression}`` overriding the derived gradient. The expression may use
      the inputs, params, ``dy`` (the output gradient) and ``out`` (the forward value); one that
      does not use ``dy`` is taken as the local derivative and multiplied by ``dy``.
    - ``name``: the op's name (``expr.<name>`` in dispatch); default from a hash.

    The same definition returns the same op. Raises ``ExpressionError`` (an ``ArgumentError``)
    naming the position of a syntax error, an unknown function or an unknown variable.
    """
    spec = elementwise_spec(expr, inputs, params, grad, name)
    return _build(spec)


def rowwise(
    expr: str | None = None,
    *,
    map: str | Sequence[str] | None = None,  # noqa: A002 - the API's word
    reduce: str | Sequence[str] = "sum",
    finalize: str = "acc",
    inputs: Sequence[str] | None = None,
    params: Mapping[str, float | None] | Sequence[str] | None = None,
    grad: Mapping[str, str] | None = None,
    name: str | None = None,
) -> ExprOp:
    """A per-row op over the last dimension, from one expression with row reductions
    (``rowwise("x * rsqrt(rowmean(x * x) + eps) * w", params={"eps": 1e-6})``) or from
    ``map``/``reduce``/``finalize``: ``acc = reduce(map)`` over each row, then ``finalize``
    (which may use ``acc``, the inputs, params and ``n``, the row length). Several maps give
    ``acc0``, ``acc1``...; map i may use the accumulators before it.

    The output is [..., n] when the final expression uses an input, else one value per row
    [...]. Inputs broadcast to a common [..., n] shape (a weight [n] or a per-row [..., 1]
    tensor is fine). Reductions: sum, mean, max, min (the gradient of max/min is shared
    evenly among ties, as torch.amax). Gradients are derived by differentiating through the
    reductions unless ``grad`` gives them (expressions that may use ``dy``, ``out``, the
    accumulators and row reductions of their own). Other arguments as :func:`elementwise`.
    """
    spec = rowwise_spec(expr, map, reduce, finalize, inputs, params, grad, name)
    return _build(spec)


def reference(op: ExprOp, *tensors: torch.Tensor, **params: float) -> torch.Tensor:
    """The op's forward evaluated with torch ops on the inputs as given (no custom autograd):
    with float64 inputs, the reference that tests compare against, differentiable by torch."""
    spec = op.spec
    values = {p: params.get(p, d) for p, d in spec.defaults}
    shape = _shape(spec, tensors)
    dtype = _compute_dtype(_out_dtype(tensors))
    named = dict(zip(spec.inputs, tensors, strict=True))
    (out,) = evaluate.run(spec.forward, named, values, shape, dtype)  # type: ignore[arg-type]
    return out
