"""How a compiled model's ``catalog`` and ``fallback`` nodes run.

:func:`evaluate_torch` is the reference: each op written with plain torch functions (the numpy
mode evaluates it on the CPU and rounds to the output dtype). :func:`catalog_step` returns the
function the gpu and interpret modes call for one node: a kernforge catalog op where one covers
the node's dtypes (``ops.matmul`` with its epilogue for ``linear``, ``ops.rms_norm``,
``ops.layer_norm``, ``ops.softmax``, ``ops.fmha``, ``ops.conv2d``, the pools), else the
torch reference; its second result names which ran (``describe()`` shows it). The function
takes the destination of the node's value (an arena view, or None): ``ops.conv2d``, the pools
and ``ops.matmul`` write into it (``out=``), the others copy their result in (the third result
says which).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

from ..errors import UnsupportedError
from ..ir import Node

KERNEL_DTYPES = (torch.float16, torch.bfloat16)
StepFn = Callable[[Sequence[torch.Tensor]], torch.Tensor]
#: ``fn(args, out)``: the node's value, written into ``out`` (and returned) when it is given.
OutStepFn = Callable[[Sequence[torch.Tensor], torch.Tensor | None], torch.Tensor]


def _split(node: Node, args: Sequence[torch.Tensor], n: int, *flags: str) -> list:
    """The required inputs, then each optional one (None when its flag is off)."""
    out = list(args[:n])
    rest = list(args[n:])
    for f in flags:
        out.append(rest.pop(0) if node.attrs.get(f) else None)
    return out


def _act(x: torch.Tensor, act: str | None) -> torch.Tensor:
    if act is None:
        return x
    if act == "relu":
        return torch.relu(x)
    if act == "gelu":
        return F.gelu(x, approximate="tanh")
    if act == "gelu_erf":
        return F.gelu(x)
    if act == "silu":
        return F.silu(x)
    raise UnsupportedError(f"unknown epilogue activation {act!r}")


def _nchw(x: torch.Tensor, layout: str) -> torch.Tensor:
    """An nhwc tensor as the NCHW view torch's convolutions read as channels-last."""
    return x.permute(0, 3, 1, 2) if layout == "nhwc" else x


def _back(y: torch.Tensor, layout: str) -> torch.Tensor:
    return y.permute(0, 2, 3, 1).contiguous() if layout == "nhwc" else y.contiguous()


def _conv_ref(node: Node, args: Sequence[torch.Tensor]) -> torch.Tensor:
    x, w, b, r = _split(node, args, 2, "has_bias", "has_residual")
    a, lay = node.attrs, node.attrs.get("layout", "nchw")
    y = F.conv2d(
        _nchw(x, lay), _nchw(w, lay), None, a["stride"], a["padding"], a["dilation"], a["groups"]
    )
    y = _back(y, lay)
    if b is not None:
        y = y + (b if lay == "nhwc" else b.view(-1, 1, 1))
    if r is not None:  # ResNet's order: act(conv + bias + residual)
        y = y + r
    return _act(y, a.get("activation"))


def _pool_ref(node: Node, args: Sequence[torch.Tensor]) -> torch.Tensor:
    a, lay = node.attrs, node.attrs.get("layout", "nchw")
    y = F.max_pool2d(
        _nchw(args[0], lay),
        a["kernel"],
        a["stride"],
        a["padding"],
        a.get("dilation", (1, 1)),
        ceil_mode=a.get("ceil_mode", False),
    )
    return _back(y, lay)


def _avgpool_ref(node: Node, args: Sequence[torch.Tensor]) -> torch.Tensor:
    lay = node.attrs.get("layout", "nchw")
    return _back(F.adaptive_avg_pool2d(_nchw(args[0], lay), node.attrs["output_size"]), lay)


def _linear_ref(node: Node, args: Sequence[torch.Tensor]) -> torch.Tensor:
    x, w, b, r = _split(node, args, 2, "has_bias", "has_residual")
    y = _act(F.linear(x, w, b), node.attrs.get("activation"))
    return y if r is None else y + r


def _sdpa_ref(node: Node, args: Sequence[torch.Tensor]) -> torch.Tensor:
    q, k, v, mask = _split(node, args, 3, "has_mask")
    a = node.attrs
    if k.shape[1] != q.shape[1]:  # grouped-query attention: repeat the kv heads
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=a.get("causal", False), scale=a.get("scale")
    )


