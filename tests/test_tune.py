"""kernforge.tune: measuring, remembering on disk, stale and corrupt entries, the CLI.

The tuner only measures on a GPU; here the GPU-facing calls (device checks, synchronize,
do_bench) are replaced by fakes whose "time" is a per-config number, so the bookkeeping runs
on the CPU.
"""

from __future__ import annotations

import json

import pytest
import torch

from kernforge import cli, config, device, tune
from kernforge.errors import ArgumentError
from kernforge.tune import tuner as tuner_mod
from tests.tune.fakes import CONFIGS, COST, Cfg, fake_gpu


@pytest.fixture
def gpu(monkeypatch, tmp_path):
    """Pretend to be on a GPU; do_bench returns the config's COST; calls are counted."""
    monkeypatch.setenv("KERNFORGE_CACHE_DIR", str(tmp_path))
    config.reload()
    yield fake_gpu(monkeypatch, ["FakeGPU", "sm_90", "3.6.0"], COST.__getitem__)
    monkeypatch.delenv("KERNFORGE_CACHE_DIR")
    config.reload()


def test_bucket():
    assert [tune.bucket(n) for n in (0, 1, 2, 3, 17, 128, 129)] == [1, 1, 2, 4, 32, 128, 256]


def test_interpreter_returns_default_without_running(monkeypatch):
    monkeypatch.setattr(device, "INTERPRET", True)  # as on a machine without a GPU
    t = tune.Tuner("t_interp", CONFIGS)
    ran = []
    assert t.pick((1, 2), run=ran.append, default=CONFIGS[2]) is CONFIGS[2]
    assert ran == []


def test_measures_once_then_remembers_across_processes(gpu):
    run_factory, calls = gpu
    t = tune.Tuner("t_mem", CONFIGS, version="1")
    key = (128, 4096, torch.bfloat16)
    assert t.pick(key, run_factory(), default=Cfg(32)) == Cfg(64)
    measured = len(calls)
    assert measured >= len(CONFIGS)
    assert t.pick(key, run_factory(), default=Cfg(32)) == Cfg(64)  # memory: nothing runs
    assert len(calls) == measured
    entry = json.loads(t.path(key).read_text())
    assert entry["config"] == {"block": 64, "warps": 4} and entry["ms"] == 1.5
    assert entry["ident"][-1] == [128, 4096, "bfloat16"]
    # A new process: a fresh tuner of the same name and version reads the disk, measures nothing.
    t2 = tune.Tuner("t_mem", CONFIGS, version="1")
    assert t2.pick(key, run_factory(), default=Cfg(32)) == Cfg(64)
    assert len(calls) == measured
    assert [e["kernel"] for e in tune.entries("t_mem")] == ["t_mem"]


def test_other_key_version_or_configs_remeasure(gpu):
    run_factory, calls = gpu
    t = tune.Tuner("t_ver", CONFIGS, version="1")
    t.pick((1,), run_factory(), default=Cfg(32))
    n = len(calls)
    t.pick((2,), run_factory(), default=Cfg(32))  # another key
    assert len(calls) > n
    n = len(calls)
    tune.Tuner("t_ver", CONFIGS, version="2").pick((1,), run_factory(), default=Cfg(32))
    assert len(calls) > n  # the kernel changed: old timings do not count
    n = len(calls)
    # The remembered config is no longer a candidate: stale, measured again.
    fewer = [c for c in CONFIGS if c != Cfg(64)]
    assert tune.Tuner("t_ver", fewer, version="2").pick((1,), run_factory(), Cfg(32)) == Cfg(128)
    assert len(calls) > n


@pytest.mark.parametrize("garbage", ["", "{", '{"ident": 1}', "[]"])
def test_corrupt_entry_is_remeasured(gpu, garbage):
    run_factory, calls = gpu
    t = tune.Tuner("t_bad", CONFIGS)
    t.pick((7,), run_factory(), default=Cfg(32))
    t.path((7,)).write_text(garbage)
    n = len(calls)
    assert tune.Tuner("t_bad", CONFIGS).pick((7,), run_factory(), default=Cfg(32)) == Cfg(64)
    assert len(calls) > n
    assert json.loads(t.path((7,)).read_text())["config"]["block"] == 64  # rewritten whole


