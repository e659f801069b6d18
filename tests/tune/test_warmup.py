"""kernforge warmup on the CPU: the jobs run through Triton's interpreter (there is nothing to
compile here), in spawned worker processes or in this one, and the report says what ran."""

from __future__ import annotations

import pytest
import torch

from kernforge import cli, llm
from kernforge.errors import ArgumentError
from kernforge.tune import warmup as wu


def test_cli_warms_an_op_list_in_two_worker_processes(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("KERNFORGE_CACHE_DIR", str(tmp_path))
    rc = cli.main(["warmup", "--ops", "rms_norm,silu_and_mul", "--shapes", "3x40",
                   "--dtype", "float16", "--jobs", "2"])  # fmt: skip
    out = capsys.readouterr()
    assert rc == 0, out
    assert "2/2 jobs" in out.out and "2 worker processes" in out.out
    assert "CPU interpreter" in out.out
    assert "rms_norm 3x40" in out.out and "(rms_norm:triton)" in out.out
    assert "silu_and_mul 3x40" in out.out and "(silu_and_mul:triton)" in out.out
    assert "warmup [" in out.err  # the progress bar


def test_in_process_jobs_report_each_op_and_failures():
    jobs = wu.op_jobs(["rms_norm", "silu_and_mul"], [(5, 24)], "float16", on_gpu=False)
    jobs.append(wu.Job("op", "rms_norm", (5,), "float16"))  # a bad shape: reported, not raised
    report = wu.warmup(jobs, workers=0, progress=False)
    assert [r.job.label() for r in report.results] == [
        "rms_norm 5x24", "silu_and_mul 5x24", "rms_norm 5"]  # fmt: skip
    assert report.results[0].backends == ["rms_norm:triton"]
    assert report.results[1].backends == ["silu_and_mul:triton"]
    assert not report.results[0].error and not report.results[1].error
    assert "ROWSxHIDDEN" in report.results[2].error
    assert not report.ok and report.interpret and report.workers == 0
    before, after = report.triton_kernels
    assert after == before  # the interpreter compiles nothing
    assert "FAILED" in report.summary()


def test_unknown_op_and_gpu_only_ops():
    with pytest.raises(ArgumentError, match="unknown op"):
        wu.op_jobs(["no_such_op"], None, "float16", on_gpu=False)
    assert wu.op_jobs(["fp8_matmul"], None, "bfloat16", on_gpu=False) == []
    assert len(wu.op_jobs(["fp8_matmul", "matmul"], None, "bfloat16", on_gpu=True)) == 5
    with pytest.raises(ArgumentError, match="BATCHxPROMPT_TOKENS"):
        wu.model_jobs("random:tiny", [(1, 2, 3)], "float32")


def test_model_warmup_runs_prefill_and_decode_and_llm_hook(monkeypatch):
    model = llm.LLM("random:tiny", max_seq_len=64)
    report = llm.warmup(model, shapes=[(2, 5)], workers=0)
    assert report.ok, report.summary()
    ran = report.results[0]
    assert ran.job.label() == "batch x prompt 2x5" and ran.job.llm == (("max_seq_len", 64),)
    for op in ("fused_linear:triton", "rms_norm:triton", "swiglu:triton",
               "rope_append_fmha_decode:triton"):  # fmt: skip
        assert op in ran.backends
    assert any(b.startswith("fmha_varlen:") for b in ran.backends)  # the prefill ran too
    # LLM(..., warmup=N) warms up at load with N workers.
    seen = []
    monkeypatch.setattr(wu, "warmup_llm", lambda m, workers=None, progress=True: seen.append(
        (m.name, workers)) or "report")  # fmt: skip
    loaded = llm.LLM("random:tiny", max_seq_len=64, warmup=3)
    assert seen == [("random:tiny", 3)] and loaded.warmup_report == "report"
    assert llm.LLM("random:tiny", max_seq_len=64).warmup_report is None
    assert torch.is_tensor(loaded.decoder.weights.embed)
