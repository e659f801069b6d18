"""kernforge.tune.cache (``kernforge cache info|clear|prune``), stale and corrupt tune entries,
Triton's cache folder, and several processes writing entries at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from kernforge import cli, config, tune
from kernforge.cuda import cache as cubins
from kernforge.tune import cache
from kernforge.tune import tuner as tuner_mod
from tests.tune.fakes import fake_gpu


@dataclass(frozen=True)
class Cfg:
    block: int


CONFIGS = [Cfg(16), Cfg(32), Cfg(64)]
DEV = ["FakeGPU", "sm_90", "3.6.0", "2.11.0", "580.1"]


@pytest.fixture
def kfcache(monkeypatch, tmp_path):
    """An empty KERNFORGE_CACHE_DIR (Triton's cache under it) and a fake sm_90 GPU whose timing
    of a config is its block size."""
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    monkeypatch.setenv("KERNFORGE_CACHE_DIR", str(tmp_path / "kf"))
    config.reload()
    run_factory, calls = fake_gpu(monkeypatch, DEV, lambda c: float(c.block))
    yield tmp_path / "kf", run_factory(), calls
    monkeypatch.delenv("KERNFORGE_CACHE_DIR")
    config.reload()


def _fill(root: Path, run) -> dict[str, Path]:
    """One good entry per part, and the bad ones prune must remove."""
    t = tune.Tuner("t_cache", CONFIGS, version="2")
    for key in ((1,), (2,), (3,), (4,), (5,)):
        t.pick(key, run, Cfg(64))
    paths = {k: t.path((k,)) for k in (1, 2, 3, 4, 5)}
    good = paths[1]
    paths[2].write_text(paths[2].read_text()[:40])  # truncated JSON
    paths[3].write_bytes(b"\x00\xff\xfe garbage \x89PNG")  # garbage bytes
    foreign = json.loads(paths[4].read_text())
    foreign["ident"][3] = ["OtherGPU", "sm_80", "3.6.0", "2.11.0", "580.1"]  # foreign ident
    paths[4].write_text(json.dumps(foreign))
    old = json.loads(paths[5].read_text())
    old["ident"][0] = tuner_mod.FORMAT - 1  # an older entry format
    paths[5].write_text(json.dumps(old))
    tmp = root / "tune" / "t_cache" / ".x.json.123.tmp"  # an interrupted atomic write
    tmp.write_text("{")
    os.utime(tmp, (time.time() - 2 * cache.STALE_TMP_S,) * 2)
    (root / "tune" / "measurements").mkdir(parents=True, exist_ok=True)
    (root / "tune" / "measurements" / "matmul_tma.jsonl").write_text('{"v": 1}\n{"v": 1}\n')
    (root / "tune" / "models").mkdir(parents=True, exist_ok=True)
    (root / "tune" / "models" / "matmul-sm_90.json").write_text('{"model": 1}')
    (root / "jit").mkdir()
    (root / "jit" / "kabc.py").write_text("x = 1\n")
    key = "ab" + "0" * 62
    cubin = cubins.path_for(key)
    cubin.parent.mkdir(parents=True)
    cubin.write_bytes(cubins.encode(key, cubins.Entry(b"\x7fELF cubin")))
    bad_key = "cd" + "1" * 62
    bad = cubins.path_for(bad_key)
    bad.parent.mkdir(parents=True)
    bad.write_bytes(cubins.encode(bad_key, cubins.Entry(b"\x7fELF cubin"))[:-3])  # truncated
    tdir = config.triton_cache_dir()
    (tdir / "KGOOD").mkdir(parents=True)
    (tdir / "KGOOD" / "k.cubin").write_bytes(b"c")
    (tdir / "KGOOD" / "__grp__k.json").write_text("{}")
    (tdir / "KHALF").mkdir()
    (tdir / "KHALF" / "k.cubin").write_bytes(b"c")
    os.utime(tdir / "KHALF", (time.time() - 2 * cache.INCOMPLETE_TRITON_S,) * 2)
    return {"good": good, "cubin": cubin, "bad_cubin": bad, "tmp": tmp,
            **{f"bad{k}": paths[k] for k in (2, 3, 4, 5)}}  # fmt: skip


def test_triton_cache_follows_the_kernforge_cache_unless_set(kfcache, monkeypatch, tmp_path):
    root, _, _ = kfcache
    assert os.environ["TRITON_CACHE_DIR"] == str(root / "triton")
    assert config.triton_cache_dir() == root / "triton"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "mine"))
    config.reload()
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "mine")  # the user's choice stays
    assert config.triton_cache_dir() == tmp_path / "mine"


def test_info_counts_each_part(kfcache):
    root, run, _ = kfcache
    _fill(root, run)
    info = {r.part: r for r in cache.info()}
    assert info["tune"].entries == 5 and info["tune"].files == 6  # + the temporary file
    assert info["measurements"].entries >= 2  # + the store's lines of the measurements above
    assert info["jit"].entries == 1
    assert info["models"].files == 1
    assert info["cuda"].entries == 2
    assert info["triton"].entries == 2 and info["triton"].files == 3
    assert info["other"].files == 0
    assert all(r.bytes > 0 for r in info.values() if r.part != "other")


def test_prune_removes_stale_and_corrupt_only(kfcache):
    root, run, calls = kfcache
    files = _fill(root, run)
    dry = cache.prune(dry_run=True)
    assert files["bad2"].exists() and len(dry.removed) == 7
    report = cache.prune()
    removed = {Path(p) for p, _ in report.removed}
    expected = {files[k] for k in ("bad2", "bad3", "bad4", "bad5", "bad_cubin", "tmp")}
    assert removed == expected | {config.triton_cache_dir() / "KHALF"}
    whys = dict(report.removed)
    assert "corrupt" in whys[str(files["bad3"])] and "OtherGPU" in whys[str(files["bad4"])]
    for k in ("good", "cubin"):
        assert files[k].exists()
    assert (config.triton_cache_dir() / "KGOOD" / "__grp__k.json").exists()
    assert (root / "jit" / "kabc.py").exists()
    assert (root / "tune" / "models" / "matmul-sm_90.json").exists()
    assert cache.prune().removed == []  # nothing left to prune
    # The pruned keys are measured again, never trusted; the good one is not.
    n = len(calls)
    fresh = tune.Tuner("t_cache", CONFIGS, version="2")
    assert fresh.pick((1,), run, Cfg(64)) == Cfg(16) and len(calls) == n
    assert fresh.pick((3,), run, Cfg(64)) == Cfg(16) and len(calls) > n


def test_prune_drops_entries_of_an_older_tuner_version(kfcache):
    root, run, _ = kfcache
    tune.Tuner("t_bump", CONFIGS, version="1").pick((1,), run, Cfg(64))
    path = tune.Tuner("t_bump", CONFIGS, version="1").path((1,))
    tune.Tuner("t_bump", CONFIGS, version="2")  # the kernel changed since
    report = cache.prune()
    assert [Path(p) for p, _ in report.removed] == [path]
    assert "version '1'" in report.removed[0][1]


def test_garbage_entry_is_rebuilt_by_the_tuner(kfcache):
    root, run, calls = kfcache
    t = tune.Tuner("t_garbage", CONFIGS)
    t.pick((1,), run, Cfg(64))
    t.path((1,)).write_bytes(os.urandom(64))
    n = len(calls)
    assert tune.Tuner("t_garbage", CONFIGS).pick((1,), run, Cfg(64)) == Cfg(16)
    assert len(calls) > n
    assert json.loads(t.path((1,)).read_text())["config"] == {"block": 16}


def test_clear_and_the_cli(kfcache, capsys):
    root, run, _ = kfcache
    files = _fill(root, run)
    assert cli.main(["cache", "info"]) == 0
    out = capsys.readouterr().out
    assert "tune" in out and "triton" in out and str(root) in out
    assert cli.main(["cache", "clear", "--what", "tune"]) == 1  # no --yes: nothing deleted
    assert files["good"].exists()
    assert cli.main(["cache", "clear", "--what", "tune,nope", "--yes"]) == 2
    assert cli.main(["cache", "clear", "--what", "tune,jit", "--yes"]) == 0
    assert not files["good"].exists() and not (root / "jit" / "kabc.py").exists()
    assert files["cubin"].exists()  # other parts untouched
    assert (root / "tune" / "measurements" / "matmul_tma.jsonl").exists()
    assert cli.main(["cache", "prune", "--dry-run"]) == 0
    assert "would remove" in capsys.readouterr().out and files["bad_cubin"].exists()
    assert cli.main(["cache", "clear", "--yes"]) == 0
    assert sum(r.files for r in cache.info()) == 0


WRITER = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("fileio", sys.argv[1])
fileio = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fileio)
from pathlib import Path
shared, me = Path(sys.argv[2]), int(sys.argv[3])
for i in range(300):
    entry = {"ident": [2, "t", "1", ["G", "sm_90"], [i]], "config": {"block": me},
             "timings": [[{"block": j}, float(j), ""] for j in range(200)]}
    fileio.write_atomic(shared, json.dumps(entry, indent=1))
    fileio.write_atomic(shared.parent / f"own{me}_{i % 5}.json", json.dumps(entry))
"""


def test_several_processes_writing_entries_at_once(tmp_path):
    """Concurrent writers of one entry (and of their own): a reader always sees a whole entry,
    and no temporary file is left behind."""
    import kernforge.fileio

    shared = tmp_path / "tune" / "t" / "entry.json"
    shared.parent.mkdir(parents=True)
    shared.write_text(json.dumps({"config": {"block": -1}}))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, kernforge.fileio.__file__, str(shared), str(me)]
        )  # fmt: skip
        for me in range(4)
    ]
    reads = 0
    while any(p.poll() is None for p in procs):
        entry = json.loads(shared.read_text())  # never partial: raises if it were
        assert entry["config"]["block"] in (-1, 0, 1, 2, 3)
        reads += 1
    assert [p.returncode for p in procs] == [0, 0, 0, 0]
    assert reads > 0
    assert json.loads(shared.read_text())["config"]["block"] in (0, 1, 2, 3)
    names = sorted(p.name for p in shared.parent.iterdir())
    assert names == sorted(
        ["entry.json", *(f"own{m}_{i}.json" for m in range(4) for i in range(5))]
    )