def test_failing_configs_are_skipped_and_all_failing_gives_default(gpu):
    run_factory, _ = gpu
    t = tune.Tuner("t_fail", CONFIGS)
    assert t.pick((1,), run_factory(fail={Cfg(64)}), default=Cfg(32)) == Cfg(128)
    errors = [e for _, ms, e in json.loads(t.path((1,)).read_text())["timings"] if ms is None]
    assert errors == ["RuntimeError: out of shared memory"]
    assert t.pick((2,), run_factory(fail=set(CONFIGS)), default=Cfg(256, 8)) == Cfg(256, 8)
    assert not t.path((2,)).exists()


def test_off_uses_remembered_or_default(gpu, monkeypatch):
    run_factory, calls = gpu
    t = tune.Tuner("t_off", CONFIGS)
    t.pick((1,), run_factory(), default=Cfg(32))
    monkeypatch.setenv("KERNFORGE_TUNE", "off")
    config.reload()
    n = len(calls)
    fresh = tune.Tuner("t_off", CONFIGS)
    assert fresh.pick((1,), run_factory(), default=Cfg(32)) == Cfg(64)  # remembered
    assert fresh.pick((9,), run_factory(), default=Cfg(32)) == Cfg(32)  # never measured
    assert len(calls) == n
    monkeypatch.delenv("KERNFORGE_TUNE")


def test_forcing_remeasures(gpu):
    run_factory, calls = gpu
    t = tune.Tuner("t_force", CONFIGS)
    t.pick((1,), run_factory(), default=Cfg(32))
    n = len(calls)
    with tune.forcing():
        t.pick((1,), run_factory(), default=Cfg(32))
    assert len(calls) > n


def test_capture_does_not_measure(gpu, monkeypatch):
    run_factory, calls = gpu
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    t = tune.Tuner("t_cap", CONFIGS)
    assert t.pick((1,), run_factory(), default=Cfg(128)) == Cfg(128)
    assert calls == [] and not t.path((1,)).exists()


def test_bad_tuners_and_keys():
    with pytest.raises(ArgumentError, match="no candidate"):
        tune.Tuner("t_empty", [])
    with pytest.raises(ArgumentError, match="dataclasses of one type"):
        tune.Tuner("t_mixed", [Cfg(1), (1, 2)])
    with pytest.raises(ArgumentError, match="tune keys hold"):
        tune.Tuner("t_key", CONFIGS).path((object(),))


def test_cli_runs_registered_kernel_under_forcing(gpu, monkeypatch, capsys):
    run_factory, calls = gpu
    t = tune.Tuner("t_cli", CONFIGS)
    seen = []

    def run(shape, dtype):
        seen.append((shape, dtype, tuner_mod._force))
        t.pick(shape, run_factory(), default=Cfg(32))

    tune.register_cli("t_cli", run, "MxN")
    assert cli.main(["tune", "t_cli", "--shapes", "4x8,16x2", "--dtype", "float16"]) == 0
    assert seen == [((4, 8), torch.float16, True), ((16, 2), torch.float16, True)]
    assert cli.main(["tune", "--list"]) == 0
    out = capsys.readouterr().out
    assert "t_cli: shapes MxN" in out and "'block': 64" in out
    assert cli.main(["tune", "no_such_kernel"]) == 2
    with pytest.raises(SystemExit, match="bad shape"):
        cli.main(["tune", "t_cli", "--shapes", "4xq"])


def test_cli_needs_a_gpu(capsys, monkeypatch):
    monkeypatch.setattr(device, "INTERPRET", True)  # as on a machine without a GPU
    tune.register_cli("t_nogpu", lambda shape, dtype: None, "N")
    assert cli.main(["tune", "t_nogpu", "--shapes", "8"]) == 2
    assert "CUDA GPU" in capsys.readouterr().err
