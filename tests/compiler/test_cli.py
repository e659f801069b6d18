"""``kernforge compile / run / inspect``: the argument helpers alone, then a tiny model
compiled from a factory in a test module file, run and inspected (needs the compiler)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from kernforge import cli
from kernforge.cli_model import _shapes, load_factory, random_inputs
from kernforge.errors import ArgumentError

MODELS = Path(__file__).with_name("cli_models.py")


def test_shapes():
    assert _shapes(["1x3x224x224"]) == [(1, 3, 224, 224)]
    assert _shapes(["2x8,4", "7"]) == [(2, 8), (4,), (7,)]
    assert _shapes(None) == []
    for bad in ["2x", "axb", "2*3", "", "-1x2"]:
        with pytest.raises(ArgumentError, match="bad input shape"):
            _shapes([bad])


def test_load_factory_from_file_and_module():
    fn = load_factory(f"{MODELS}:tiny_mlp")
    assert isinstance(fn(), torch.nn.Sequential)
    assert load_factory("tests.compiler.cli_models:tiny_mlp")().__class__ is torch.nn.Sequential
    with pytest.raises(ArgumentError, match="MODULE:FACTORY"):
        load_factory("no_colon")
    with pytest.raises(ArgumentError, match="no callable 'nope'"):
        load_factory(f"{MODELS}:nope")
    with pytest.raises(ArgumentError, match="cannot import module"):
        load_factory("tests.compiler.no_such_module:f")
    with pytest.raises(ArgumentError, match="no Python file"):
        load_factory("missing_file.py:f")


def test_random_inputs():
    xs = random_inputs([(2, 3), (4,)], ["bfloat16", "int64"], seed=1, int_high=7)
    assert xs[0].dtype == torch.bfloat16 and xs[0].shape == (2, 3) and xs[0].std() > 0
    assert xs[1].dtype == torch.int64 and xs[1].min() >= 0 and xs[1].max() < 7
    again = random_inputs([(2, 3), (4,)], ["bfloat16", "int64"], seed=1, int_high=7)
    assert torch.equal(again[0], xs[0]) and torch.equal(again[1], xs[1])
    with pytest.raises(ArgumentError, match="unknown input dtype"):
        random_inputs([(2,)], ["float99"])
    with pytest.raises(ArgumentError, match="one per input"):
        random_inputs([(2,), (3,), (4,)], ["float32", "int64"])


def test_bad_target_is_a_clear_error(tmp_path, capsys):
    rc = cli.main(["compile", f"{MODELS}:not_a_model", "--input-shape", "2x8", "-o",
                   str(tmp_path / "m.kf")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "returned a int, not a torch.nn.Module" in err
    rc = cli.main(["compile", f"{MODELS}:tiny_mlp", "--input-shape", "2x", "-o",
                   str(tmp_path / "m.kf")])  # fmt: skip
    assert rc == 2 and "bad input shape" in capsys.readouterr().err
    assert cli.main(["inspect", str(tmp_path / "nothing.kf")]) == 2
    assert "no saved program" in capsys.readouterr().err


def _need_compiler():
    compiler = pytest.importorskip("kernforge.compiler")
    if not hasattr(compiler, "compile_model"):
        pytest.skip("kernforge.compiler.compile_model is not there yet (C1)")
    pytest.importorskip("kernforge.runtime.model")


@pytest.mark.parametrize("mode", ["numpy", "interpret"])
def test_compile_run_inspect(tmp_path, capsys, mode):
    _need_compiler()
    out = tmp_path / "mlp.kf"
    rc = cli.main(["compile", f"{MODELS}:tiny_mlp", "--input-shape", "2x8", "-o", str(out),
                   "--mode", mode, "--check"])  # fmt: skip
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert out.is_file() and "compile [" in cap.err  # the progress bar
    err = float(re.search(r"relative error against eager torch: (\S+)", cap.out).group(1))
    assert err < 1e-4
    rc = cli.main(["run", str(out), "--mode", mode, "--repeat", "2"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert re.search(r"output 0: float32\[2, 3\] mean \S+ std \S+", cap.out)
    assert re.search(rf"mode {mode}: first call [\d.]+ ms, median of 2 calls", cap.out)
    rc = cli.main(["inspect", str(out), "--graph"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "kernforge.program/1 program" in cap.out and "inputs: float32[2,8]" in cap.out
    assert "graph " in cap.out and "weight(" in cap.out
    # the saved program computes what the model does
    from kernforge.runtime.archive import load

    prog = load(out)
    x = torch.randn(2, 8)
    with torch.no_grad():
        want = load_factory(f"{MODELS}:tiny_mlp")()(x)
    got = prog.run(x, mode="numpy")
    got = got[0] if isinstance(got, list | tuple) else got
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