def _index_put_ref(node: Node, args: Sequence[torch.Tensor]) -> torch.Tensor:
    x, vals, *idx = args
    return torch.index_put(x, tuple(idx), vals, accumulate=node.attrs.get("accumulate", False))


def _rms_ref(node: Node, args: Sequence[torch.Tensor]) -> torch.Tensor:
    x, w = _split(node, args, 1, "has_weight")
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + node.attrs["eps"])
    y = y.to(x.dtype)
    return y if w is None else y * w


def _ln_ref(node: Node, args: Sequence[torch.Tensor]) -> torch.Tensor:
    x, w, b = _split(node, args, 1, "has_weight", "has_bias")
    return F.layer_norm(x, (x.shape[-1],), w, b, node.attrs["eps"])


REFERENCE: dict[str, Callable[[Node, Sequence[torch.Tensor]], torch.Tensor]] = {
    "conv2d": _conv_ref,
    "max_pool2d": _pool_ref,
    "adaptive_avg_pool2d": _avgpool_ref,
    "batch_norm": lambda n, a: F.batch_norm(
        a[0], a[3], a[4], a[1], a[2], training=False, eps=n.attrs["eps"]
    ),
    "linear": _linear_ref,
    "layer_norm": _ln_ref,
    "rms_norm": _rms_ref,
    "softmax": lambda n, a: torch.softmax(a[0], n.attrs["axis"]),
    "sdpa": _sdpa_ref,
    "index_copy": lambda n, a: torch.index_copy(a[0], n.attrs["axis"], a[1], a[2]),
    "index_put": _index_put_ref,
}


# -- fallback nodes: an aten overload with its non-tensor arguments as JSON data ------------


def resolve_target(name: str):
    """``"aten.index_put.default"`` -> ``torch.ops.aten.index_put.default``."""
    ns, op, overload = name.split(".")
    try:
        return getattr(getattr(getattr(torch.ops, ns), op), overload)
    except AttributeError:
        raise UnsupportedError(f"fallback op {name!r} is not a torch op in this torch") from None


_TAGS = ("__input__", "__dtype__", "__device__", "__layout__", "__memory_format__", "__dict__")


def decode_arg(x: Any, tensors: Sequence[torch.Tensor]) -> Any:
    """An argument template (see ``compiler.importer.encode_arg``) with tensors filled in."""
    if isinstance(x, list | tuple):
        if len(x) == 2 and isinstance(x[0], str) and x[0] in _TAGS:
            tag, v = x
            if tag == "__input__":
                return tensors[v]
            if tag == "__device__":
                return tensors[0].device if tensors else torch.device(v)
            if tag == "__dict__":
                return {k: decode_arg(a, tensors) for k, a in v}
            return getattr(torch, v)
        return [decode_arg(v, tensors) for v in x]
    return x


def _fallback(node: Node, args: Sequence[torch.Tensor]) -> torch.Tensor:
    fn = resolve_target(node.attrs["target"])
    pos = decode_arg(node.attrs.get("args", ()), args)
    kw = decode_arg(node.attrs.get("kwargs", ("__dict__", ())), args)
    if "device" in kw and args:
        kw["device"] = args[0].device
    out = fn(*pos, **kw)
    index = node.attrs.get("index")
    if index is not None:
        out = out[index]
    want = getattr(torch, node.output.dtype)
    return out if out.dtype == want else out.to(want)


def evaluate_torch(node: Node, args: Sequence[torch.Tensor]) -> torch.Tensor:
    """The reference result of a catalog or fallback node, computed with torch."""
    if node.op == "fallback":
        return _fallback(node, args)
    fn = REFERENCE.get(node.op)
    if fn is None:
        raise UnsupportedError(f"no torch evaluator for model op {node.op!r}")
    return fn(node, args)


# -- the gpu / interpret path: catalog kernels where they cover the node -----------------------


def _kernel_dtype(node: Node) -> bool:
    return node.output.dtype in ("float16", "bfloat16")


def _nchw_out(out: torch.Tensor | None) -> torch.Tensor | None:
    """An NHWC destination as the channels-last NCHW tensor the conv and pool ops take."""
    return None if out is None else out.permute(0, 3, 1, 2)


