"""kernforge.tune.model: training on a synthetic timing dataset whose best config depends on
the shape, held-out top-k accuracy, a model without shape features failing it, top-k
selection, the model file, and Tuner.measure measuring only the model's top-k."""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass

import pytest
import torch

from kernforge import config, device, tune
from kernforge.tune import model, space, store
from kernforge.tune import tuner as tuner_mod

pytest.importorskip("sklearn", reason="the model needs scikit-learn (pip install kernforge[tune])")

SMS = 8


@dataclass(frozen=True)
class Tile:
    block: int
    warps: int


SPACE = [Tile(b, w) for b in (16, 32, 64, 128, 256) for w in (1, 2, 4, 8)]


def true_ms(m: int, n: int, cfg: Tile) -> float:
    """Synthetic ground truth: tiles of ``block`` rows over SMS processors in waves (big
    tiles waste work on small m; small tiles pay per-tile overhead), warps help big tiles
    and cost small ones, plus a column term. The best block moves with m."""
    tiles = math.ceil(m / cfg.block)
    waves = math.ceil(tiles / SMS)
    per_tile = cfg.block * n * 1e-6 / min(cfg.warps, cfg.block / 16) + 0.004 * cfg.warps
    return waves * (per_tile + 0.02) + 0.01


def _features(key: tuple) -> dict:
    return {"m": key[0], "n": key[1]}


def _row(f: dict, c: dict) -> dict:
    tiles = math.ceil(f["m"] / c["block"])
    return {"log_m": math.log2(f["m"]), "log_n": math.log2(f["n"]), "block": c["block"],
            "warps": c["warps"], "tiles": tiles, "waves": math.ceil(tiles / SMS)}  # fmt: skip


def _blind_row(f: dict, c: dict) -> dict:  # the wrong features: no shape at all
    return {"block": c["block"], "warps": c["warps"]}


@pytest.fixture(autouse=True)
def _few_rounds(monkeypatch):
    # CI's two cores: fewer boosting rounds (the synthetic task needs no more).
    monkeypatch.setitem(model.PARAMS, "iterations", 100)
    monkeypatch.setitem(model.PARAMS, "learning_rate", 0.2)


SYN = space.Family("syn_tiles", lambda key: list(SPACE), _features, _row, Tile)
BLIND = space.Family("syn_blind", lambda key: list(SPACE), _features, _blind_row, Tile)
space.register(SYN, ("syn_tuner",))
space.register(BLIND)


def dataset(n_shapes: int, seed: int = 0, noise: float = 0.01) -> list[dict]:
    rng = random.Random(seed)
    recs = []
    shapes = {(rng.randint(8, 4096), rng.choice((256, 1024, 4096))) for _ in range(n_shapes)}
    for m, n in sorted(shapes):
        key = [m, n, "float16"]
        for cfg in SPACE:
            ms = true_ms(m, n, cfg) * (1 + noise * rng.random())
            dev = {"arch": "sm_90"}
            rec = store.make_record("syn_tiles", "syn_tuner", "1", key, asdict(cfg), ms,
                                    features=_features(key), device_id=dev)  # fmt: skip
            recs.append(rec)
    return recs


def test_best_config_depends_on_shape():
    best = {m: min(SPACE, key=lambda c: true_ms(m, 1024, c)) for m in (8, 100, 1000, 4000)}
    assert len({c.block for c in best.values()}) >= 3


def test_model_ranks_held_out_shapes():
    recs = dataset(60)
    cv = model.evaluate(SYN, k=5, folds=3, records=recs)
    assert cv["keys"] >= 50
    assert cv["hit_rate"] >= 0.9, cv
    assert cv["fraction_measured"] == pytest.approx(5 / len(SPACE))
    ho = model.holdout(SYN, k=5, records=recs)
    assert ho["hit_rate"] >= 0.9 and ho["train_keys"] > ho["keys"], ho


def test_model_without_shape_features_fails():
    recs = [dict(r, kernel="syn_blind") for r in dataset(60)]
    blind = model.evaluate(BLIND, k=1, folds=3, records=recs)
    good = model.evaluate(SYN, k=1, folds=3, records=recs)
    assert blind["hit_rate"] < 0.6 < good["hit_rate"], (blind, good)


def test_top_k_and_order_put_fast_configs_first():
    ds = model.Dataset.from_records(SYN, dataset(60))
    r = model.fit(SYN, ds, ds.trainable())
    for m in (20, 900, 3000):
        picked = model.top_k("syn_tuner", (m, 1024, "float16"), SPACE, 5, model=r)
        assert len(picked) == 5 and all(isinstance(c, Tile) for c in picked)
        best = min(true_ms(m, 1024, c) for c in SPACE)
        assert min(true_ms(m, 1024, c) for c in picked) <= best * 1.03
    # k beyond the space: everything, each once; no model: the candidates' own order.
    assert sorted(model.top_k("syn_tuner", (64, 256), SPACE, 99, model=r), key=str) == sorted(
        SPACE, key=str)  # fmt: skip
    assert model.top_k("syn_tuner", (64, 256), SPACE, 3) == SPACE[:3]


