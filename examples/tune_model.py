"""Train kernforge's tuning model on a synthetic timing dataset and prune a tuning with it.

Runs on the CPU (no GPU needed): a made-up kernel whose best tile size depends on the shape is
"measured" exhaustively on some shapes into a measurement store in a temporary folder, the
model is trained on them, scored on held-out shapes, and then asked for its top 5 of the space
at new shapes. With scikit-learn missing it says so (pip install kernforge[tune]).

    python examples/tune_model.py
"""

from __future__ import annotations

import math
import os
import random
import tempfile
from dataclasses import asdict, dataclass

os.environ["KERNFORGE_CACHE_DIR"] = tempfile.mkdtemp(prefix="kf_tune_example_")

from kernforge.tune import model, space, store  # noqa: E402


@dataclass(frozen=True)
class Tile:
    block: int
    warps: int


SPACE = [Tile(b, w) for b in (16, 32, 64, 128, 256) for w in (1, 2, 4, 8)]


def fake_ms(m: int, n: int, cfg: Tile) -> float:
    """Waves of tiles over 8 processors: big tiles waste work on small m, small ones pay
    per-tile overhead."""
    waves = math.ceil(math.ceil(m / cfg.block) / 8)
    return waves * (cfg.block * n * 1e-6 / min(cfg.warps, cfg.block / 16) + 0.004 * cfg.warps)


def row(f: dict, c: dict) -> dict:
    tiles = math.ceil(f["m"] / c["block"])
    return {"log_m": math.log2(f["m"]), "log_n": math.log2(f["n"]), "block": c["block"],
            "warps": c["warps"], "waves": math.ceil(tiles / 8)}  # fmt: skip


def main() -> None:
    if not model.available():
        print("scikit-learn (or xgboost) is not installed: pip install kernforge[tune]")
        return
    features = lambda key: {"m": key[0], "n": key[1]}  # noqa: E731
    fam = space.register(space.Family("example_tiles", lambda key: list(SPACE), features, row))
    rng = random.Random(0)
    dev = {"arch": "sm_90", "gpu": "example"}
    for _ in range(60):  # exhaustive "measurements" of 60 shapes
        m, n = rng.randint(8, 4096), rng.choice((256, 1024, 4096))
        store.append(fam.name, [
            store.make_record(fam.name, fam.name, "1", [m, n], asdict(c), fake_ms(m, n, c),
                              features={"m": m, "n": n}, device_id=dev)
            for c in SPACE
        ])  # fmt: skip
    print(f"store: {len(store.load(fam.name))} measurements in {store.path(fam.name)}")
    rec = model.train(fam.name, "sm_90")
    ho = rec["holdout"]
    print(
        f"trained on {rec['keys']} shapes; held-out {ho['keys']} shapes: top-5 hit rate "
        f"{ho['hit_rate']:.2f}, measuring {ho['fraction_measured']:.0%} of the space"
    )
    for m, n in ((40, 4096), (1000, 1024), (3000, 256)):
        top = model.top_k(fam.name, (m, n), SPACE, 5, arch="sm_90")
        best = min(SPACE, key=lambda c: fake_ms(m, n, c))
        print(
            f"M={m} N={n}: model's top 5 {[(c.block, c.warps) for c in top]}; "
            f"true best {(best.block, best.warps)} {'(in top 5)' if best in top else ''}"
        )


if __name__ == "__main__":
    main()