def _conv_step(node: Node, conv) -> OutStepFn:
    """ops.conv2d on the IR's NHWC tensors: an NHWC tensor permuted to NCHW is the
    channels-last tensor the kernel reads in place, and an [O, KH, KW, C] weight permuted the
    same way is the packed weight (kernels.conv.pack_conv_weight); the channels-last output
    permuted back is a contiguous NHWC tensor (no copies), written into ``out`` when given."""
    a = node.attrs

    def run(args, out=None):
        x, w, b, r = _split(node, args, 2, "has_bias", "has_residual")
        y = conv(
            x.permute(0, 3, 1, 2), w.permute(0, 3, 1, 2), b, a["stride"], a["padding"],
            a["dilation"], 1, a.get("activation"),
            None if r is None else r.permute(0, 3, 1, 2), out=_nchw_out(out),
        )  # fmt: skip
        return y.permute(0, 2, 3, 1) if out is None else out

    return run


def _pool_step(node: Node, pool) -> OutStepFn:
    a = node.attrs

    def run(args, out=None):
        x = args[0].permute(0, 3, 1, 2)
        y = pool(x, a["kernel"], a["stride"], a["padding"], out=_nchw_out(out))
        return y.permute(0, 2, 3, 1) if out is None else out

    return run


def _copying(fn: StepFn) -> OutStepFn:
    """``fn`` with an ``out``: its result copied there."""

    def run(args, out=None):
        y = fn(args)
        return y if out is None else out.copy_(y)

    return run


def catalog_step(node: Node) -> tuple[OutStepFn, str, bool]:
    """The function that runs ``node`` on torch tensors (``fn(args, out=None)``), the name of
    what runs it, and whether it writes ``out`` in place (else its result is copied there)."""
    fn, who = _catalog_fn(node)
    if isinstance(fn, _InPlace):
        return fn.fn, who, True
    return _copying(fn), who, False


class _InPlace:
    """A catalog step function that takes ``out=`` itself."""

    def __init__(self, fn: OutStepFn) -> None:
        self.fn = fn


def _catalog_fn(node: Node) -> tuple[StepFn | _InPlace, str]:
    from .. import ops

    a = node.attrs
    ref = lambda args: evaluate_torch(node, args)  # noqa: E731
    if node.op == "fallback":
        return ref, f"torch {a['target']}"
    if not _kernel_dtype(node):
        return ref, "torch (the kernels take float16/bfloat16)"
    nhwc = a.get("layout") == "nhwc"
    conv_ok = a.get("groups", 1) == 1 and a.get("activation") in (None, "relu", "gelu", "silu")
    if node.op == "conv2d" and hasattr(ops, "conv2d") and nhwc and conv_ok:
        return _InPlace(_conv_step(node, ops.conv2d)), "kernforge conv2d (+epilogue)"
    if node.op == "conv2d":
        return ref, "torch conv2d"
    pool_ok = not a.get("ceil_mode") and tuple(a.get("dilation", (1, 1))) == (1, 1)
    if node.op == "max_pool2d" and hasattr(ops, "max_pool2d") and nhwc and pool_ok:
        return _InPlace(_pool_step(node, ops.max_pool2d)), "kernforge max_pool2d"
    if node.op == "adaptive_avg_pool2d" and hasattr(ops, "adaptive_avg_pool2d") and nhwc:

        def run_avg(args, out=None):
            x = args[0].permute(0, 3, 1, 2)
            y = ops.adaptive_avg_pool2d(x, a["output_size"], out=_nchw_out(out))
            return y.permute(0, 2, 3, 1) if out is None else out

        return _InPlace(run_avg), "kernforge adaptive_avg_pool2d"
    if node.op == "linear":
        act = a.get("activation")
        if act in (None, "relu", "gelu", "silu"):

            def run_linear(args, out=None):
                x, w, b, r = _split(node, args, 2, "has_bias", "has_residual")
                return ops.matmul(x, w.t(), bias=b, activation=act, residual=r, out=out)

            return _InPlace(run_linear), "kernforge matmul (+epilogue)"
    if node.op == "rms_norm":

        def run_rms(args):
            x, w = _split(node, args, 1, "has_weight")
            return ops.rms_norm(x, w, a["eps"])

        return run_rms, "kernforge rms_norm"
    if node.op == "layer_norm":

        def run_ln(args):
            x, w, b = _split(node, args, 1, "has_weight", "has_bias")
            return ops.layer_norm(x, w, b, a["eps"])

        return run_ln, "kernforge layer_norm"
    if node.op == "softmax":
        return (lambda args: ops.softmax(args[0], a["axis"])), "kernforge softmax"
    if node.op == "sdpa" and not a.get("has_mask") and node.inputs[0].shape[-1] % 8 == 0:

        def run_fmha(args):
            q, k, v = args[:3]
            return ops.fmha(q, k, v, causal=a.get("causal", False), scale=a.get("scale"),
                            layout="bhsd")  # fmt: skip

        return run_fmha, "kernforge fmha"
    return ref, f"torch {node.op}"


