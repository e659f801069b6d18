"""kernforge.tune.store: appending and reading measurements, several processes at once, a
damaged last line, and the tuner writing every timing it takes."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from dataclasses import dataclass

import pytest
import torch
import triton.testing

from kernforge import config, device, tune
from kernforge.tune import store
from kernforge.tune import tuner as tuner_mod

DEV = {"gpu": "FakeGPU", "arch": "sm_90", "triton": "3.6.0", "torch": "2.11.0"}


def _rec(i: int, ms: float | None = 1.0, arch: str = "sm_90") -> dict:
    return store.make_record("fam", "fam_t", "3", [i, 64, "bfloat16"], {"block": 32 + i}, ms,
                             "" if ms else "OutOfResources", features={"m": i},
                             dtype="bfloat16", device_id={**DEV, "arch": arch})  # fmt: skip


def test_append_then_load_round_trips_fields(cache):
    assert store.append("fam", [_rec(1, 0.5), _rec(2, None), _rec(3, 2.0, arch="sm_80")]) == 3
    got = store.load("fam")
    assert [r["key"][0] for r in got] == [1, 2, 3]
    first = got[0]
    assert first["ms"] == 0.5 and first["config"] == {"block": 33} and first["dtype"] == "bfloat16"
    assert first["source"] == "3" and first["gpu"] == "FakeGPU" and first["features"] == {"m": 1}
    assert got[1]["ms"] is None and "OutOfResources" in got[1]["error"]
    assert [r["key"][0] for r in store.load("fam", arch="sm_90")] == [1, 2]
    assert store.load("fam", arch="sm_80", version="3")[0]["key"][0] == 3
    assert store.kernels() == ["fam"]
    assert store.path("fam") == cache / "tune" / "measurements" / "fam.jsonl"
    best = store.best_by_key(got)
    assert best[json.dumps([1, 64, "bfloat16"], separators=(",", ":"))][0] == 0.5


def test_truncated_and_garbage_lines_are_skipped(cache):
    store.append("fam", [_rec(i) for i in range(4)])
    with open(store.path("fam"), "ab") as f:
        f.write(b'{"v": 1, "kernel": "fam", "config": {"blo')  # a writer killed mid-line
    assert len(store.load("fam")) == 4
    with open(store.path("fam"), "ab") as f:
        f.write(b"\n\x00\xff not json\n[1, 2]\n")
    store.append("fam", [_rec(9)])  # later appends still read
    assert [r["key"][0] for r in store.load("fam")] == [0, 1, 2, 3, 9]


def test_missing_store_reads_empty_and_bad_names_raise(cache):
    assert store.load("nothing") == []
    with pytest.raises(Exception, match="bad kernel name"):
        store.path("../escape")


def _writer(args):
    root, wid, n = args
    os.environ["KERNFORGE_CACHE_DIR"] = root
    config.reload()
    for i in range(n):
        # Long lines (several KiB) make interleaving visible if appends were not atomic.
        rec = _rec(wid * 1000 + i)
        rec["features"] = {"pad": "x" * 3000, "w": wid, "i": i}
        store.append("fam", [rec])


def test_concurrent_writers_never_interleave(cache):
    procs, n = 4, 60
    ctx = mp.get_context("spawn")
    with ctx.Pool(procs) as pool:
        pool.map(_writer, [(str(cache), w, n) for w in range(procs)])
    lines = store.path("fam").read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == procs * n + 1
    recs = store.load("fam")
    assert len(recs) == procs * n
    seen = {(r["features"]["w"], r["features"]["i"]) for r in recs}
    assert seen == {(w, i) for w in range(procs) for i in range(n)}


@dataclass(frozen=True)
class Cfg:
    block: int


def test_tuner_measure_appends_every_timing(cache, monkeypatch):
    monkeypatch.setattr(device, "INTERPRET", False)
    monkeypatch.setattr(device, "cuda_available", lambda: True)
    monkeypatch.setattr(tuner_mod, "_device_id", lambda: ["FakeGPU", "sm_90", "3.6.0", "2.11"])
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    cost = {Cfg(16): 2.0, Cfg(32): 1.0, Cfg(64): None}

    def fake_time(run, cfg):
        if cost[cfg] is None:
            raise RuntimeError("out of shared memory")
        return cost[cfg]

    monkeypatch.setattr(tuner_mod, "_time", fake_time)
    monkeypatch.setattr(triton.testing, "do_bench", lambda *a, **k: 1.0)
    t = tune.Tuner("t_store_only", list(cost), version="7")
    assert t.pick((128, 4096, torch.bfloat16), run=lambda c: None, default=Cfg(16)) == Cfg(32)
    recs = store.load("t_store_only")
    assert [(r["config"]["block"], r["ms"]) for r in recs] == [(16, 2.0), (32, 1.0), (64, None)]
    assert recs[2]["error"].startswith("RuntimeError")
    assert recs[0]["key"] == [128, 4096, "bfloat16"] and recs[0]["dtype"] == "bfloat16"
    assert recs[0]["version"] == "7" and recs[0]["arch"] == "sm_90"
    assert recs[0]["features"] == {"k0": 128, "k1": 4096}
