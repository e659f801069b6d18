"""kernforge.tune.pretuned: the shipped per-arch table, its place in Tuner.pick, and export.

The tuner measures only on a GPU; as in tests/test_tune.py the GPU-facing calls are faked (each
config's "time" is a number) so the bookkeeping runs on the CPU.
"""

from __future__ import annotations

import json

import pytest
import torch

from kernforge import cli, config, device, tune
from kernforge.tune import pretuned
from kernforge.tune import tuner as tuner_mod
from tests.tune.fakes import CONFIGS, COST, Cfg, fake_gpu

DEV = ["FakeGPU", "sm_90", "3.6.0", "2.11.0", "580.1"]


@pytest.fixture
def gpu(monkeypatch, tmp_path):
    """A fake sm_90 GPU, a temporary cache, and a temporary shipped-table folder."""
    monkeypatch.setenv("KERNFORGE_CACHE_DIR", str(tmp_path / "cache"))
    config.reload()
    tables = tmp_path / "tables"
    tables.mkdir()
    monkeypatch.setattr(pretuned, "TABLE_DIR", tables)
    pretuned.clear_memo()
    run_factory, calls = fake_gpu(monkeypatch, DEV, COST.__getitem__)
    yield run_factory(), calls, tables
    monkeypatch.delenv("KERNFORGE_CACHE_DIR")
    config.reload()
    pretuned.clear_memo()


def _table(tables, tuners: dict, arch: str = "sm_90"):
    data = {"format": pretuned.TABLE_FORMAT, "arch": arch, "tuners": tuners}
    (tables / f"{arch}.json").write_text(json.dumps(data))
    pretuned.clear_memo()


def test_table_hit_measures_nothing_and_matches_the_bucket(gpu):
    run, calls, tables = gpu
    # The table holds the 4096-row bucket; a call with 3000 rows buckets to it at the call site.
    _table(tables, {"t_hit": {"version": "3", "entries": [
        {"key": [4096, 4096, "bfloat16"], "config": {"block": 256, "warps": 8}}]}})  # fmt: skip
    t = tune.Tuner("t_hit", CONFIGS, version="3")
    before = tune.stats["pretuned"]
    key = (tune.bucket(3000), 4096, torch.bfloat16)  # dtype objects match their names
    assert t.pick(key, run, default=Cfg(32)) == Cfg(256, 8)
    assert calls == [] and tune.stats["pretuned"] == before + 1
    assert not t.path(key).exists()  # the table is not copied to disk
    # Another bucket, or another dtype, is not in the table: measured.
    assert t.pick((tune.bucket(5000), 4096, torch.bfloat16), run, default=Cfg(32)) == Cfg(64)
    assert len(calls) >= len(CONFIGS)


def test_older_version_or_config_not_offered_is_ignored(gpu):
    run, calls, tables = gpu
    _table(tables, {
        "t_old": {"version": "1", "entries": [{"key": [1], "config": {"block": 256, "warps": 8}}]},
        "t_gone": {"version": "1", "entries": [{"key": [1], "config": {"block": 512, "warps": 8}}]},
    })  # fmt: skip
    assert tune.Tuner("t_old", CONFIGS, version="2").pick((1,), run, Cfg(32)) == Cfg(64)
    n = len(calls)
    assert n >= len(CONFIGS)  # measured: the table was for version 1
    assert tune.Tuner("t_gone", CONFIGS, version="1").pick((1,), run, Cfg(32)) == Cfg(64)
    assert len(calls) > n  # measured: block 512 is no longer a candidate


def test_disk_entry_wins_over_table_and_switch_off(gpu, monkeypatch):
    run, calls, tables = gpu
    t = tune.Tuner("t_order", CONFIGS)
    t.pick((7,), run, Cfg(32))  # measured here: Cfg(64) remembered on disk
    _table(tables, {"t_order": {"version": "1", "entries": [
        {"key": [7], "config": {"block": 128, "warps": 4}},
        {"key": [8], "config": {"block": 128, "warps": 4}}]}})  # fmt: skip
    n = len(calls)
    fresh = tune.Tuner("t_order", CONFIGS)
    assert fresh.pick((7,), run, Cfg(32)) == Cfg(64)  # disk first
    assert fresh.pick((8,), run, Cfg(32)) == Cfg(128)  # then the table
    assert len(calls) == n
    monkeypatch.setenv("KERNFORGE_PRETUNED", "0")
    monkeypatch.setenv("KERNFORGE_TUNE", "off")
    config.reload()
    assert tune.Tuner("t_order", CONFIGS).pick((8,), run, Cfg(32)) == Cfg(32)  # default
    monkeypatch.delenv("KERNFORGE_TUNE")
    monkeypatch.delenv("KERNFORGE_PRETUNED")