def test_failed_configs_rank_last():
    recs = dataset(30)
    for rec in recs:
        if rec["config"] == asdict(Tile(16, 1)):
            rec["ms"], rec["error"] = None, "OutOfResources"
    ds = model.Dataset.from_records(SYN, recs)
    r = model.fit(SYN, ds, ds.trainable())
    order = r.order({"m": 8, "n": 256}, [asdict(c) for c in SPACE])
    assert order[-1] == SPACE.index(Tile(16, 1))


def test_train_writes_record_and_corrupt_file_is_rebuilt(cache):
    store.append("syn_tiles", dataset(40))
    rec = model.train("syn_tiles", "sm_90")
    path = model.model_path("syn_tiles", "sm_90")
    assert json.loads(path.read_text())["keys"] == rec["keys"] >= 30
    assert rec["holdout"]["hit_rate"] >= 0.8
    path.write_text("{ not json")
    model._cache.clear()
    assert model.ranker("syn_tiles", "sm_90") is not None
    assert json.loads(path.read_text())["family"] == "syn_tiles"  # rewritten
    assert model.ranker("syn_tiles", "sm_80") is None  # never trained for that arch


def test_tuner_measures_only_top_k_with_a_model(cache, monkeypatch):
    monkeypatch.setattr(device, "INTERPRET", False)
    monkeypatch.setattr(device, "cuda_available", lambda: True)
    monkeypatch.setattr(device, "arch", lambda index=0: "sm_90")
    monkeypatch.setattr(tuner_mod, "_device_id", lambda: ["FakeGPU", "sm_90", "3.6.0", "2.11"])
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    timed: list[Tile] = []

    def fake_time(run, cfg):
        timed.append(cfg)
        return true_ms(cfg_m[0], 1024, cfg)

    cfg_m = [1000]
    monkeypatch.setattr(tuner_mod, "_time", fake_time)
    store.append("syn_tiles", dataset(60))
    short = [Tile(16, 1), Tile(256, 8)]
    t = tune.Tuner("syn_tuner", short, version="1")

    # Without a trained model: the short list, both measured.
    assert t.pick((1000, 1024, "float16"), run=lambda c: None, default=short[0]) in short
    assert timed == short
    # Trained: the model's top-k of the whole space, KERNFORGE_TUNE_TOPK of them.
    model.train("syn_tiles", "sm_90")
    monkeypatch.setenv("KERNFORGE_TUNE_TOPK", "3")
    config.reload()
    timed.clear()
    cfg_m[0] = 3000
    best = t.pick((3000, 1024, "float16"), run=lambda c: None, default=short[0])
    assert len(timed) == 3 and set(timed) <= set(SPACE)
    assert true_ms(3000, 1024, best) <= 1.03 * min(true_ms(3000, 1024, c) for c in SPACE)
    # The choice (possibly outside the short list) is remembered by a fresh tuner.
    t2 = tune.Tuner("syn_tuner", short, version="1")
    timed.clear()
    assert t2.pick((3000, 1024, "float16"), run=lambda c: None, default=short[0]) == best
    assert timed == []
    # KERNFORGE_TUNE_MODEL=off: the short list again.
    monkeypatch.setenv("KERNFORGE_TUNE_MODEL", "off")
    config.reload()
    t.pick((64, 1024, "float16"), run=lambda c: None, default=short[0])
    assert timed == short


def test_matmul_and_attention_spaces_are_wide_and_valid():
    mm = space.get("matmul_tma").candidates((4096, 4096, 4096, "bfloat16", 0, 1, 1, 0))
    assert len(mm) >= 50 and len(set(mm)) == len(mm)
    from kernforge.kernels import attention as A
    from kernforge.kernels import matmul as M

    assert set(M.TMA_CONFIGS) <= set(mm)
    assert all(space.matmul_smem(c) <= space.SMEM_LIMIT for c in mm if c not in M.TMA_CONFIGS)
    for d in (64, 128):
        key = space.attention_key(2, 32, 8, 1000, 1000, d, True, "bfloat16")
        att = space.get("attention_fwd").candidates(key)
        assert len(att) >= 50 and all(isinstance(c, A.FwdConfig) for c in att)
        assert all(space.attention_smem(c, d) <= space.SMEM_LIMIT for c in att)
        rows = [space.attention_row(space.attention_features(key), asdict(c)) for c in att]
        assert all(r["wave_eff"] <= 1 and r["pad_q"] <= 1 for r in rows)
    f = space.matmul_features((77, 4096, 14336, "bfloat16", 0, 1, 1, 0))
    row = space.matmul_row(f, asdict(mm[0]))
    assert row["log_tiles"] > 0 and row["log_m"] == pytest.approx(math.log2(77))
    assert 0 < row["pad_eff"] <= 1 and 0 < row["wave_eff"] <= 1
