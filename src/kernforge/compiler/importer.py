"""torch.export -> kernforge IR.

:func:`import_model` exports a module with ``torch.export`` (decomposed to ATen with an empty
table, so ``conv2d``, ``linear``, ``layer_norm``, ``scaled_dot_product_attention`` stay whole),
then maps each ATen call onto IR nodes: elementwise arithmetic and math onto the NumPy-level IR
ops (so kf.jit's fusion and codegen fuse them), the ops of :func:`supported_ops` onto catalog
nodes, parameters and buffers onto ``weight`` nodes, and everything else onto ``fallback``
nodes (a torch call with its non-tensor arguments as JSON data), or an UnsupportedError naming
the op when ``KERNFORGE_DISABLE_FALLBACK=1``.

Type promotion is made explicit: every input of an elementwise node is cast to the dtype the
node computes in (taken from the exported graph's metadata).
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import config
from ..errors import CompileError, UnsupportedError
from ..ir import Graph, Value

Handler = Callable[["_Importer", Any, list, dict], Any]
_HANDLERS: dict[str, Handler] = {}
#: What each supported ATen op becomes, for :func:`supported_ops`.
_TABLE: dict[str, str] = {}


def _on(*targets: str, becomes: str) -> Callable[[Handler], Handler]:
    def deco(fn: Handler) -> Handler:
        for t in targets:
            _HANDLERS[t] = fn
            _TABLE[t] = becomes
        return fn

    return deco


def supported_ops() -> dict[str, str]:
    """The ATen ops the importer maps onto kernforge IR, and what each becomes (catalog op,
    fused elementwise/reduction IR, view). Any other op runs as a torch fallback partition."""
    return dict(sorted(_TABLE.items()))


def ir_dtype(dt: torch.dtype) -> str:
    """The IR name of a torch dtype."""
    name = str(dt).removeprefix("torch.")
    if name == "bool":
        return "bool"
    return name


@dataclass
class Imported:
    """An imported model: the IR graph, the exported weights by program name (already in the
    compile dtype), the source state dict recipes refer to, and notes for describe()."""

    graph: Graph
    weights: dict[str, torch.Tensor]
    source: dict[str, torch.Tensor]
    output_tree: Any
    notes: list[str] = field(default_factory=list)
    ops_at_import: int = 0


def _export(model: torch.nn.Module, args: tuple, kwargs: dict):
    try:
        with torch.no_grad():
            ep = torch.export.export(model, args, kwargs or None, strict=False)
    except Exception as e:  # torch.export raises many types; the user needs one message
        raise CompileError(
            f"compile_model: torch.export could not trace {type(model).__name__}: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. The model must "
            "be traceable by torch.export (no data-dependent Python control flow); see "
            "https://pytorch.org/docs/stable/export.html"
        ) from e
    notes = []
    try:
        ep = ep.run_decompositions({})
    except Exception as e:  # some HF models fail here; the training IR still maps
        notes.append(f"run_decompositions failed ({type(e).__name__}); imported the export as is")
    return ep, notes


def import_model(
    model: torch.nn.Module,
    example_inputs: Sequence[Any],
    dtype: torch.dtype | None = None,
    example_kwargs: dict | None = None,
) -> Imported:
    """Export ``model`` on ``example_inputs`` and map it onto the IR (see the module docs).

    With ``dtype`` (e.g. torch.bfloat16) the model is exported in that dtype (a copy of it),
    its floating weights get ``("cast", name, dtype)`` recipes, and floating inputs are cast at
    the graph's entry.
    """
    if not isinstance(model, torch.nn.Module):
        raise CompileError(f"compile_model takes a torch.nn.Module, got {type(model).__name__}")
    args = tuple(example_inputs)
    kwargs = dict(example_kwargs or {})
    source = {k: v.detach() for k, v in model.state_dict(keep_vars=True).items()}
    if dtype is not None:
        model = copy.deepcopy(model).to(dtype)
        args = tuple(
            a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in args
        )
        kwargs = {
            k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in kwargs.items()
        }
    ep, notes = _export(model.eval(), args, kwargs)
    if ep.graph_signature.buffers_to_mutate or getattr(
        ep.graph_signature, "user_inputs_to_mutate", None
    ):
        raise UnsupportedError(
            "compile_model: the model mutates buffers or inputs in place "
            f"({sorted(ep.graph_signature.buffers_to_mutate)}); pass state such as a KV cache "
            "as inputs and return its new value (out-of-place index_copy/index_put)"
        )
    imp = _Importer(ep, source, dtype, example_inputs, notes)
    return imp.run()


class _Importer:
    def __init__(self, ep, source, dtype, user_examples, notes) -> None:
        self.ep = ep
        self.dtype = dtype
        self.graph = Graph("model")
        self.env: dict[str, Any] = {}
        self.weights: dict[str, torch.Tensor] = {}
        self.source = dict(source)
        self.user_examples = list(user_examples)
        self.notes = notes
        self.ops = 0

    # -- helpers ---------------------------------------------------------------------------

    def meta(self, node) -> Any:
        return node.meta.get("val")

    def full(self, value, dt: str) -> Value:
        if isinstance(value, bool) and dt != "bool":
            value = int(value)
        return self.graph.add("full", (), shape=(), value=value, dtype=dt)

    def cast(self, v: Value, dt: str) -> Value:
        return v if v.dtype == dt else self.graph.add("cast", [v], dtype=dt)

    def val(self, x: Any, dt: str | None = None) -> Value:
        """An argument as an IR value (python scalars become 0-d ``full``), cast to ``dt``."""
        if isinstance(x, Value):
            return x if dt is None else self.cast(x, dt)
        if dt is None:
            dt = "bool" if isinstance(x, bool) else "int64" if isinstance(x, int) else "float32"
        return self.full(x, dt)

    def arg(self, a: Any) -> Any:
        """An FX argument with nodes replaced by what they became."""
        if isinstance(a, torch.fx.Node):
            return self.env[a.name]
        if isinstance(a, list | tuple):
            return type(a)(self.arg(x) for x in a)
        return a

    # -- the walk --------------------------------------------------------------------------

    def run(self) -> Imported:
        sig = self.ep.graph_signature
        kinds = {s.arg.name: s for s in sig.input_specs if hasattr(s.arg, "name")}
        state = dict(self.ep.state_dict)
        state.update(self.ep.constants)
        user_i = 0
        for node in self.ep.graph.nodes:
            if node.op == "placeholder":
                spec = kinds.get(node.name)
                if spec is not None and spec.kind.name != "USER_INPUT":
                    self.env[node.name] = self.weight(spec.target, state[spec.target])
                    continue
                m = self.meta(node)
                if not isinstance(m, torch.Tensor):
                    raise UnsupportedError(
                        f"compile_model: input {node.name} is {type(m).__name__}; only tensor "
                        "inputs are supported (pass other values through a wrapper module)"
                    )
                ex = self.user_examples[user_i] if user_i < len(self.user_examples) else None
                user_i += 1
                given = ir_dtype(ex.dtype) if isinstance(ex, torch.Tensor) else ir_dtype(m.dtype)
                v = self.graph.input(tuple(m.shape), given, node.name)
                self.env[node.name] = self.cast(v, ir_dtype(m.dtype))
            elif node.op == "call_function":
                self.call(node)
            elif node.op == "output":
                outs = node.args[0]
                flat = [self.env[o.name] for o in outs if isinstance(o, torch.fx.Node)]
                self.graph.set_outputs(flat)
            elif node.op == "get_attr":
                t = getattr(self.ep.graph_module, node.target)
                if isinstance(t, torch.Tensor):
                    self.env[node.name] = self.weight(node.target, t)
        self.graph.verify()
        return Imported(self.graph, self.weights, self.source, None, self.notes, self.ops)

    def weight(self, name: str, t: torch.Tensor) -> Value:
        t = t.detach()
        recipe = None
        src = self.source.get(name)
        if src is None:
            self.source[name] = t  # a lifted constant: its exported value is its source
        elif src.dtype != t.dtype:
            recipe = ("cast", name, ir_dtype(t.dtype))
        pname = name if recipe is None else f"{name}@{ir_dtype(t.dtype)}"
        self.weights[pname] = t
        return self.graph.add(
            "weight", (), shape=tuple(t.shape), dtype=ir_dtype(t.dtype), name=pname, recipe=recipe
        )

    def call(self, node) -> None:
        target = str(node.target)
        if node.target is operator.getitem:
            base, i = self.env[node.args[0].name], node.args[1]
            self.env[node.name] = base[i] if isinstance(base, list | tuple) else base
            return
        handler = _HANDLERS.get(target)
        args = [self.arg(a) for a in node.args]
        kwargs = {k: self.arg(v) for k, v in node.kwargs.items()}
        out = None
        if target not in _SKIP:
            self.ops += 1
        if handler is not None:
            out = handler(self, node, args, kwargs)
        if out is NotImplemented or handler is None:
            if target in _SKIP:
                return
            out = self.fallback(node, target, args, kwargs)
        self.env[node.name] = out

    def fallback(self, node, target: str, args, kwargs) -> Any:
        if config.settings.disable_fallback:
            raise UnsupportedError(
                f"compile_model: op {target} (node {node.name}) has no kernforge lowering and "
                "KERNFORGE_DISABLE_FALLBACK=1 forbids running it with torch; unset it to run "
                "this op as a torch fallback partition"
            )
        m = self.meta(node)
        tensors: list[Value] = []
        enc_args = encode_arg(args, tensors)
        enc_kwargs = encode_arg(kwargs, tensors)
        outs = m if isinstance(m, list | tuple) else [m]
        made = []
        for i, o in enumerate(outs):
            if not isinstance(o, torch.Tensor):
                made.append(None)
                continue
            made.append(
                self.graph.add(
                    "fallback",
                    tensors,
                    target=target,
                    args=enc_args,
                    kwargs=enc_kwargs,
                    index=i if isinstance(m, list | tuple) else None,
                    shape=tuple(o.shape),
                    dtype=ir_dtype(o.dtype),
                )
            )
        return made if isinstance(m, list | tuple) else made[0]


#: Ops with no value (shape asserts): dropped.
_SKIP = (
    "aten._assert_tensor_metadata.default",
    "aten._assert_scalar.default",
    "aten.sym_constrain_range_for_size.default",
)


_TAGGED = (
    (torch.dtype, "__dtype__"),
    (torch.device, "__device__"),
    (torch.layout, "__layout__"),
    (torch.memory_format, "__memory_format__"),
)


def encode_arg(x: Any, tensors: list[Value]) -> Any:
    """A fallback argument as hashable, JSON-able data: a tensor becomes ``("__input__", i)``
    (its position among the node's inputs), a dtype ``("__dtype__", name)``, and so on
    (``runtime.model_ops.decode_arg`` reverses it)."""
    if isinstance(x, Value):
        tensors.append(x)
        return ("__input__", len(tensors) - 1)
    for kind, tag in _TAGGED:
        if isinstance(x, kind):
            return (tag, str(x).removeprefix("torch."))
    if isinstance(x, list | tuple):
        return tuple(encode_arg(v, tensors) for v in x)
    if isinstance(x, dict):
        return ("__dict__", tuple((k, encode_arg(v, tensors)) for k, v in x.items()))
    if x is None or isinstance(x, bool | int | float | str):
        return x
    raise UnsupportedError(f"compile_model: cannot record fallback argument {x!r}")


# == handlers =================================================================================


def _out_dt(imp: _Importer, node) -> str:
    return ir_dtype(imp.meta(node).dtype)


def _promote(*xs: Any) -> str:
    """torch's result dtype of tensors (IR values) and python scalars."""
    probes = []
    for x in xs:
        if isinstance(x, Value):
            dt = getattr(torch, x.dtype)
            probes.append(torch.empty((1,) if x.shape else (), dtype=dt))
        elif x is not None:
            probes.append(x)
    r = probes[0] if len(probes) == 1 else None
    if r is None:
        r = torch.result_type(probes[0], probes[1])
        for p in probes[2:]:
            r = torch.promote_types(r, p.dtype if isinstance(p, torch.Tensor) else r)
        return ir_dtype(r)
    return ir_dtype(r.dtype if isinstance(r, torch.Tensor) else torch.tensor(r).dtype)


def _binary(op: str) -> Handler:
    def h(imp: _Importer, node, args, kwargs):
        a, b = args[0], args[1]
        dt = _out_dt(imp, node)
        alpha = kwargs.get("alpha", args[2] if len(args) > 2 else 1)
        cdt = dt if op not in ("eq", "ne", "lt", "le", "gt", "ge") else _promote(a, b)
        if op == "logical_and" or op == "logical_or":
            cdt = "bool"
        va, vb = imp.val(a, cdt), imp.val(b, cdt)
        if alpha != 1:
            vb = imp.graph.add("mul", [vb, imp.full(alpha, cdt)])
        return imp.graph.add(op, [va, vb])

    return h


for _aten, _op in (
    ("add", "add"), ("sub", "sub"), ("mul", "mul"), ("maximum", "maximum"),
    ("minimum", "minimum"), ("eq", "eq"), ("ne", "ne"), ("lt", "lt"), ("le", "le"),
    ("gt", "gt"), ("ge", "ge"), ("logical_and", "logical_and"), ("logical_or", "logical_or"),
):  # fmt: skip
    _on(
        f"aten.{_aten}.Tensor", f"aten.{_aten}.Scalar", f"aten.{_aten}.default",
        becomes=f"elementwise {_op}",
    )(_binary(_op))  # fmt: skip


@_on("aten.rsub.Scalar", "aten.rsub.Tensor", becomes="elementwise sub")
def _rsub(imp, node, args, kwargs):
    return _binary("sub")(imp, node, [args[1], args[0], *args[2:]], kwargs)


@_on("aten.div.Tensor", "aten.div.Scalar", "aten.div.Tensor_mode", becomes="elementwise div")
def _div(imp, node, args, kwargs):
    mode = kwargs.get("rounding_mode", args[2] if len(args) > 2 else None)
    dt = _out_dt(imp, node)
    if mode is None:
        return imp.graph.add("div", [imp.val(args[0], dt), imp.val(args[1], dt)])
    if mode == "floor":
        return imp.graph.add("floordiv", [imp.val(args[0], dt), imp.val(args[1], dt)])
    return NotImplemented


def _unary(op: str) -> Handler:
    def h(imp, node, args, kwargs):
        dt = _out_dt(imp, node)
        return imp.graph.add(op, [imp.val(args[0], dt)])

    return h


for _op in (
    "neg", "abs", "exp", "log", "log2", "log1p", "expm1", "sqrt", "rsqrt", "sin", "cos", "tanh",
    "sigmoid", "erf", "floor", "ceil", "sign",
):  # fmt: skip
    _on(f"aten.{_op}.default", becomes=f"elementwise {_op}")(_unary(_op))


@_on("aten.logical_not.default", "aten.bitwise_not.default", becomes="elementwise logical_not")
def _lnot(imp, node, args, kwargs):
    if args[0].dtype != "bool":
        return NotImplemented
    return imp.graph.add("logical_not", [args[0]])


@_on("aten.isnan.default", "aten.isinf.default", becomes="elementwise predicate")
def _pred(imp, node, args, kwargs):
    return imp.graph.add(str(node.target).split(".")[1], [args[0]])


@_on("aten.reciprocal.default", becomes="elementwise div")
def _recip(imp, node, args, kwargs):
    dt = _out_dt(imp, node)
    return imp.graph.add("div", [imp.full(1.0, dt), imp.val(args[0], dt)])


@_on("aten.pow.Tensor_Scalar", "aten.pow.Tensor_Tensor", "aten.pow.Scalar", becomes="pow")
def _pow(imp, node, args, kwargs):
    dt = _out_dt(imp, node)
    return imp.graph.add("pow", [imp.val(args[0], dt), imp.val(args[1], dt)])


@_on("aten.relu.default", "aten.relu_.default", becomes="elementwise maximum(x, 0)")
def _relu(imp, node, args, kwargs):
    x = args[0]
    return imp.graph.add("maximum", [x, imp.full(0, x.dtype)])


def silu(g: Graph, x: Value) -> Value:
    """``x * sigmoid(x)``: the form the GEMM epilogue pattern recognises."""
    return g.add("mul", [x, g.add("sigmoid", [x])])


def gelu(g: Graph, x: Value, approximate: str) -> Value:
    """GELU as IR; the tanh form is the one the GEMM epilogue pattern recognises."""
    f = lambda v: g.add("full", (), shape=(), value=v, dtype=x.dtype)  # noqa: E731
    if approximate == "tanh":
        x3 = g.add("mul", [g.add("mul", [x, x]), x])
        inner = g.add(
            "mul", [f(math.sqrt(2 / math.pi)), g.add("add", [x, g.add("mul", [f(0.044715), x3])])]
        )
        t = g.add("add", [f(1.0), g.add("tanh", [inner])])
        return g.add("mul", [g.add("mul", [f(0.5), x]), t])
    e = g.add("erf", [g.add("mul", [x, f(1 / math.sqrt(2))])])
    return g.add("mul", [g.add("mul", [f(0.5), x]), g.add("add", [f(1.0), e])])


@_on("aten.silu.default", becomes="elementwise x*sigmoid(x)")
def _silu(imp, node, args, kwargs):
    return silu(imp.graph, args[0])


@_on("aten.gelu.default", becomes="elementwise gelu (erf or tanh)")
def _gelu(imp, node, args, kwargs):
    return gelu(imp.graph, args[0], kwargs.get("approximate", args[1] if len(args) > 1 else "none"))


@_on("aten.clamp.default", "aten.clamp_min.default", "aten.clamp_max.default",
     "aten.hardtanh.default", becomes="elementwise maximum/minimum")  # fmt: skip
def _clamp(imp, node, args, kwargs):
    x = args[0]
    t = str(node.target)
    lo = hi = None
    if "clamp_min" in t:
        lo = args[1]
    elif "clamp_max" in t:
        hi = args[1]
    elif "hardtanh" in t:
        lo, hi = (args[1] if len(args) > 1 else -1.0), (args[2] if len(args) > 2 else 1.0)
    else:
        lo = args[1] if len(args) > 1 else kwargs.get("min")
        hi = args[2] if len(args) > 2 else kwargs.get("max")
    if isinstance(lo, Value) or isinstance(hi, Value):
        return NotImplemented
    if lo is not None:
        x = imp.graph.add("maximum", [x, imp.full(lo, x.dtype)])
    if hi is not None:
        x = imp.graph.add("minimum", [x, imp.full(hi, x.dtype)])
    return x


@_on("aten.where.self", "aten.where.ScalarOther", "aten.where.ScalarSelf", "aten.where.Scalar",
     becomes="elementwise where")  # fmt: skip
def _where(imp, node, args, kwargs):
    dt = _out_dt(imp, node)
    c = args[0] if args[0].dtype == "bool" else imp.cast(args[0], "bool")
    return imp.graph.add("where", [c, imp.val(args[1], dt), imp.val(args[2], dt)])


@_on("aten.masked_fill.Scalar", "aten.masked_fill.Tensor", becomes="elementwise where")
def _masked_fill(imp, node, args, kwargs):
    x, mask, value = args
    return imp.graph.add("where", [mask, imp.val(value, x.dtype), x])


@_on("aten.to.dtype", "aten._to_copy.default", "aten.to.dtype_layout", "aten.type_as.default",
     "aten.to.device", becomes="cast")  # fmt: skip
def _to(imp, node, args, kwargs):
    return imp.cast(args[0], _out_dt(imp, node))


@_on("aten.clone.default", "aten.contiguous.default", "aten.alias.default",
     "aten.detach.default", "aten.lift_fresh_copy.default", "aten.dropout.default",
     "aten.feature_dropout.default", becomes="alias (removed by the clean-up pass)")  # fmt: skip
def _alias(imp, node, args, kwargs):
    return imp.graph.add("alias", [args[0]])


# -- views ---------------------------------------------------------------------------------


@_on("aten.view.default", "aten.reshape.default", "aten._unsafe_view.default",
     "aten.flatten.using_ints", "aten.unsqueeze.default", "aten.squeeze.dim",
     "aten.squeeze.dims", "aten.squeeze.default", "aten.view_as.default",
     "aten.unflatten.int", becomes="reshape")  # fmt: skip
def _reshape(imp, node, args, kwargs):
    shape = tuple(imp.meta(node).shape)
    x = args[0]
    return x if x.shape == shape else imp.graph.add("reshape", [x], shape=shape)


@_on("aten.permute.default", becomes="transpose")
def _permute(imp, node, args, kwargs):
    x = args[0]
    perm = tuple(p % max(x.ndim, 1) for p in args[1])
    return imp.graph.add("transpose", [x], perm=perm)


@_on("aten.transpose.int", "aten.t.default", becomes="transpose")
def _transpose(imp, node, args, kwargs):
    x = args[0]
    if x.ndim < 2:
        return x
    d0, d1 = (args[1], args[2]) if len(args) > 2 else (0, 1)
    perm = list(range(x.ndim))
    d0, d1 = d0 % x.ndim, d1 % x.ndim
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return imp.graph.add("transpose", [x], perm=tuple(perm))


@_on("aten.expand.default", "aten.expand_as.default", becomes="broadcast_to")
def _expand(imp, node, args, kwargs):
    x = args[0]
    shape = tuple(imp.meta(node).shape)
    if x.shape == shape:
        return x
    if x.ndim < len(shape):
        x = imp.graph.add("reshape", [x], shape=(1,) * (len(shape) - x.ndim) + x.shape)
    return imp.graph.add("broadcast_to", [x], shape=shape)


def _slice_value(imp, x: Value, dim: int, start: int, size: int, step: int) -> Value:
    starts = [0] * x.ndim
    steps = [1] * x.ndim
    shape = list(x.shape)
    starts[dim], steps[dim], shape[dim] = start, step, size
    if size == 0:
        starts[dim] = 0
    return imp.graph.add("slice", [x], starts=tuple(starts), steps=tuple(steps), shape=tuple(shape))


@_on("aten.slice.Tensor", becomes="slice")
def _slice(imp, node, args, kwargs):
    x = args[0]
    dim = (args[1] if len(args) > 1 else 0) % x.ndim
    n = x.shape[dim]
    start = args[2] if len(args) > 2 and args[2] is not None else 0
    end = args[3] if len(args) > 3 and args[3] is not None else n
    step = args[4] if len(args) > 4 else 1
    start, end, _ = slice(start, end, step).indices(n)
    size = tuple(imp.meta(node).shape)[dim]
    if size == n and step == 1:
        return x
    return _slice_value(imp, x, dim, start, size, step)


@_on("aten.select.int", becomes="slice + reshape")
def _select(imp, node, args, kwargs):
    x, dim, index = args
    dim = dim % x.ndim
    s = _slice_value(imp, x, dim, index % x.shape[dim], 1, 1)
    return imp.graph.add("reshape", [s], shape=tuple(imp.meta(node).shape))


@_on("aten.split.Tensor", "aten.split_with_sizes.default", "aten.chunk.default",
     becomes="slices")  # fmt: skip
def _split(imp, node, args, kwargs):
    x = args[0]
    dim = (args[2] if len(args) > 2 else kwargs.get("dim", 0)) % x.ndim
    outs, start = [], 0
    for m in imp.meta(node):
        size = m.shape[dim]
        outs.append(_slice_value(imp, x, dim, start, size, 1) if size != x.shape[dim] else x)
        start += size
    return outs


@_on("aten.cat.default", becomes="concat")
def _cat(imp, node, args, kwargs):
    dt = _out_dt(imp, node)
    xs = [imp.cast(v, dt) for v in args[0] if v.size > 0 or v.ndim > 1]
    dim = (args[1] if len(args) > 1 else kwargs.get("dim", 0)) % max(xs[0].ndim, 1)
    return xs[0] if len(xs) == 1 else imp.graph.add("concat", xs, axis=dim)


@_on("aten.stack.default", becomes="reshape + concat")
def _stack(imp, node, args, kwargs):
    xs = args[0]
    dt = _out_dt(imp, node)
    dim = (args[1] if len(args) > 1 else kwargs.get("dim", 0)) % (xs[0].ndim + 1)
    parts = [
        imp.graph.add("reshape", [imp.cast(x, dt)], shape=x.shape[:dim] + (1,) + x.shape[dim:])
        for x in xs
    ]
    return parts[0] if len(parts) == 1 else imp.graph.add("concat", parts, axis=dim)


# -- reductions ----------------------------------------------------------------------------


def _axes(x: Value, dims) -> tuple[int, ...]:
    if dims is None or dims == [] or dims == ():
        return tuple(range(x.ndim))
    dims = [dims] if isinstance(dims, int) else dims
    return tuple(sorted(d % x.ndim for d in dims))


@_on("aten.mean.dim", "aten.mean.default", becomes="sum * 1/n")
def _mean(imp, node, args, kwargs):
    x = args[0]
    axes = _axes(x, args[1] if len(args) > 1 else None)
    keep = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    dt = _out_dt(imp, node)
    s = imp.graph.add("sum", [imp.cast(x, dt)], axes=axes, keepdims=keep)
    n = math.prod(x.shape[a] for a in axes)
    return imp.graph.add("mul", [s, imp.full(1.0 / max(n, 1), dt)])


@_on("aten.sum.dim_IntList", "aten.sum.default", "aten.amax.default", "aten.amin.default",
     becomes="reduction")  # fmt: skip
def _sum(imp, node, args, kwargs):
    x = args[0]
    op = {"sum": "sum", "amax": "max", "amin": "min"}[str(node.target).split(".")[1]]
    axes = _axes(x, args[1] if len(args) > 1 else None)
    keep = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    return imp.graph.add(op, [imp.cast(x, _out_dt(imp, node))], axes=axes, keepdims=keep)


# -- creation ------------------------------------------------------------------------------


@_on("aten.arange.default", "aten.arange.start", "aten.arange.start_step", becomes="iota")
def _arange(imp, node, args, kwargs):
    m = imp.meta(node)
    dt = ir_dtype(m.dtype)
    nums = [a for a in args if isinstance(a, int | float)]
    start, step = (nums[0], nums[2] if len(nums) > 2 else 1) if len(nums) > 1 else (0, 1)
    v = imp.graph.add("iota", (), shape=tuple(m.shape), axis=0, dtype=dt)
    if step != 1:
        v = imp.graph.add("mul", [v, imp.full(step, dt)])
    if start != 0:
        v = imp.graph.add("add", [v, imp.full(start, dt)])
    return v


@_on("aten.full.default", "aten.zeros.default", "aten.ones.default", "aten.scalar_tensor.default",
     "aten.zeros_like.default", "aten.ones_like.default", "aten.full_like.default",
     "aten.new_zeros.default", "aten.new_ones.default", becomes="full")  # fmt: skip
def _full(imp, node, args, kwargs):
    m = imp.meta(node)
    t = str(node.target)
    if "zeros" in t:
        value = 0
    elif "ones" in t:
        value = 1
    elif "scalar_tensor" in t:
        value = args[0]
    else:
        value = args[1]
    if isinstance(value, Value):
        return NotImplemented
    dt = ir_dtype(m.dtype)
    return imp.graph.add("full", (), shape=tuple(m.shape), value=value, dtype=dt)


# -- catalog ops ---------------------------------------------------------------------------


def _pair(x) -> tuple[int, int]:
    if isinstance(x, int):
        return (x, x)
    x = tuple(x)
    return (x[0], x[0]) if len(x) == 1 else (x[0], x[1])


@_on("aten.conv2d.default", "aten.convolution.default", becomes="catalog conv2d")
def _conv(imp, node, args, kwargs):
    x, w = args[0], args[1]
    b = args[2] if len(args) > 2 else None
    if "convolution" in str(node.target):
        stride, pad, dil, transposed, _, groups = args[3:9]
        if transposed:
            return NotImplemented
    else:
        stride = args[3] if len(args) > 3 else 1
        pad = args[4] if len(args) > 4 else 0
        dil = args[5] if len(args) > 5 else 1
        groups = args[6] if len(args) > 6 else 1
    if x.ndim != 4 or isinstance(pad, str):
        return NotImplemented
    ins = [x, w] + ([b] if b is not None else [])
    return imp.graph.add(
        "conv2d", ins, stride=_pair(stride), padding=_pair(pad), dilation=_pair(dil),
        groups=groups, layout="nchw", activation=None, has_bias=b is not None,
        has_residual=False,
    )  # fmt: skip


@_on("aten._native_batch_norm_legit_no_training.default", "aten.batch_norm.default",
     "aten.native_batch_norm.default", becomes="catalog batch_norm (folded into conv)")  # fmt: skip
def _bn(imp, node, args, kwargs):
    t = str(node.target)
    x, w, b, mean, var = args[:5]
    if "legit_no_training" in t:
        eps = args[6]
    else:
        training = args[5]
        if training:
            return NotImplemented
        eps = args[7]
    if any(p is None for p in (w, b, mean, var)):
        return NotImplemented
    y = imp.graph.add("batch_norm", [x, w, b, mean, var], eps=float(eps))
    return [y, None, None] if isinstance(imp.meta(node), list | tuple) else y


@_on("aten.max_pool2d.default", "aten.max_pool2d_with_indices.default",
     becomes="catalog max_pool2d")  # fmt: skip
def _maxpool(imp, node, args, kwargs):
    x = args[0]
    kernel = _pair(args[1])
    stride = _pair(args[2]) if len(args) > 2 and args[2] else kernel
    pad = _pair(args[3]) if len(args) > 3 else (0, 0)
    dil = _pair(args[4]) if len(args) > 4 else (1, 1)
    ceil = bool(args[5]) if len(args) > 5 else False
    y = imp.graph.add(
        "max_pool2d", [x], kernel=kernel, stride=stride, padding=pad, dilation=dil,
        ceil_mode=ceil, layout="nchw",
    )  # fmt: skip
    return [y, None] if "with_indices" in str(node.target) else y


@_on("aten.adaptive_avg_pool2d.default", "aten._adaptive_avg_pool2d.default",
     becomes="catalog adaptive_avg_pool2d")  # fmt: skip
def _avgpool(imp, node, args, kwargs):
    out = tuple(imp.meta(node).shape[-2:])
    return imp.graph.add("adaptive_avg_pool2d", [args[0]], output_size=out, layout="nchw")


@_on("aten.linear.default", becomes="catalog linear (GEMM + epilogue)")
def _linear(imp, node, args, kwargs):
    x, w = args[0], args[1]
    b = args[2] if len(args) > 2 else None
    ins = [x, w] + ([b] if b is not None else [])
    return imp.graph.add("linear", ins, activation=None, has_bias=b is not None, has_residual=False)


@_on("aten.mm.default", "aten.bmm.default", "aten.matmul.default", becomes="matmul")
def _mm(imp, node, args, kwargs):
    a, b = args[0], args[1]
    if a.ndim < 2 or b.ndim < 2:
        return NotImplemented
    dt = _out_dt(imp, node)
    return imp.graph.add("matmul", [imp.cast(a, dt), imp.cast(b, dt)])


@_on("aten.addmm.default", becomes="matmul + add")
def _addmm(imp, node, args, kwargs):
    bias, a, b = args[:3]
    if kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1:
        return NotImplemented
    return imp.graph.add("add", [imp.graph.add("matmul", [a, b]), bias])


@_on("aten.embedding.default", becomes="take (gather)")
def _embedding(imp, node, args, kwargs):
    w, ids = args[0], args[1]
    return imp.graph.add("take", [w, ids], axis=0)


@_on("aten._softmax.default", "aten.softmax.int", becomes="catalog softmax")
def _softmax(imp, node, args, kwargs):
    x = imp.cast(args[0], _out_dt(imp, node))
    return imp.graph.add("softmax", [x], axis=args[1] % x.ndim)


@_on("aten.layer_norm.default", "aten.native_layer_norm.default", becomes="catalog layer_norm")
def _layer_norm(imp, node, args, kwargs):
    x, shape = args[0], args[1]
    w = args[2] if len(args) > 2 else None
    b = args[3] if len(args) > 3 else None
    eps = args[4] if len(args) > 4 else 1e-5
    if len(shape) != 1:
        return NotImplemented
    ins = [x] + [p for p in (w, b) if p is not None]
    y = imp.graph.add(
        "layer_norm", ins, eps=float(eps), has_weight=w is not None, has_bias=b is not None
    )
    return [y, None, None] if "native" in str(node.target) else y


@_on("aten.rms_norm.default", becomes="catalog rms_norm")
def _rms_norm(imp, node, args, kwargs):
    x, shape = args[0], args[1]
    w = args[2] if len(args) > 2 else None
    eps = args[3] if len(args) > 3 and args[3] is not None else None
    if len(shape) != 1 or eps is None:
        return NotImplemented
    ins = [x] + ([w] if w is not None else [])
    return imp.graph.add("rms_norm", ins, eps=float(eps), has_weight=w is not None)


@_on("aten.scaled_dot_product_attention.default", becomes="catalog sdpa (fmha)")
def _sdpa(imp, node, args, kwargs):
    q, k, v = args[:3]
    mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
    dropout = args[4] if len(args) > 4 else kwargs.get("dropout_p", 0.0)
    causal = args[5] if len(args) > 5 else kwargs.get("is_causal", False)
    scale = args[6] if len(args) > 6 else kwargs.get("scale")
    if dropout or q.ndim != 4:
        return NotImplemented
    if mask is not None and mask.dtype != "bool":
        mask = imp.cast(mask, q.dtype)
    ins = [q, k, v] + ([mask] if mask is not None else [])
    return imp.graph.add("sdpa", ins, causal=bool(causal), scale=scale, has_mask=mask is not None)


@_on("aten.index_copy.default", becomes="catalog index_copy (KV cache)")
def _index_copy(imp, node, args, kwargs):
    x, dim, index, src = args
    return imp.graph.add("index_copy", [x, index, imp.cast(src, x.dtype)], axis=dim % x.ndim)


@_on("aten.index_put.default", becomes="catalog index_put (KV cache)")
def _index_put(imp, node, args, kwargs):
    x, indices, values = args[:3]
    acc = args[3] if len(args) > 3 else kwargs.get("accumulate", False)
    if any(i is None for i in indices):
        return NotImplemented
    return imp.graph.add(
        "index_put", [x, imp.cast(values, x.dtype), *indices], accumulate=bool(acc)
    )
