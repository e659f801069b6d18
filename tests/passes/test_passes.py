"""Each graph pass alone on small hand-built graphs, and the fusion planner's decisions."""

from __future__ import annotations

import pytest

from kernforge.ir import Graph
from kernforge.passes.fuse import plan
from kernforge.passes.simplify import cse, dce, fold, simplify


def ops_of(g: Graph) -> list[str]:
    return [n.op for n in g.nodes]


def test_dce_drops_unused_nodes():
    g = Graph()
    x = g.input((4,), "float32", "x")
    g.add("exp", [x])  # unused
    y = g.add("neg", [x])
    g.set_outputs([y])
    assert ops_of(dce(g)) == ["neg"]


def test_cse_merges_identical_nodes_only():
    g = Graph()
    x = g.input((4,), "float32", "x")
    a, b = g.add("exp", [x]), g.add("exp", [x])
    s1, s2 = g.add("sum", [x], axes=(0,)), g.add("sum", [x], axes=(0,), keepdims=True)
    g.set_outputs([g.add("add", [a, b]), s1, s2])
    out = cse(g)
    assert ops_of(out) == ["exp", "sum", "sum", "add"]
    add = out.nodes[-1]
    assert add.inputs[0] is add.inputs[1]


def test_fold_constants_and_identities():
    g = Graph()
    x = g.input((3,), "float32", "x")
    two = g.add("full", (), shape=(), value=2.0, dtype="float32")
    three = g.add("full", (), shape=(), value=3.0, dtype="float32")
    six = g.add("mul", [two, three])
    one = g.add("full", (), shape=(), value=1.0, dtype="float32")
    y = g.add("mul", [x, one])  # x * 1 -> x
    z = g.add("cast", [y], dtype="float32")  # same dtype -> x
    t = g.add("transpose", [g.add("reshape", [z], shape=(3, 1))], perm=(1, 0))
    tt = g.add("transpose", [t], perm=(1, 0))  # transpose of transpose -> identity
    g.set_outputs([g.add("add", [tt, six])])
    out = simplify(g)
    assert ops_of(out) == ["full", "reshape", "add"]
    assert out.nodes[0].attrs["value"] == 6.0


def test_fold_rounds_like_numpy():
    g = Graph()
    a = g.add("full", (), shape=(), value=7, dtype="int32")
    b = g.add("full", (), shape=(), value=-2, dtype="int32")
    g.set_outputs([g.add("floordiv", [a, b]), g.add("mod", [a, b])])
    out = fold(g)
    assert [n.attrs.get("value") for n in out.nodes[-2:]] == [-4, -1]


def softmax_graph(shape=(8, 32), axis=1):
    g = Graph("softmax")
    x = g.input(shape, "float32", "x")
    m = g.add("max", [x], axes=(axis,), keepdims=True)
    e = g.add("exp", [g.add("sub", [x, m])])
    s = g.add("sum", [e], axes=(axis,), keepdims=True)
    g.set_outputs([g.add("div", [e, s])])
    return g


@pytest.mark.parametrize("axis", [0, 1])
def test_softmax_is_one_kernel(axis):
    p = plan(softmax_graph(axis=axis))
    assert [(k.kind, k.axes) for k in p.groups] == [("rows", (axis,))]
    assert [n.op for n in p.groups[0].reductions] == ["max", "sum"]


def test_layer_norm_with_stats_is_one_kernel():
    g = Graph("ln")
    x = g.input((6, 40), "float32", "x")
    w = g.input((40,), "float32", "w")
    n = g.add("full", (), shape=(), value=40.0, dtype="float32")
    mean = g.add("div", [g.add("sum", [x], axes=(1,), keepdims=True), n])
    xc = g.add("sub", [x, mean])
    var = g.add("div", [g.add("sum", [g.add("mul", [xc, xc])], axes=(1,), keepdims=True), n])
    y = g.add("mul", [g.add("mul", [xc, g.add("rsqrt", [var])]), w])
    g.set_outputs([y, mean, var])  # full-width and per-row results together
    p = plan(g)
    assert len(p.groups) == 1 and p.groups[0].kind == "rows"
    assert len(p.groups[0].roots) == 3


def test_reductions_over_two_domains_split():
    g = Graph()
    x = g.input((5, 7), "float32", "x")
    r0 = g.add("sum", [x], axes=(0,), keepdims=True)
    r1 = g.add("sum", [x], axes=(1,), keepdims=True)
    g.set_outputs([g.add("add", [g.add("sub", [x, r0]), r1])])
    from kernforge.codegen import contiguous_strides, lower

    low = lower(g, [contiguous_strides(x.shape)], interpret=True)
    assert sorted(k.kind for k in low.plan.groups) == ["rows", "rows"]


def test_matmul_epilogue_fuses_and_operands_stay_views():
    g = Graph("mlp")
    x = g.input((16, 32), "float16", "x")
    w = g.input((24, 32), "float16", "w")
    b = g.input((24,), "float16", "b")
    mm = g.add("matmul", [x, g.add("transpose", [w], perm=(1, 0))])
    g.set_outputs(
        [
            g.add(
                "maximum",
                [g.add("add", [mm, b]), g.add("full", (), shape=(), value=0.0, dtype="float16")],
            )
        ]
    )
    p = plan(g)
    assert [k.kind for k in p.groups] == ["matmul"]


def test_matmul_of_computed_operand_stores_it_first():
    g = Graph()
    x = g.input((16, 32), "float32", "x")
    w = g.input((32, 8), "float32", "w")
    g.set_outputs([g.add("matmul", [g.add("exp", [x]), w])])
    p = plan(g)
    assert [k.kind for k in p.groups] == ["pointwise", "matmul"]


def test_int_matmul_runs_on_torch():
    g = Graph()
    a = g.input((4, 5), "int64", "a")
    b = g.input((5, 3), "int64", "b")
    g.set_outputs([g.add("matmul", [a, b])])
    assert [k.kind for k in plan(g).groups] == ["torch"]
