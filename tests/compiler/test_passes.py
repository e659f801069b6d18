"""Each compiler pass alone, on small graphs: what it rewrites, and that the graph computes
the same values before and after (NumPy evaluation with weights made by the recipes)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kernforge.compiler.compile import build_weights
from kernforge.ir import Graph
from kernforge.passes.bn_fold import fold_batch_norm
from kernforge.passes.cleanup import eliminate_aliases
from kernforge.passes.layout import to_channels_last
from kernforge.passes.patterns import (
    fuse_conv_epilogue,
    fuse_linear_epilogue,
    match_attention,
    match_rms_norm,
)
from kernforge.passes.weights import fold_weights
from kernforge.runtime import simulate


def _w(g: Graph, name: str, shape, dtype="float32"):
    return g.add("weight", (), shape=tuple(shape), dtype=dtype, name=name, recipe=None)


def _run(g: Graph, source: dict, *inputs):
    return simulate.run(g, list(inputs), build_weights(g, source))


def _same(before: Graph, after: Graph, source: dict, *inputs, tol=1e-5):
    after.verify()
    for a, b in zip(_run(before, source, *inputs), _run(after, source, *inputs), strict=True):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


def _ops(g: Graph) -> list[str]:
    return [n.op for n in g.nodes if n.op not in ("weight", "full")]


def _conv(g, x, w, **kw):
    attrs = dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, layout="nchw",
                 activation=None, has_bias=False, has_residual=False)  # fmt: skip
    attrs.update(kw)
    return g.add("conv2d", [x, w], **attrs)


def _bn_source(c: int, prefix: str = "bn") -> dict:
    return {
        f"{prefix}.w": torch.rand(c) + 0.5, f"{prefix}.b": torch.randn(c),
        f"{prefix}.mean": torch.randn(c), f"{prefix}.var": torch.rand(c) + 0.5,
    }  # fmt: skip


def _bn(g, x, c, prefix="bn"):
    ps = [_w(g, f"{prefix}.{k}", (c,)) for k in ("w", "b", "mean", "var")]
    return g.add("batch_norm", [x, *ps], eps=1e-5)


def test_eliminate_aliases():
    g = Graph()
    x = g.input((2, 3), "float32", "x")
    y = g.add("alias", [x])
    y = g.add("cast", [y], dtype="float32")
    y = g.add("reshape", [y], shape=(2, 3))
    y = g.add("transpose", [g.add("reshape", [y], shape=(2, 1, 3))], perm=(1, 0, 2))
    y = g.add("exp", [y])
    g.set_outputs([y])
    out = eliminate_aliases(g)
    assert _ops(out) == ["reshape", "exp"]  # the size-1 transpose moves no data: a reshape
    _same(g, out, {}, torch.randn(2, 3))


def test_bn_fold_is_exact():
    g = Graph()
    x = g.input((2, 3, 5, 5), "float32", "x")
    y = _bn(g, _conv(g, x, _w(g, "conv.w", (4, 3, 3, 3))), 4)
    g.set_outputs([y])
    src = {"conv.w": torch.randn(4, 3, 3, 3), **_bn_source(4)}
    out = fold_batch_norm(g)
    assert _ops(out) == ["conv2d"] and out.nodes[-1].attrs["has_bias"]
    _same(g, out, src, torch.randn(2, 3, 5, 5), tol=2e-5)


def test_lone_bn_becomes_scale_and_shift():
    g = Graph()
    x = g.input((2, 4, 3, 3), "float32", "x")
    g.set_outputs([_bn(g, g.add("exp", [x]), 4)])
    out = fold_batch_norm(g)
    assert _ops(out) == ["exp", "mul", "add"]
    _same(g, out, _bn_source(4), torch.randn(2, 4, 3, 3))


def test_conv_residual_relu_epilogue():
    g = Graph()
    x = g.input((1, 4, 5, 5), "float32", "x")
    r = g.input((1, 4, 5, 5), "float32", "r")
    y = g.add("add", [_conv(g, x, _w(g, "w", (4, 4, 3, 3))), r])
    y = g.add("maximum", [y, g.add("full", (), shape=(), value=0, dtype="float32")])
    g.set_outputs([y])
    out = fuse_conv_epilogue(g)
    (conv,) = [n for n in out.nodes if n.op == "conv2d"]
    assert _ops(out) == ["conv2d"] and conv.attrs["activation"] == "relu"
    assert conv.attrs["has_residual"]
    _same(g, out, {"w": torch.randn(4, 4, 3, 3)}, torch.randn(1, 4, 5, 5), torch.randn(1, 4, 5, 5))


def test_conv_epilogue_keeps_shared_intermediates():
    g = Graph()
    x = g.input((1, 2, 4, 4), "float32", "x")
    c = _conv(g, x, _w(g, "w", (2, 2, 3, 3)))
    relu = g.add("maximum", [c, g.add("full", (), shape=(), value=0, dtype="float32")])
    g.set_outputs([relu, c])  # the conv output is also returned: no fusion
    assert _ops(fuse_conv_epilogue(g)) == ["conv2d", "maximum"]


@pytest.mark.parametrize("act", ["relu", "silu", "gelu"])
def test_linear_epilogue(act):
    from kernforge.compiler.importer import gelu, silu

    g = Graph()
    x = g.input((3, 8), "float32", "x")
    r = g.input((3, 4), "float32", "r")
    y = g.add("linear", [x, _w(g, "w", (4, 8)), _w(g, "b", (4,))], activation=None,
              has_bias=True, has_residual=False)  # fmt: skip
    if act == "relu":
        y = g.add("maximum", [y, g.add("full", (), shape=(), value=0, dtype="float32")])
    elif act == "silu":
        y = silu(g, y)
    else:
        y = gelu(g, y, "tanh")
    g.set_outputs([g.add("add", [y, r])])
    out = fuse_linear_epilogue(g)
    assert _ops(out) == ["linear"]
    assert out.nodes[-1].attrs["activation"] == act and out.nodes[-1].attrs["has_residual"]
    src = {"w": torch.randn(4, 8), "b": torch.randn(4)}
    _same(g, out, src, torch.randn(3, 8), torch.randn(3, 4))


def test_rms_norm_matching_hf_form():
    g = Graph()
    x = g.input((2, 3, 16), "bfloat16", "x")
    h = g.add("cast", [x], dtype="float32")
    ms = g.add("sum", [g.add("mul", [h, h])], axes=(2,), keepdims=True)
    ms = g.add("mul", [ms, g.add("full", (), shape=(), value=1 / 16, dtype="float32")])
    eps = g.add("full", (), shape=(), value=1e-6, dtype="float32")
    y = g.add("mul", [h, g.add("rsqrt", [g.add("add", [ms, eps])])])
    y = g.add("mul", [_w(g, "w", (16,), "bfloat16"), g.add("cast", [y], dtype="bfloat16")])
    g.set_outputs([y])
    out = match_rms_norm(g)
    assert _ops(out) == ["rms_norm"] and math.isclose(out.nodes[-1].attrs["eps"], 1e-6)
    _same(g, out, {"w": (torch.rand(16) + 0.5).bfloat16()}, torch.randn(2, 3, 16).bfloat16(),
          tol=1e-2)  # fmt: skip


def test_attention_matching():
    g = Graph()
    q, k, v = (g.input((1, 2, 5, 8), "float32", n) for n in "qkv")
    s = g.add("matmul", [q, g.add("transpose", [k], perm=(0, 1, 3, 2))])
    s = g.add("mul", [s, g.add("full", (), shape=(), value=8**-0.5, dtype="float32")])
    g.set_outputs([g.add("matmul", [g.add("softmax", [s], axis=3), v])])
    out = match_attention(g)
    assert _ops(out) == ["sdpa"]
    _same(g, out, {}, *(torch.randn(1, 2, 5, 8) for _ in range(3)))


def test_channels_last_permutes_once():
    g = Graph()
    x = g.input((1, 3, 6, 6), "float32", "x")
    y = _conv(g, x, _w(g, "w1", (4, 3, 3, 3)), activation="relu")
    y = g.add("max_pool2d", [y], kernel=(2, 2), stride=(2, 2), padding=(0, 0),
              dilation=(1, 1), ceil_mode=False, layout="nchw")  # fmt: skip
    z = _conv(g, y, _w(g, "w2", (4, 4, 3, 3)))
    y = g.add("maximum", [g.add("add", [z, y]), g.add("full", (), shape=(), value=0.0,
                                                        dtype="float32")])  # fmt: skip
    g.set_outputs([g.add("adaptive_avg_pool2d", [y], output_size=(1, 1), layout="nchw")])
    out = to_channels_last(g)
    ops = _ops(out)
    assert ops.count("transpose") == 2, out  # the input, and the [1, 1, 1, C] result back
    assert all(n.attrs["layout"] == "nhwc" for n in out.nodes if n.op == "conv2d")
    src = {"w1": torch.randn(4, 3, 3, 3), "w2": torch.randn(4, 4, 3, 3)}
    _same(g, out, src, torch.randn(1, 3, 6, 6))


def test_weight_only_subgraphs_fold_into_recipes():
    g = Graph()
    x = g.input((3, 8), "float32", "x")
    wt = g.add(
        "transpose",
        [
            g.add(
                "cast",
                [
                    _w(g, "w", (4, 8)),
                ],
                dtype="float32",
            )
        ],
        perm=(1, 0),
    )
    g.set_outputs([g.add("matmul", [x, wt])])
    out = fold_weights(eliminate_aliases(g))
    (w,) = [n for n in out.nodes if n.op == "weight"]
    assert _ops(out) == ["matmul"] and w.attrs["recipe"] == ("transpose", "w", (1, 0))
    _same(g, out, {"w": torch.randn(4, 8)}, torch.randn(3, 8))
