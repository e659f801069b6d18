"""The learned performance model: rank a kernel's candidate configs for a shape without
running them, so tuning measures a few instead of all.

Per (kernel family, arch) a gradient-boosted regressor (scikit-learn's
``HistGradientBoostingRegressor``, else xgboost's ``XGBRegressor``; both optional:
``pip install kernforge[tune]``) learns log(time) from the family's model inputs (shape and
config features, :mod:`kernforge.tune.space`). The target is centred per key (minus the
median log time of that key's measurements): ranking the configs of one key needs only their
relative times, and the regressor's capacity then goes to what separates configs rather than
to how long a shape takes. Keys with fewer than :data:`MIN_PER_KEY` successful measurements
(a pruned tuning's top-k) are left out of training.

Nothing is pickled. The model is retrained from the measurement store when a process first
needs it (a second or two for thousands of measurements); ``kernforge tune --model train``
writes ``KERNFORGE_CACHE_DIR/tune/models/<family>-<arch>.json``, a JSON record of the training
(records, keys, held-out accuracy) whose presence turns pruned tuning on for that family. A
file that does not parse is rebuilt (retrained and rewritten).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
import zlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import config
from ..fileio import write_atomic
from . import space, store

#: Model file format.
FORMAT = 1
#: A key's measurements train the model only when at least this many configs succeeded.
MIN_PER_KEY = 8
#: Fewest training keys for a model.
MIN_KEYS = 4
#: A candidate within this factor of the best measured time is a hit.
HIT_TOLERANCE = 1.03
#: Boosting rounds and step of the regressor (tests use fewer rounds: CI's CPUs are slow).
PARAMS = {"iterations": 400, "learning_rate": 0.08}


def backend_name() -> str | None:
    """The regressor library that is installed ("sklearn" or "xgboost"), else None."""
    try:
        import sklearn.ensemble  # noqa: F401

        return "sklearn"
    except ImportError:
        pass
    try:
        import xgboost  # noqa: F401

        return "xgboost"
    except ImportError:
        return None


def available() -> bool:
    """A regressor library is installed (scikit-learn or xgboost)."""
    return backend_name() is not None


def _regressor(seed: int = 0):
    name = backend_name()
    if name == "sklearn":
        from sklearn.ensemble import HistGradientBoostingRegressor

        return HistGradientBoostingRegressor(
            max_iter=PARAMS["iterations"], learning_rate=PARAMS["learning_rate"],
            max_leaf_nodes=31, min_samples_leaf=4, random_state=seed,
        )  # fmt: skip
    if name == "xgboost":
        from xgboost import XGBRegressor

        return XGBRegressor(n_estimators=PARAMS["iterations"], max_depth=6, subsample=0.9,
                            learning_rate=PARAMS["learning_rate"], random_state=seed,
                            n_jobs=2)  # fmt: skip
    from ..errors import UnsupportedError

    raise UnsupportedError(
        "kernforge.tune.model needs scikit-learn or xgboost; pip install kernforge[tune]"
    )


def _cfg_text(cfg: dict) -> str:
    return json.dumps(cfg, sort_keys=True, separators=(",", ":"))


def _key_text(key: Any) -> str:
    return json.dumps(key, separators=(",", ":"))


@dataclass
class Dataset:
    """Measurements grouped by key: ``keys[i]`` -> {config text: median ms or None}."""

    family: space.Family
    keys: list[str] = field(default_factory=list)
    features: dict[str, dict] = field(default_factory=dict)
    times: dict[str, dict[str, float | None]] = field(default_factory=dict)
    configs: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def from_records(cls, family: space.Family, records: Sequence[dict]) -> Dataset:
        """Group store records by key (repeated measurements: their median; a config that
        ever succeeded on a key counts as successful there)."""
        ds = cls(family)
        raw: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
        for rec in records:
            k = _key_text(rec["key"])
            if k not in ds.features:
                ds.features[k] = rec.get("features") or family.features(tuple(rec["key"]))
                ds.keys.append(k)
            c = _cfg_text(rec["config"])
            ds.configs.setdefault(c, rec["config"])
            raw[k][c].append(rec.get("ms"))
        for k in ds.keys:
            ds.times[k] = {}
            for c, vals in raw[k].items():
                ok = [v for v in vals if v is not None and v > 0]
                ds.times[k][c] = statistics.median(ok) if ok else None
        return ds

    def trainable(self) -> list[str]:
        """Keys with at least :data:`MIN_PER_KEY` successful configs."""
        return [k for k in self.keys if sum(v is not None for v in self.times[k].values())
                >= MIN_PER_KEY]  # fmt: skip

    def best(self, k: str) -> float:
        """The best measured ms of key ``k``."""
        return min(v for v in self.times[k].values() if v is not None)


def _matrix(family: space.Family, rows: list[dict[str, float]], names: list[str] | None = None):
    import numpy as np

    if names is None:
        names = sorted(rows[0]) if rows else []
    x = np.array([[float(r.get(n, 0.0)) for n in names] for r in rows], dtype=np.float64)
    return x, names


class Ranker:
    """A trained model of one family: predicts each candidate's relative log time for a key
    and orders candidates fastest first."""

    def __init__(self, family: space.Family, arch: str, estimator, names: list[str],
                 bad: set[str], n_records: int, n_keys: int):  # fmt: skip
        self.family, self.arch, self.estimator, self.names = family, arch, estimator, names
        self.bad, self.n_records, self.n_keys = bad, n_records, n_keys

    def predict(self, features: dict, configs: Sequence[dict]):
        """Predicted relative log time of each config (fields dicts) at these shape features."""
        rows = [self.family.model_row(features, c) for c in configs]
        x, _ = _matrix(self.family, rows, self.names)
        return self.estimator.predict(x)

    def order(self, features: dict, configs: Sequence[dict]) -> list[int]:
        """Indices of ``configs`` from predicted fastest to slowest; configs that failed on
        every key of the training data go last."""
        if not configs:
            return []
        pred = self.predict(features, configs)
        known_bad = [_cfg_text(c) in self.bad for c in configs]
        return sorted(range(len(configs)), key=lambda i: (known_bad[i], float(pred[i]), i))


def fit(family: space.Family, ds: Dataset, keys: Sequence[str], arch: str = "",
        seed: int = 0) -> Ranker:  # fmt: skip
    """Train a :class:`Ranker` on keys ``keys`` of ``ds`` (see the module docstring)."""
    rows, ys = [], []
    for k in keys:
        ok = {c: v for c, v in ds.times[k].items() if v is not None}
        if len(ok) < MIN_PER_KEY:
            continue
        centre = statistics.median(math.log(v) for v in ok.values())
        for c, v in ok.items():
            rows.append(family.model_row(ds.features[k], ds.configs[c]))
            ys.append(math.log(v) - centre)
    if not rows:
        from ..errors import UnsupportedError

        raise UnsupportedError(
            f"tune.model: no key of {family.name} has {MIN_PER_KEY}+ successful measurements; "
            "measure some shapes exhaustively first (benchmarks/tuning.py does)"
        )
    import numpy as np

    x, names = _matrix(family, rows)
    est = _regressor(seed)
    est.fit(x, np.array(ys))
    # Configs that never succeeded where tried (over shared memory, say) are ranked last.
    tried: dict[str, int] = defaultdict(int)
    worked: dict[str, int] = defaultdict(int)
    for k in keys:
        for c, v in ds.times[k].items():
            tried[c] += 1
            worked[c] += v is not None
    bad = {c for c in tried if worked[c] == 0}
    return Ranker(family, arch, est, names, bad, len(rows), len(keys))


@dataclass(frozen=True)
class Pick:
    """How pruned selection went for one key: measured count, hit, best times."""

    measured: int
    total: int
    hit: bool
    best_ms: float
    chosen_ms: float


def select(ranker: Ranker, ds: Dataset, key: str, k: int) -> Pick:
    """Walk ``key``'s measured configs in the model's order until ``k`` succeeded (failures
    count as measured, as in the tuner) and compare the best of them with the true best."""
    cfgs = list(ds.times[key])
    order = ranker.order(ds.features[key], [ds.configs[c] for c in cfgs])
    measured, ok, chosen = 0, 0, math.inf
    for i in order:
        measured += 1
        v = ds.times[key][cfgs[i]]
        if v is not None:
            ok += 1
            chosen = min(chosen, v)
        if ok >= k:
            break
    best = ds.best(key)
    return Pick(measured, len(cfgs), chosen <= best * HIT_TOLERANCE, best, chosen)


def _fold_of(key: str, folds: int) -> int:
    return zlib.crc32(key.encode()) % folds


def evaluate(family: str | space.Family, arch: str | None = None, k: int = 5, folds: int = 5,
             records: Sequence[dict] | None = None) -> dict:  # fmt: skip
    """Cross-validated top-k accuracy split by shape: keys in ``folds`` groups, each scored by
    a model trained on the others. Returns hit rate, fraction measured and counts."""
    fam = family if isinstance(family, space.Family) else space.get(family)
    recs = store.load(fam.name, arch=arch) if records is None else list(records)
    ds = Dataset.from_records(fam, recs)
    keys = ds.trainable()
    if len(keys) < max(MIN_KEYS, 2):
        return {"family": fam.name, "keys": len(keys), "error": "too few exhaustively "
                f"measured keys ({len(keys)}; need {max(MIN_KEYS, 2)})"}  # fmt: skip
    folds = max(2, min(folds, len(keys)))
    picks = []
    for f in range(folds):
        test = [key for key in keys if _fold_of(key, folds) == f]
        train = [key for key in keys if _fold_of(key, folds) != f]
        if not test or len(train) < MIN_KEYS:
            continue
        r = fit(fam, ds, train, arch or "")
        picks += [select(r, ds, key, k) for key in test]
    return _summary(fam.name, picks, k, len(recs))


def _summary(name: str, picks: list[Pick], k: int, n_records: int) -> dict:
    if not picks:
        return {"family": name, "keys": 0, "error": "nothing to score"}
    return {
        "family": name,
        "k": k,
        "keys": len(picks),
        "records": n_records,
        "hit_rate": sum(p.hit for p in picks) / len(picks),
        "fraction_measured": sum(p.measured for p in picks) / sum(p.total for p in picks),
        "mean_slowdown": statistics.fmean(p.chosen_ms / p.best_ms for p in picks),
        "worst_slowdown": max(p.chosen_ms / p.best_ms for p in picks),
    }


def holdout(family: str | space.Family, arch: str | None = None, k: int = 5,
            test_fraction: float = 0.2, records: Sequence[dict] | None = None) -> dict:  # fmt: skip
    """Train on ~80% of the shapes and score top-k on the other ~20% (split by key)."""
    fam = family if isinstance(family, space.Family) else space.get(family)
    recs = store.load(fam.name, arch=arch) if records is None else list(records)
    ds = Dataset.from_records(fam, recs)
    keys = ds.trainable()
    buckets = max(2, round(1 / max(test_fraction, 1e-3)))
    test = [key for key in keys if _fold_of(key, buckets) == 0]
    train = [key for key in keys if _fold_of(key, buckets) != 0]
    if len(train) < MIN_KEYS or not test:
        return {"family": fam.name, "keys": len(keys), "error": "too few exhaustively "
                f"measured keys ({len(keys)}) for a held-out split"}  # fmt: skip
    r = fit(fam, ds, train, arch or "")
    out = _summary(fam.name, [select(r, ds, key, k) for key in test], k, len(recs))
    out["train_keys"] = len(train)
    return out


# ---------------------------------------------------------------------------------- on disk


def model_path(family: str, arch: str) -> Path:
    """The JSON record of a trained model of ``family`` on ``arch``."""
    return config.settings.cache_dir / "tune" / "models" / f"{family}-{arch}.json"


def train(family: str, arch: str, k: int = 5) -> dict:
    """Train ``family``'s model for ``arch`` from the store, score it on held-out shapes, and
    write the model record that turns pruned tuning on. Returns the record."""
    fam = space.get(family)
    recs = store.load(fam.name, arch=arch)
    t0 = time.perf_counter()
    ds = Dataset.from_records(fam, recs)
    keys = ds.trainable()
    ranker = fit(fam, ds, keys, arch)
    seconds = time.perf_counter() - t0
    record = {
        "format": FORMAT,
        "family": fam.name,
        "arch": arch,
        "backend": backend_name(),
        "trained": store.now(),
        "records": len(recs),
        "keys": len(keys),
        "train_seconds": round(seconds, 3),
        "holdout": holdout(fam, arch, k, records=recs),
    }
    write_atomic(model_path(fam.name, arch), json.dumps(record, indent=1) + "\n")
    _cache[(fam.name, arch)] = (_stamp(fam.name), ranker)
    return record


_cache: dict[tuple[str, str], tuple[tuple, Ranker | None]] = {}


def _stamp(family: str) -> tuple:
    try:
        st = store.path(family).stat()
        return (st.st_size, st.st_mtime_ns)
    except OSError:
        return (0, 0)


def ranker(family: str, arch: str, train_if_missing: bool = False) -> Ranker | None:
    """The trained model of ``family`` on ``arch`` for tuning, or None: none was trained
    (``kernforge tune --model train``; ``train_if_missing`` trains from the store instead),
    no regressor library, or too little data. Retrained when the store has grown."""
    if not available():
        return None
    path = model_path(family, arch)
    rebuild = False
    if path.exists():
        try:
            rec = json.loads(path.read_text())
            ok = rec.get("format") == FORMAT and rec.get("family") == family
            rebuild = not (ok and rec.get("arch") == arch)
        except (OSError, ValueError, AttributeError):
            rebuild = True  # corrupt: retrained and rewritten below
    elif not train_if_missing:
        return None
    else:
        rebuild = True
    stamp = _stamp(family)
    hit = _cache.get((family, arch))
    if hit is not None and hit[0] == stamp and not rebuild:
        return hit[1]
    try:
        if rebuild:
            train(family, arch)
            return _cache[(family, arch)][1]
        fam = space.get(family)
        ds = Dataset.from_records(fam, store.load(family, arch=arch))
        r = fit(fam, ds, ds.trainable(), arch)
    except Exception as exc:  # noqa: BLE001  (no model is a fallback, never an error)
        print(f"kernforge.tune: no model for {family} on {arch} ({exc}); measuring the short "
              "list", file=sys.stderr)  # fmt: skip
        r = None
    _cache[(family, arch)] = (stamp, r)
    return r


def top_k(kernel: str, key: tuple, candidates: Sequence[Any], k: int,
          arch: str | None = None, model: Ranker | None = None) -> list[Any]:  # fmt: skip
    """The ``k`` candidates the model of ``kernel`` (a family or tuner name) ranks fastest
    for ``key`` (all of them, in order, when ``k`` >= their number). Without a model the
    candidates come back in their own order, first ``k``."""
    import dataclasses

    fam = space.family_of(kernel) or space.get(kernel)
    if model is None and arch is not None:
        model = ranker(fam.name, arch)
    if model is None:
        return list(candidates)[:k]
    fields = [c if isinstance(c, dict) else dataclasses.asdict(c) for c in candidates]
    order = model.order(fam.features(tuple(key)), fields)
    return [candidates[i] for i in order[:k]]


# ---------------------------------------------------------------------------------- tuning


@dataclass(frozen=True)
class Plan:
    """What a pruned tuning measures: the family's whole space in the model's order, of
    which the first ``k`` that run are measured."""

    candidates: list
    k: int
    total: int


_noted: set[str] = set()


def _note_once(text: str) -> None:
    if text not in _noted:
        _noted.add(text)
        print(f"kernforge.tune: {text}", file=sys.stderr, flush=True)


def plan(tuner: str, key: tuple) -> Plan | None:
    """The pruned search for tuner ``tuner`` at ``key``, or None for a plain search (model
    off, the tuner has no family, no regressor library, no trained model)."""
    mode = config.settings.tune_model
    if mode == "off":
        return None
    fam = space.family_of(tuner)
    if fam is None:
        return None
    if not available():
        if mode == "on":
            _note_once(
                "KERNFORGE_TUNE_MODEL=on but neither scikit-learn nor xgboost is "
                "installed (pip install kernforge[tune]); measuring the short list"
            )
        return None
    from .. import device

    arch = device.arch() or "cpu"
    r = ranker(fam.name, arch, train_if_missing=mode == "on")
    if r is None:
        return None
    import dataclasses

    cands = fam.candidates(tuple(key))
    order = r.order(fam.features(tuple(key)), [dataclasses.asdict(c) for c in cands])
    k = max(1, config.settings.tune_topk)
    return Plan([cands[i] for i in order], min(k, len(cands)), len(cands))
