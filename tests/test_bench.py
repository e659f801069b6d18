"""The benchmark harness, `kernforge bench` and `kernforge info` (small shapes, any machine)."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch

from kernforge import cli, device
from kernforge.bench import FAMILIES, cases_for, run_cases, write_results
from kernforge.bench.harness import environment, table
from kernforge.progress import Progress


def test_families_and_case_counts():
    assert set(FAMILIES) == {"rms_norm", "layer_norm", "softmax", "glu", "rope"}
    full = cases_for(on_gpu=True, with_compile=False)
    # ops x 2 shapes x 2 directions: rms_norm has 2 ops, softmax 2, the others 1.
    assert len(full) == (2 + 1 + 2 + 1 + 1) * 2 * 2
    assert {c.shape for c in full} == {(32768, 4096), (4096, 14336)}
    assert all(c.dtype == torch.bfloat16 for c in full)
    assert {c.target_tbs for c in full if c.direction == "fwd"} == {2.7}
    assert {c.target_tbs for c in full if c.direction == "bwd"} == {2.4}
    quick = cases_for(["rms_norm"], quick=True, on_gpu=True)
    assert len(quick) == 2 and all(c.direction == "fwd" for c in quick)


def test_bytes_counted():
    by_op = {(c.op, c.direction, c.shape): c.nbytes for c in cases_for(on_gpu=True)}
    m, n = 32768, 4096
    assert by_op[("rms_norm", "fwd", (m, n))] == 2 * m * n * 2
    assert by_op[("rms_norm", "bwd", (m, n))] == 3 * m * n * 2
    assert by_op[("silu_and_mul", "fwd", (m, n))] == 3 * m * n * 2
    assert by_op[("silu_and_mul", "bwd", (m, n))] == 5 * m * n * 2
    assert by_op[("rope", "fwd", (m, n))] == 4 * m * n * 2 + 2 * m * 128 * 2


def test_unknown_family_is_an_error():
    with pytest.raises(ValueError, match="unknown benchmark families"):
        cases_for(["nope"])


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_runs_and_agrees_with_torch(family):
    cases = cases_for([family], on_gpu=False, with_compile=False)
    results, copy_tbs = run_cases(cases, on_gpu=False, copy_tbs=1.0)
    assert copy_tbs == 1.0 and len(results) == len(cases)
    for r in results:
        assert not r.error, r.error
        assert r.rel_err < 2e-2, (r.op, r.direction, r.rel_err)
        assert set(r.ms) == {"kernforge", "torch"} and all(v > 0 for v in r.ms.values())
        assert r.meets_target is None  # no verdict off the GPU


def test_compile_reference_forward_and_backward():
    """The torch.compile reference builds and can be timed repeatedly, backward included."""
    cases = cases_for(["rms_norm"], on_gpu=False, with_compile=True)[:2]
    results, _ = run_cases(cases, on_gpu=False, with_compile=True, copy_tbs=1.0)
    for r in results:
        assert not r.error, r.error
        assert set(r.ms) == {"kernforge", "torch", "torch.compile"}


def test_write_results(tmp_path):
    cases = cases_for(["rms_norm"], quick=True, on_gpu=False)
    results, copy_tbs = run_cases(cases, on_gpu=False)
    env = environment(copy_tbs, on_gpu=False)
    paths = write_results("rms_norm", results, env, tmp_path, notes="a note")
    names = {p.name for p in paths}
    assert {"rms_norm.json", "rms_norm.md"} <= names
    data = json.loads((tmp_path / "rms_norm.json").read_text())
    assert data["family"] == "rms_norm" and data["notes"] == "a note"
    assert len(data["results"]) == len(cases)
    assert data["environment"]["device"]["arch"] == device.describe()["arch"]
    md = (tmp_path / "rms_norm.md").read_text()
    assert "NOT performance" in md and "rms_norm fwd [64x256] bfloat16" in md
    pytest.importorskip("matplotlib")
    assert (tmp_path / "rms_norm.png").stat().st_size > 1000


def test_table_marks_errors():
    cases = cases_for(["glu"], quick=True, on_gpu=False)
    results, _ = run_cases(cases, on_gpu=False, copy_tbs=1.0)
    results[0].error = "RuntimeError: boom"
    assert "error: RuntimeError: boom" in table(results, on_gpu=False)


def test_cli_bench_quick(tmp_path, capsys):
    assert cli.main(["bench", "softmax", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "softmax fwd" in out
    assert ("NOT performance" in out) != torch.cuda.is_available()
    assert (tmp_path / "softmax.json").exists() and (tmp_path / "softmax.md").exists()


def test_render_rewrites_markdown_from_json(tmp_path, capsys):
    assert cli.main(["bench", "glu", "--quick", "--out", str(tmp_path)]) == 0
    (tmp_path / "glu.md").unlink()
    assert cli.main(["bench", "glu", "--render", "--out", str(tmp_path)]) == 0
    assert "silu_and_mul fwd" in (tmp_path / "glu.md").read_text()


def test_verdicts():
    from kernforge.bench.harness import Result, verdict

    def result(kf, compile_, frac, target=2.7):
        return Result("f", "op", "fwd", [1], "bf16", 1, tbs={"kernforge": kf},
                      vs={"torch.compile": kf / compile_}, frac_of_copy=frac,
                      target_tbs=target, meets_target=False)  # fmt: skip

    assert verdict(result(2.9, 2.8, 0.96)) == "met"
    assert verdict(result(2.95, 2.97, 0.98)).startswith("tie")
    assert verdict(result(2.8, 2.9, 0.93)) == "MISSED: 0.966x compile"
    assert verdict(result(2.2, 1.5, 0.73)) == "MISSED: 0.50 TB/s under 2.7"


def test_cli_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for word in ["torch:", "triton:", "backend in force", "rms_norm: torch, triton"]:
        assert word in out


def test_cli_rejects_unknown_family():
    with pytest.raises(ValueError, match="unknown benchmark families"):
        cli.main(["bench", "nope", "--quick"])


def test_progress_bar_lines():
    stream = io.StringIO()
    with Progress(3, "work", stream=stream) as bar:
        for label in ["a", "b", "c"]:
            bar.step(label)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3 and "1/3" in lines[0] and lines[-1].startswith("work [" + "#" * 24)


def test_speedup_bars_flops_table_and_family_bars(tmp_path):
    from kernforge.bench.harness import Bar, Result, geomean, load_results, table, verdict

    def result(kf_ms, ref_ms, least):
        flops = 2 * 64**3
        ms = {"kernforge": kf_ms, "torch": ref_ms, "torch_loop": 4 * ref_ms}
        return Result("gemm", "matmul", "fwd", [64, 64, 64], "bfloat16", 1, ms=ms,
                      tbs={n: 1e-9 / m for n, m in ms.items()}, flops=flops,
                      tflops={n: flops / (m * 1e-3) / 1e12 for n, m in ms.items()},
                      vs={n: m / kf_ms for n, m in ms.items() if n != "kernforge"},
                      target_vs={"torch": least}, meets_target=False)  # fmt: skip

    fast, slow = result(1.0, 1.0, 0.95), result(2.0, 1.0, 0.95)
    assert verdict(fast) == "met"
    assert verdict(slow) == "MISSED: 0.500x torch < 0.95x"
    text = table([fast, slow], on_gpu=True)
    head = text.splitlines()[0]
    assert "kernforge TFLOP/s" in head and "x torch_loop" in head and "% copy" not in head
    assert "| 0.000524 |" in text  # 2*64^3 flops in 1 ms, in TFLOP/s
    assert abs(geomean([2.0, 0.5]) - 1.0) < 1e-12 and math.isnan(geomean([]))
    bars = [Bar("geomean x torch", 0.75, 1.0), Bar("x loop", 4.0, 2.0)]
    assert [b.met for b in bars] == [False, True]
    env = environment(1.0, on_gpu=False)
    write_results("gemm", [fast, slow], env, tmp_path, "", bars)
    payload = json.loads((tmp_path / "gemm.json").read_text())
    assert [b["met"] for b in payload["bars"]] == [False, True]
    assert "| geomean x torch | 0.75x | 1x | MISSED |" in (tmp_path / "gemm.md").read_text()
    _, loaded, _ = load_results(tmp_path / "gemm.json")
    assert loaded[1].tflops == slow.tflops and loaded[1].target_vs == {"torch": 0.95}