# -- IR-level ops with torch: the stand-in for a fused step the code generator cannot build ----

_TORCH_UNARY = {
    "neg": torch.neg, "abs": torch.abs, "exp": torch.exp, "exp2": torch.exp2, "log": torch.log,
    "log2": torch.log2, "log1p": torch.log1p, "expm1": torch.expm1, "sqrt": torch.sqrt,
    "rsqrt": torch.rsqrt, "sin": torch.sin, "cos": torch.cos, "tanh": torch.tanh,
    "sigmoid": torch.sigmoid, "erf": torch.erf, "floor": torch.floor, "ceil": torch.ceil,
    "sign": torch.sign, "isnan": torch.isnan, "isinf": torch.isinf,
    "logical_not": torch.logical_not,
}  # fmt: skip
_TORCH_BINARY = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div,
    "floordiv": torch.floor_divide, "mod": torch.remainder, "pow": torch.pow,
    "maximum": torch.maximum, "minimum": torch.minimum, "eq": torch.eq, "ne": torch.ne,
    "lt": torch.lt, "le": torch.le, "gt": torch.gt, "ge": torch.ge,
    "logical_and": torch.logical_and, "logical_or": torch.logical_or,
    "logical_xor": torch.logical_xor,
}  # fmt: skip
_TORCH_REDUCE = {"sum": torch.sum, "prod": torch.prod, "max": torch.amax, "min": torch.amin}


def evaluate_ir_torch(node: Node, args: Sequence[torch.Tensor], dev: torch.device):
    """An IR node (elementwise, reduction, view, index, create, matmul) computed with torch
    on ``dev``; 16-bit floats compute in float32 and round once, as the kernels do."""
    op, a, out_dt = node.op, node.attrs, getattr(torch, node.output.dtype)
    low = node.output.dtype in ("float16", "bfloat16")
    up = [x.float() if x.dtype in (torch.float16, torch.bfloat16) else x for x in args]
    if op in _TORCH_UNARY:
        return _TORCH_UNARY[op](up[0]).to(out_dt)
    if op in _TORCH_BINARY:
        return _TORCH_BINARY[op](up[0], up[1]).to(out_dt)
    if op == "where":
        return torch.where(up[0], up[1], up[2]).to(out_dt)
    if op == "cast":
        return args[0].to(out_dt)
    if op in _TORCH_REDUCE:
        keep = bool(a.get("keepdims", False))
        x = up[0] if low or up[0].dtype != torch.bool else up[0].long()
        return _TORCH_REDUCE[op](x, dim=tuple(a["axes"]), keepdim=keep).to(out_dt)
    if op in ("argmax", "argmin"):
        fn = torch.argmax if op == "argmax" else torch.argmin
        return fn(up[0], dim=a["axes"][0], keepdim=bool(a.get("keepdims", False)))
    if op == "reshape":
        return args[0].reshape(a["shape"])
    if op == "transpose":
        return args[0].permute(*a["perm"])
    if op == "broadcast_to":
        return args[0].expand(*a["shape"])
    if op == "alias":
        return args[0]
    if op == "slice":
        idx = tuple(
            slice(st, st + sp * n, sp) if n else slice(0, 0)
            for st, sp, n in zip(a["starts"], a["steps"], a["shape"], strict=True)
        )
        return args[0][idx]
    if op == "concat":
        return torch.cat(list(args), dim=a["axis"])
    if op == "take":
        x, i = args
        return torch.index_select(x, a["axis"], i.reshape(-1).long()).reshape(node.output.shape)
    if op == "full":
        return torch.full(a["shape"], a["value"], dtype=out_dt, device=dev)
    if op == "iota":
        shape, axis = tuple(a["shape"]), a["axis"]
        ramp = torch.arange(shape[axis], device=dev)
        return ramp.reshape([-1 if i == axis else 1 for i in range(len(shape))]).expand(
            shape
        ).to(out_dt)  # fmt: skip
    if op == "constant":
        return torch.tensor(a["data"], dtype=out_dt, device=dev).reshape(a["shape"])
    if op == "matmul":
        return torch.matmul(up[0], up[1]).to(out_dt)
    raise UnsupportedError(f"no torch evaluator for IR op {op!r}")