def test_table_used_with_tuning_off_and_not_under_the_interpreter(gpu, monkeypatch):
    run, calls, tables = gpu
    _table(tables, {"t_off": {"version": "1", "entries": [
        {"key": [1], "config": {"block": 128, "warps": 4}}]}})  # fmt: skip
    monkeypatch.setenv("KERNFORGE_TUNE", "off")
    config.reload()
    assert tune.Tuner("t_off", CONFIGS).pick((1,), run, Cfg(32)) == Cfg(128)
    monkeypatch.delenv("KERNFORGE_TUNE")
    monkeypatch.setattr(device, "INTERPRET", True)
    assert tune.Tuner("t_off", CONFIGS).pick((1,), run, Cfg(32)) == Cfg(32)
    assert calls == []
    assert pretuned.lookup("cpu", "t_off", "1", [1]) is None


@pytest.mark.parametrize("text", ["", "{", '{"format": 99, "tuners": {}}', "[]", "\xff\xfe"])
def test_broken_table_is_ignored_with_a_warning(gpu, text):
    run, calls, tables = gpu
    (tables / "sm_90.json").write_text(text)
    pretuned.clear_memo()
    with pytest.warns(UserWarning, match="pre-tuned table"):
        assert tune.Tuner("t_broken", CONFIGS).pick((1,), run, Cfg(32)) == Cfg(64)
    assert len(calls) >= len(CONFIGS)


def test_export_round_trip_merges_and_drops_stale(gpu, monkeypatch):
    run, calls, tables = gpu
    out = tables / "sm_90.json"
    _table(tables, {
        "t_keep": {"version": "1", "entries": [{"key": [5], "config": {"block": 32, "warps": 4}}]},
        "t_exp": {"version": "0", "entries": [{"key": [9], "config": {"block": 32, "warps": 4}}]},
    })  # fmt: skip
    t = tune.Tuner("t_exp", CONFIGS, version="1")
    for key in ((1, torch.float16), (2, torch.float16)):
        t.pick(key, run, Cfg(32))
    # An entry measured on another arch is not exported into sm_90's table.
    monkeypatch.setattr(tuner_mod, "_device_id", lambda: ["OtherGPU", "sm_80", *DEV[2:]])
    t._memo.clear()
    t.pick((3, torch.float16), run, Cfg(32))
    monkeypatch.setattr(tuner_mod, "_device_id", lambda: list(DEV))
    path, changed = pretuned.export("sm_90", out, versions={"t_exp": "1", "t_keep": "1"})
    assert (path, changed) == (out, 2)
    data = pretuned.read_table(out)
    assert data["tuners"]["t_keep"]["entries"][0]["key"] == [5]  # merged, kept
    exp = data["tuners"]["t_exp"]
    assert exp["version"] == "1"  # version 0's entry dropped
    assert [e["key"] for e in exp["entries"]] == [[1, "float16"], [2, "float16"]]
    assert all(e["config"] == {"block": 64, "warps": 4} for e in exp["entries"])
    # A fresh install: nothing on disk, the exported table answers without measuring.
    for p in (config.settings.cache_dir / "tune").rglob("*.json"):
        p.unlink()
    n = len(calls)
    fresh = tune.Tuner("t_exp", CONFIGS, version="1")
    assert fresh.pick((2, torch.float16), run, Cfg(32)) == Cfg(64)
    assert len(calls) == n
    assert pretuned.size(out) == {"t_exp": 2, "t_keep": 1}


def test_cli_export(gpu, capsys):
    run, calls, tables = gpu
    t = tune.Tuner("t_cli_exp", CONFIGS)
    t.pick((4,), run, Cfg(32))
    target = tables / "custom.json"
    assert cli.main(["tune", "--export", "--arch", "sm_90", "-o", str(target)]) == 0
    assert "t_cli_exp" in capsys.readouterr().out
    assert json.loads(target.read_text())["tuners"]["t_cli_exp"]["entries"][0]["key"] == [4]


def test_shipped_table_is_a_valid_table_of_current_tuners():
    import kernforge  # noqa: F401  (registers the catalog's tuners)

    path = pretuned.TABLE_DIR / "sm_90.json"
    data = pretuned.read_table(path)
    assert data is not None and data["arch"] == "sm_90"
    for name, part in data["tuners"].items():
        owner = tuner_mod._TUNERS.get(name)
        assert owner is not None, f"{path}: no tuner {name!r} in the catalog"
        if owner.version != part["version"]:
            continue  # ignored at run time; regenerate with benchmarks/pretune.py
        for e in part["entries"]:
            assert owner._config_of(e["config"]) is not None, (name, e)
            assert isinstance(e["key"], list)
