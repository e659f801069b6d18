"""The traced graph itself: op names, shapes, dtypes, source locations, inputs and static
arguments, output plumbing, the printer and JSON round trip, the verifier, dtype promotion,
and the NumPy evaluator's own semantics (bfloat16 rounding, input checks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kernforge.frontend.np_api as knp
from kernforge.errors import DTypeError, ShapeError
from kernforge.frontend import ArgSpec, bind, dtypes, trace
from kernforge.ir import Graph, VerifyError
from kernforge.runtime import simulate


def ops_of(g: Graph) -> list[str]:
    return [n.op for n in g.nodes]


def rand(*shape, dtype=np.float32):
    return np.random.default_rng().standard_normal(shape).astype(dtype)


def rmsnorm_gate(x, w, g):
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6) * w
    return y * (g / (1 + np.exp(-g)))


def test_rmsnorm_gate_graph():
    t = trace(rmsnorm_gate, [rand(4, 7), rand(7), rand(4, 7)])
    g = t.graph
    assert [v.name for v in g.inputs] == ["x", "w", "g"]
    assert ops_of(g) == [
        "mul",
        "sum",
        "full",
        "div",
        "full",
        "add",
        "sqrt",
        "div",
        "mul",
        "neg",
        "exp",
        "full",
        "add",
        "div",
        "mul",
    ]
    s = g.nodes[1]
    assert s.attrs == {"axes": (1,), "keepdims": True} and s.output.shape == (4, 1)
    assert {n.output.dtype for n in g.nodes} == {"float32"}  # weak Python scalars stay fp32
    assert g.nodes[2].attrs["value"] == 7.0  # mean = sum / 7
    assert g.outputs[0].shape == (4, 7)
    # every node points at the user's line in this file
    assert g.nodes[0].loc.startswith("test_trace.py:")
    assert g.nodes[0].loc.endswith(
        "y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6) * w"
    )
    assert g.nodes[-1].loc.endswith("return y * (g / (1 + np.exp(-g)))")


def test_power_and_division_lowering():
    def f(x, i):
        return x**2, x**0.5, x**-1, x**-0.5, x**3.0, i / i

    g = trace(f, [rand(5), np.arange(5, dtype=np.int32)]).graph
    outs = [v.node for v in g.outputs]
    assert [n.op for n in outs] == ["mul", "sqrt", "div", "rsqrt", "pow", "div"]
    assert outs[-1].output.dtype == "float64"
    assert outs[-1].inputs[0].node.op == "cast"  # int32 -> float64 before the division


def test_softmax_and_reductions_graph():
    g = trace(knp.softmax, [rand(3, 6)]).graph
    assert ops_of(g) == ["max", "sub", "exp", "sum", "div"]
    g = trace(
        lambda x: (np.argmax(x), x.var(axis=(0, 2)), np.sum(x, axis=())), [rand(2, 3, 4)]
    ).graph
    first = g.nodes[0]
    assert first.op == "reshape" and first.output.shape == (24,)
    assert g.outputs[0].shape == () and g.outputs[0].dtype == "int64"
    assert g.outputs[1].shape == (3,)
    assert g.outputs[2] is g.inputs[0]  # axis=() reduces nothing


def test_dtype_promotion_in_graph():
    def f(h, i8, b):
        return h + 1.5, i8 + 3, i8 * 2.5, h + np.float32(1), b * 2, b + h, np.exp(i8)

    x16 = rand(4, dtype=np.float16)
    i8 = np.arange(4, dtype=np.int8)
    bf = torch.randn(4).bfloat16()
    g = trace(f, [x16, i8, bf]).graph
    assert g.inputs[2].dtype == "bfloat16"
    assert [v.dtype for v in g.outputs] == [
        "float16",
        "int8",
        "float64",
        "float32",
        "bfloat16",
        "float32",
        "float16",
    ]


def test_traced_array_facts():
    seen = {}

    def f(x, b):
        seen.update(
            shape=x.shape,
            ndim=x.ndim,
            size=x.size,
            dtype=x.dtype,
            bdtype=b.dtype,
            T=x.T.shape,
            len=len(x),
            itemsize=b.itemsize,
        )
        return x

    trace(f, [ArgSpec((3, 5), "float32"), ArgSpec((2,), torch.bfloat16)])
    assert seen["shape"] == (3, 5) and seen["ndim"] == 2 and seen["size"] == 15
    assert seen["dtype"] == np.float32 and seen["T"] == (5, 3) and seen["len"] == 3
    assert seen["bdtype"] == "bfloat16" and seen["bdtype"] == torch.bfloat16
    assert seen["bdtype"] is knp.bfloat16 and seen["itemsize"] == 2


def test_static_args_loops_and_bind_key():
    def f(x, n, scale=1.0, *, axis=-1):
        for _ in range(n):
            x = x * scale
        return np.sum(x, axis=axis)

    x = rand(2, 3)
    t = trace(f, [x, 3], {"scale": 0.5, "axis": 0})
    assert ops_of(t.graph).count("mul") == 3 and t.graph.outputs[0].shape == (3,)
    assert t.static == {"n": 3, "scale": 0.5, "axis": 0}
    k = bind(f, [x, 3]).key
    assert k == bind(f, [rand(2, 3), 3]).key  # same shapes and statics: same trace
    assert k != bind(f, [rand(2, 4), 3]).key
    assert k != bind(f, [x, 2]).key
    assert bind(f, [x, 3], {"scale": 1}).key != bind(f, [x, 3], {"scale": 1.0}).key


def test_nested_array_arguments_and_output_trees():
    def f(xs, cfg):
        a, b = xs
        return {"sum": a + b, "parts": [a, b * cfg["k"]], "none": None}

    a, b = rand(3), rand(3)
    t = trace(f, [[a, b], {"k": 2.0}])
    assert t.input_names == ["xs_0", "xs_1"]
    outs = simulate.run(t.graph, [a, b])
    r = t.rebuild(outs)
    assert set(r) == {"sum", "parts", "none"} and r["none"] is None
    np.testing.assert_allclose(r["sum"], a + b, rtol=1e-6)
    np.testing.assert_array_equal(r["parts"][0], a)  # an input returned unchanged
    np.testing.assert_allclose(r["parts"][1], b * 2, rtol=1e-6)
    assert t.graph.outputs[1] is t.graph.inputs[0]


def test_captured_constants():
    w = rand(3, 2)
    ones = np.ones((3,), np.float32)

    def f(x):
        return x @ w, x + ones, x * 2 + np.zeros(3, np.float32)

    x = rand(4, 3)
    t = trace(f, [x])
    const = [n for n in t.graph.nodes if n.op == "constant"]
    assert len(const) == 1 and const[0].attrs["shape"] == (3, 2)
    assert const[0].attrs["dtype"] == "float32"
    fulls = [n.attrs["value"] for n in t.graph.nodes if n.op == "full"]
    assert 1.0 in fulls and 0.0 in fulls  # uniform captured arrays become full nodes
    got = simulate.run(t.graph, [x])
    for o, r in zip(got, f(x), strict=True):
        np.testing.assert_allclose(o, r, rtol=1e-5)


def _graphs():
    """Graphs covering every op kind, for the printer and JSON round trip."""

    def f(x, i):
        y = np.concatenate([x[::2, 1:], x[1:, :-1][::-1]], axis=0)
        z = np.take(y, i, axis=1) @ np.eye(3, dtype=np.float32)[:1].T
        c = np.array([[1.5, -2.0]], np.float32)
        return knp.erf(y).astype(np.float16), z, knp.arange(3) * c.T, np.argmax(y, axis=0)

    return [
        trace(rmsnorm_gate, [rand(4, 7), rand(7), rand(4, 7)]).graph,
        trace(f, [rand(5, 4), np.array([0, 2, 1])]).graph,
        trace(
            lambda q: knp.softmax(np.einsum("bqd,bkd->bqk", q, q) * np.inf), [rand(1, 2, 3)]
        ).graph,
    ]


def test_printer_and_json_round_trip():
    for g in _graphs():
        text = str(g)
        assert text.startswith(f"graph {g.name}(") and text.rstrip().endswith("}")
        back = Graph.from_json(g.to_json())
        assert str(back) == text
        for n in g.nodes:
            assert f"{n.op}(" in text
    text = str(_graphs()[1])
    for op in ("slice", "concat", "take", "constant", "iota", "matmul", "argmax", "cast", "erf"):
        assert f" = {op}(" in text, op


def test_verifier_catches_bad_graphs():
    g = trace(rmsnorm_gate, [rand(2, 3), rand(3), rand(2, 3)]).graph
    g.verify()
    g.nodes[0].output.shape = (2, 4)  # lie about a shape
    with pytest.raises(VerifyError, match="output is"):
        g.verify()

    g = trace(rmsnorm_gate, [rand(2, 3), rand(3), rand(2, 3)]).graph
    g.nodes[0], g.nodes[1] = g.nodes[1], g.nodes[0]  # use before definition
    with pytest.raises(VerifyError, match="used before defined"):
        g.verify()

    g = trace(rmsnorm_gate, [rand(2, 3), rand(3), rand(2, 3)]).graph
    g.nodes[-1].output.dtype = "float16"
    with pytest.raises(VerifyError):
        g.verify()

    g = trace(rmsnorm_gate, [rand(2, 3), rand(3), rand(2, 3)]).graph
    g.outputs = [Graph().input((2,), "float32")]
    with pytest.raises(VerifyError, match="not defined"):
        g.verify()


@pytest.mark.parametrize(
    ("operands", "want"),
    [
        (("int8", 3), "int8"), (("int8", 2.5), "float64"), (("float16", 1.5), "float16"),
        (("float16", "float32"), "float32"), (("int32", "float16"), "float64"),
        (("uint8", "int8"), "int16"), (("bool", 1), "int64"), ((1, 2.0), "float64"),
        (("bfloat16", "float16"), "float32"), (("bfloat16", "int64"), "bfloat16"),
        (("bfloat16", 2.5), "bfloat16"), (("bfloat16", "float32"), "float32"),
        (("bfloat16", "float64"), "float64"), (("bfloat16", "bool"), "bfloat16"),
        ((np.float32(1.0), 2), "float32"), ((torch.bfloat16, np.float16), "float32"),
    ],
)  # fmt: skip
def test_result_type(operands, want):
    assert dtypes.result_type(*operands) == want


def test_dtype_conversions():
    assert dtypes.ir_dtype(np.float16) == "float16"
    assert dtypes.ir_dtype(np.dtype("int8")) == "int8"
    assert dtypes.ir_dtype(torch.bfloat16) == "bfloat16"
    assert dtypes.ir_dtype(float) == "float64" and dtypes.ir_dtype(bool) == "bool"
    assert dtypes.ir_dtype("bf16") == "bfloat16" and dtypes.ir_dtype(knp.bfloat16) == "bfloat16"
    assert dtypes.to_numpy("bfloat16") == np.float32
    assert dtypes.to_torch("bfloat16") == torch.bfloat16
    with pytest.raises(DTypeError, match="complex"):
        dtypes.ir_dtype(np.complex64)
    with pytest.raises(DTypeError):
        dtypes.ir_dtype("float8")


def test_round_bf16_matches_torch():
    x = np.concatenate(
        [
            np.random.default_rng().standard_normal(4096).astype(np.float32) * 100,
            np.array([0.0, -0.0, np.inf, -np.inf, 3.3895314e38, 1e-40], np.float32),
        ]
    )
    want = torch.from_numpy(x).bfloat16().float().numpy()
    np.testing.assert_array_equal(simulate.round_bf16(x), want)
    assert np.isnan(simulate.round_bf16(np.array([np.nan], np.float32)))[0]
    assert simulate.round_bf16(np.float32(1.0)).shape == ()


def test_simulate_bf16_rounds_every_op():
    x = torch.randn(64).bfloat16()
    t = trace(lambda a: np.exp(a) * 3, [x])
    (out,) = simulate.run(t.graph, [x.float().numpy()])
    want = (torch.exp(x) * 3).float().numpy()  # torch rounds to bf16 after each op too
    np.testing.assert_array_equal(out, want)


def test_simulate_checks_inputs():
    t = trace(lambda a: a + 1, [rand(3)])
    with pytest.raises(ShapeError, match="shape"):
        simulate.run(t.graph, [rand(4)])
    with pytest.raises(DTypeError, match="float64"):
        simulate.run(t.graph, [np.zeros(3)])
    with pytest.raises(ShapeError, match="takes 1 inputs"):
        simulate.run(t.graph, [])
