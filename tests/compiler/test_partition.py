"""Partitioning: unsupported ops run as torch fallback partitions (and still give the right
answer), KERNFORGE_DISABLE_FALLBACK turns them into errors, and Program checks its inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kernforge import config, device
from kernforge.compiler import compile_model
from kernforge.errors import DeviceError, DTypeError, ShapeError, UnsupportedError
from kernforge.passes.partition import partition, schedule

from .nets import modes, on


class WithCumsum(nn.Module):
    """linear -> cumsum (no kernforge lowering) -> elementwise -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = torch.cumsum(h, dim=-1) * 0.5 + 1
        return self.b(torch.tanh(h))


@pytest.fixture
def model():
    torch.manual_seed(0)
    return WithCumsum().eval()


@pytest.mark.parametrize("mode", modes("numpy", "interpret", "gpu"))
def test_unsupported_op_runs_as_fallback_partition(model, mode):
    x = torch.randn(4, 6)
    prog = compile_model(model, (x,))
    kinds = [p.kind for p in prog.partitions]
    assert kinds == ["kernel", "fallback", "kernel"], prog.describe()
    text = prog.describe()
    assert "[fallback]" in text and "aten.cumsum.default" in text
    with torch.no_grad():
        ref = model(x)
    torch.testing.assert_close(prog.run(*on(mode, x), mode=mode).cpu(), ref, rtol=1e-5, atol=1e-5)


def test_disable_fallback_names_the_op(model, monkeypatch):
    monkeypatch.setenv("KERNFORGE_DISABLE_FALLBACK", "1")
    config.reload()
    try:
        with pytest.raises(UnsupportedError, match=r"aten\.cumsum\.default"):
            compile_model(model, (torch.randn(4, 6),))
    finally:
        monkeypatch.delenv("KERNFORGE_DISABLE_FALLBACK")
        config.reload()


def test_partition_covers_every_node_once_in_a_valid_order(model):
    prog = compile_model(model, (torch.randn(4, 6),))
    g = prog.graph
    order = schedule(g)
    assert sorted(map(id, order)) == sorted(map(id, g.nodes))
    seen = {id(v) for v in g.inputs}
    for n in order:
        assert all(id(v) in seen for v in n.inputs)
        seen.add(id(n.output))
    steps = [s for p in partition(g) for s in p.steps]
    real = [n for s in steps for n in s.nodes if n.kind != "create"]
    assert sorted(map(id, real)) == sorted(
        id(n) for n in g.nodes if n.kind not in ("weight", "create")
    )
    # deterministic: the same graph partitions the same way
    again = [s.label for p in partition(g) for s in p.steps]
    assert again == [s.label for s in steps]


def test_elementwise_clusters_into_one_fused_step():
    class Ew(nn.Module):
        def forward(self, x, y):
            a = torch.exp(x) * 2
            b = torch.softmax(y, -1)  # a catalog op between elementwise work
            return torch.sigmoid(a) + torch.tanh(x), b * 3

    prog = compile_model(Ew(), (torch.randn(3, 5), torch.randn(3, 5)))
    kinds = [s.kind for s in prog.steps]
    assert kinds.count("fused") == 2 and kinds.count("catalog") == 1, prog.describe()


def test_program_checks_inputs(model):
    prog = compile_model(model, (torch.randn(4, 6),))
    with pytest.raises(ShapeError, match=r"compiled for \(4, 6\)"):
        prog.run(torch.randn(5, 6), mode="numpy")
    with pytest.raises(DTypeError, match="takes torch.float32"):
        prog.run(torch.randn(4, 6).double(), mode="numpy")
    with pytest.raises(DeviceError):
        prog.run(torch.randn(4, 6), mode="gpu")  # a CPU tensor (or no GPU here)
    with pytest.raises(Exception, match="takes 1 inputs"):
        prog.run(torch.randn(4, 6), torch.randn(4, 6), mode="numpy")


def test_profile_on_cpu(model):
    x = torch.randn(4, 6)
    prog = compile_model(model, (x,))
    mode = "interpret" if device.INTERPRET else "gpu"
    prof = prog.profile(*on(mode, x), mode=mode, iters=1)
    assert len(prof["steps"]) == len(prog.steps) and len(prof["partitions"]) == 3
    assert prof["total_ms"] > 0 and all(r["ms"] >= 0 for r in prof["steps"])


def test_fallback_program_survives_save_and_load(model, tmp_path):
    import kernforge

    x = torch.randn(4, 6)
    prog = compile_model(model, (x,))
    prog.save(tmp_path / "p.kf")
    back = kernforge.load(tmp_path / "p.kf")
    assert [p.kind for p in back.partitions] == [p.kind for p in prog.partitions]
    torch.testing.assert_close(back.run(x, mode="numpy"), prog.run(x, mode="numpy"))


def test_codegen_fallback_runs_ir_with_torch():
    """A fused step the code generator cannot build runs op by op with torch: same values as
    the NumPy reference."""
    from kernforge.ir import Graph
    from kernforge.runtime import simulate
    from kernforge.runtime.model import _op_by_op

    g = Graph("g")
    x = g.input((3, 4), "bfloat16", "x")
    i = g.input((2,), "int64", "i")
    pos = g.add("cast", [g.add("iota", (), shape=(4,), axis=0, dtype="int64")], dtype="float32")
    h = g.add("mul", [g.add("cast", [x], dtype="float32"), pos])
    s = g.add("sum", [h], axes=(1,), keepdims=True)
    t = g.add("take", [g.add("transpose", [h], perm=(1, 0)), i], axis=0)
    c = g.add("concat", [g.add("broadcast_to", [s], shape=(3, 4)), h], axis=1)
    g.set_outputs([g.add("cast", [g.add("tanh", [c])], dtype="bfloat16"), t])
    xs = [torch.randn(3, 4).bfloat16(), torch.tensor([3, 1])]
    got = _op_by_op(g, RuntimeError("test"))(xs)
    want = simulate.run(g, xs)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.float(), torch.from_numpy(b).float(), rtol=1e-2, atol=1e-2)
    # With destinations (the executor's arena views), the results are copied into them.
    dests = [torch.full((3, 8), float("nan")).bfloat16(), None]
    again = _op_by_op(g, RuntimeError("test"))(xs, dests)
    assert again[0] is dests[0] and torch.equal(again[0], got[0])
    torch.testing.assert_close(again[1], got[1])
