"""Weight recipes: each op against a torch reference, composition, BatchNorm folding exactness
through a real conv, and load_weights from a state dict and a safetensors file with the errors
naming what is missing or wrong."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from kernforge.errors import ArgumentError, DTypeError, ShapeError
from kernforge.runtime import recipes
from kernforge.runtime.recipes import MissingWeightError, evaluate, load_weights, sources

from .standin import StandInProgram, random_weights, source_state, tiny_graph


def bn_state(c_out: int = 6, c_in: int = 5, bias: bool = True) -> dict[str, torch.Tensor]:
    sd = {
        "conv.weight": torch.randn(c_out, c_in, 3, 3),
        "bn.weight": torch.rand(c_out) + 0.5,
        "bn.bias": torch.randn(c_out),
        "bn.running_mean": torch.randn(c_out),
        "bn.running_var": torch.rand(c_out) + 0.1,
    }
    if bias:
        sd["conv.bias"] = torch.randn(c_out)
    return sd


BN = ("bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", 1e-5)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_bn_fold_matches_conv_then_bn(bias, affine):
    sd = bn_state(bias=bias)
    bn = BN if affine else (None, None, *BN[2:])
    w = evaluate(None, ("fold_bn_weight", "conv.weight", *bn), sd)
    b = evaluate(None, ("fold_bn_bias", "conv.bias" if bias else None, *bn), sd)
    conv = torch.nn.Conv2d(5, 6, 3, padding=1, bias=bias).double()
    norm = torch.nn.BatchNorm2d(6, eps=1e-5, affine=affine).double().eval()
    with torch.no_grad():
        conv.weight.copy_(sd["conv.weight"])
        if bias:
            conv.bias.copy_(sd["conv.bias"])
        norm.running_mean.copy_(sd["bn.running_mean"])
        norm.running_var.copy_(sd["bn.running_var"])
        if affine:
            norm.weight.copy_(sd["bn.weight"])
            norm.bias.copy_(sd["bn.bias"])
        x = torch.randn(2, 5, 7, 9, dtype=torch.float64)
        want = norm(conv(x))
        got = torch.nn.functional.conv2d(x, w.double(), b.double(), padding=1)
    assert w.dtype == b.dtype == torch.float32 and w.shape == (6, 5, 3, 3) and b.shape == (6,)
    # folded in float64, rounded once to float32: float32 rounding of the weights only
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("affine", [True, False])
def test_lone_bn_as_scale_and_shift(affine):
    sd = bn_state()
    bn = BN if affine else (None, None, *BN[2:])
    scale = evaluate(None, ("bn_scale", bn[0], bn[3], bn[4]), sd)
    shift = evaluate(None, ("bn_shift", *bn), sd)
    norm = torch.nn.BatchNorm2d(6, eps=1e-5, affine=affine).eval()
    with torch.no_grad():
        norm.running_mean.copy_(sd["bn.running_mean"])
        norm.running_var.copy_(sd["bn.running_var"])
        if affine:
            norm.weight.copy_(sd["bn.weight"])
            norm.bias.copy_(sd["bn.bias"])
        x = torch.randn(2, 6, 3, 5)
        want = norm(x)
    got = x * scale[:, None, None] + shift[:, None, None]
    assert scale.dtype == shift.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_ops_against_torch():
    x = torch.randn(3, 4, 5)
    sd = {"x": x, "y": torch.randn(3, 2, 5)}
    torch.testing.assert_close(
        evaluate(None, ("transpose", "x", (2, 0, 1)), sd), x.permute(2, 0, 1)
    )
    assert evaluate(None, ("transpose", "x", (2, 0, 1)), sd).is_contiguous()
    torch.testing.assert_close(evaluate(None, ("reshape", "x", (12, 5)), sd), x.reshape(12, 5))
    got = evaluate(None, ("pad", "x", ((0, 1), (2, 0), (0, 3)), -1.5), sd)
    torch.testing.assert_close(got, torch.nn.functional.pad(x, (0, 3, 2, 0, 0, 1), value=-1.5))
    torch.testing.assert_close(evaluate(None, ("slice", "x", 1, 1, 3), sd), x[:, 1:3])
    torch.testing.assert_close(
        evaluate(None, ("concat", ("x", "y"), 1), sd), torch.cat([x, sd["y"]], 1)
    )
    torch.testing.assert_close(evaluate(None, ("scale", "x", 0.25), sd), x * 0.25)
    got = evaluate(None, ("cast", "x", "bfloat16"), sd)
    assert got.dtype == torch.bfloat16 and torch.equal(got, x.bfloat16())
    assert evaluate("x", None, sd) is x and evaluate(None, "y", sd) is sd["y"]


def test_composition_and_sources():
    sd = bn_state()
    r = ("cast", ("transpose", ("fold_bn_weight", "conv.weight", *BN), (0, 2, 3, 1)), "bfloat16")
    got = evaluate(None, r, sd)
    scale = sd["bn.weight"] / torch.sqrt(sd["bn.running_var"] + 1e-5)
    want = (sd["conv.weight"] * scale[:, None, None, None]).permute(0, 2, 3, 1).bfloat16()
    assert got.shape == (6, 3, 3, 5) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)
    assert sources(r) == ["conv.weight", *BN[:4]]
    assert sources(("fold_bn_bias", None, *BN)) == list(BN[:4])
    assert sources(None, "w") == ["w"] and sources(("concat", ("a", "b", "a"), 0)) == ["a", "b"]


def test_errors_name_the_problem():
    sd = bn_state()
    with pytest.raises(MissingWeightError, match=r"'bn.runing_var'.*close names: bn.running_var"):
        evaluate("w", ("fold_bn_weight", "conv.weight", *BN[:3], "bn.runing_var", 1e-5), sd)
    with pytest.raises(ArgumentError, match="unknown weight recipe 'flip'"):
        evaluate(None, ("flip", "conv.weight"), sd)
    with pytest.raises(ShapeError, match="not a permutation"):
        evaluate(None, ("transpose", "conv.weight", (0, 1)), sd)
    with pytest.raises(ShapeError, match="cannot reshape"):
        evaluate(None, ("reshape", "conv.weight", (7,)), sd)
    with pytest.raises(ShapeError, match="expected \\(6,\\)"):
        bad = ("fold_bn_weight", "conv.weight", "bn.weight", None, "bn.bias", "conv.weight", 1e-5)
        evaluate(None, bad, sd)
    with pytest.raises(ArgumentError, match="'fold_bn_bias' needs a tensor as argument 4"):
        evaluate(
            None, ("fold_bn_bias", None, "bn.weight", "bn.bias", None, "bn.running_var", 1e-5), sd
        )
    with pytest.raises(ShapeError, match="pair per axis"):
        evaluate(None, ("pad", "bn.weight", ((1, 1), (0, 0))), sd)


def test_register_new_op():
    recipes.register("double_it", lambda x: x * 2, (0,))
    try:
        sd = {"a": torch.randn(4)}
        torch.testing.assert_close(evaluate(None, ("cast", ("double_it", "a"), "float64"), sd),
                                   (sd["a"] * 2).double())  # fmt: skip
    finally:
        del recipes.OPS["double_it"]


def test_load_weights_from_state_dict_and_file(tmp_path):
    g = tiny_graph()
    sd = source_state()
    prog = StandInProgram(g, random_weights(g))
    got = load_weights(prog, sd)
    assert set(got) == {"fc.weight", "fc.bias", "scale"} and prog.weights is not sd
    torch.testing.assert_close(prog.weights["fc.weight"], sd["fc.weight_t"].T)
    assert prog.weights["scale"].dtype == torch.bfloat16
    path = tmp_path / "model.safetensors"
    save_file({**sd, "unused": torch.randn(2)}, str(path))
    prog2 = StandInProgram(g, random_weights(g))
    load_weights(prog2, path)
    for k in got:
        assert torch.equal(prog2.weights[k], got[k]), k


def test_load_weights_errors(tmp_path):
    g = tiny_graph()
    sd = source_state()
    prog = StandInProgram(g, random_weights(g))
    with pytest.raises(MissingWeightError, match="'fc.bias'.*needed by weight 'fc.bias'"):
        load_weights(prog, {k: v for k, v in sd.items() if k != "fc.bias"})
    path = tmp_path / "m.safetensors"
    save_file({k: v for k, v in sd.items() if k != "scale"}, str(path))
    with pytest.raises(MissingWeightError, match="'scale'"):
        load_weights(prog, path)
    with pytest.raises(ShapeError, match=r"weight 'fc.weight'.*\(9, 5\).*\(5, 8\)"):
        load_weights(prog, {**sd, "fc.weight_t": torch.randn(5, 9)})
    with pytest.raises(DTypeError, match="weight 'fc.bias'.*torch.float16.*final cast"):
        load_weights(prog, {**sd, "fc.bias": sd["fc.bias"].half()})
    with pytest.raises(ArgumentError, match="no file"):
        load_weights(prog, tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{bad json")
    with pytest.raises(ArgumentError, match="cannot read"):
        load_weights(prog, tmp_path / "junk.safetensors")


class ConvBnNet(torch.nn.Module):
    """conv -> BatchNorm -> ReLU -> linear: the compiler folds the BN into the conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4 * 5 * 6, 7)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def _randomize(m: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
        m.bn.running_mean.normal_()
        m.bn.running_var.uniform_(0.5, 2.0)
    return m.eval()


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_compiled_program_takes_new_weights(tmp_path, dtype):
    compiler = pytest.importorskip("kernforge.compiler")
    if not hasattr(compiler, "compile_model"):
        pytest.skip("kernforge.compiler.compile_model is not there yet")
    a, b = _randomize(ConvBnNet()), _randomize(ConvBnNet())
    x = torch.randn(2, 3, 5, 6)
    prog = compiler.compile_model(a, (x,), dtype=dtype, mode="numpy")
    xin = x  # the program casts at its boundary: it takes what the model takes
    first = lambda out: (out[0] if isinstance(out, list | tuple) else out).float()  # noqa: E731
    before = first(prog.run(xin, mode="numpy"))
    path = tmp_path / "b.safetensors"
    save_file(b.state_dict(), str(path))
    got = prog.load_weights(path)
    assert any("bn" in str(n.attrs.get("recipe")) for n in prog.graph.nodes if n.op == "weight")
    after = first(prog.run(xin, mode="numpy"))
    with torch.no_grad():
        want_a, want_b = a(x), b(x)
    tol = 2e-5 if dtype is None else 5e-2
    scale = want_b.abs().max()
    assert (before - want_a).abs().max() <= tol * want_a.abs().max()
    assert (after - want_b).abs().max() <= tol * scale, (after - want_b).abs().max()
    assert set(got) == set(prog.weights)
