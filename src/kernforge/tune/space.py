"""Candidate spaces and model features of the tuned kernel families.

A :class:`Family` ties the tuners of one kernel (``matmul_tma_large`` and ``matmul_tma_small``
are both the ``matmul_tma`` kernel) to:

- ``candidates(key)``: the whole space of valid launch configs for a key (exhaustive search
  measures all of it; with a trained model, the tuner measures the model's top-k of it);
- ``features(key)``: the shape features of a key (what the measurement store records);
- ``row(features, config_fields)``: the numbers the learned model reads for one (shape,
  config) pair: the raw sizes in log2, and derived quantities that decide GEMM speed on a
  GPU (tiles per config, waves over the SMs, padding waste, shared memory, work per SM).

The wide spaces are used only when a model is on (``KERNFORGE_TUNE_MODEL``) or by exhaustive
searches (``benchmarks/tuning.py``); each kernel's short list stays the default candidate set,
so tuning without a model costs what it did.

Kernel modules are imported lazily (they import :mod:`kernforge.tune` themselves).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ArgumentError

#: Streaming multiprocessors the derived features count waves over (an H100 SXM has 132).
SMS = 132
#: Shared memory a Hopper block may use (bytes): 227 KiB.
SMEM_LIMIT = 232448
_DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float8_e4m3fn": 1, "float8_e5m2": 1}


@dataclass(frozen=True)
class Family:
    """A tuned kernel: its candidate space, key features and model inputs (module doc)."""

    name: str
    candidates: Callable[[tuple], list]
    features: Callable[[tuple], dict]
    row: Callable[[dict, dict], dict] | None = None
    config_type: type | None = None

    def model_row(self, features: dict, cfg: dict) -> dict[str, float]:
        """The model's inputs for one (shape, config): ``row`` if given, else the numeric
        shape features and config fields as they are."""
        if self.row is not None:
            return self.row(features, cfg)
        out = {f"s_{k}": float(v) for k, v in features.items() if _number(v)}
        out.update({f"c_{k}": float(v) for k, v in cfg.items() if _number(v)})
        return out

    def dtype(self, key: tuple) -> str:
        """The dtype named in ``key`` (its first dtype-like part), else ""."""
        for part in key:
            name = str(part).removeprefix("torch.")
            if name in _DTYPE_BYTES:
                return name
        return ""

    def config_of(self, fields: dict) -> Any:
        """A config object from its stored fields (None when the type is unknown)."""
        if self.config_type is None:
            return None
        try:
            return self.config_type(**fields)
        except TypeError:
            return None


def _number(v: Any) -> bool:
    return isinstance(v, bool | int | float)


_FAMILIES: dict[str, Family] = {}
_TUNER_FAMILY: dict[str, str] = {}
_builtin_done = False


def register(family: Family, tuners: Sequence[str] = ()) -> Family:
    """Make ``family`` known, serving the tuners named ``tuners`` (default: its own name)."""
    _FAMILIES[family.name] = family
    for name in tuners or (family.name,):
        _TUNER_FAMILY[name] = family.name
    return family


def _builtins() -> None:
    global _builtin_done
    if _builtin_done:
        return
    _builtin_done = True
    register(Family("matmul_tma", matmul_space, matmul_features, matmul_row),
             ("matmul_tma_large", "matmul_tma_small"))  # fmt: skip
    register(Family("attention_fwd", attention_space, attention_features, attention_row),
             ("attention_fwd",))  # fmt: skip


def family_of(tuner: str) -> Family | None:
    """The family serving tuner ``tuner`` (None: it has no wide space or model)."""
    _builtins()
    name = _TUNER_FAMILY.get(tuner)
    return None if name is None else _FAMILIES[name]


def get(name: str) -> Family:
    """The family called ``name``; raises ``ArgumentError`` for an unknown one."""
    _builtins()
    if name not in _FAMILIES:
        raise ArgumentError(f"tune: no kernel family {name!r}; known: {', '.join(_FAMILIES)}")
    return _FAMILIES[name]


def families() -> list[str]:
    """Names of the known families."""
    _builtins()
    return sorted(_FAMILIES)


def _log2(x: float) -> float:
    return math.log2(max(float(x), 1.0))


def _cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


# ---------------------------------------------------------------------------------- matmul


def matmul_smem(cfg, es: int = 2) -> int:
    """Shared memory of a TMA GEMM config (bytes): the pipelined A and B tiles, plus the
    output staging tile of one epilogue chunk."""
    stages = cfg.num_stages * (cfg.block_m + cfg.block_n) * cfg.block_k * es
    return stages + cfg.block_m * (cfg.block_n // max(cfg.subtile, 1)) * es


def _matmul_valid(cfg) -> bool:
    """Shared memory within the limit; accumulator registers per thread within 128 (the
    fp32 [BM, BN] accumulator over num_warps * 32 threads: more spills); at least 16 rows
    per warp (a warpgroup's wgmma takes 64 rows)."""
    acc = cfg.block_m * cfg.block_n // (cfg.num_warps * 32)
    return (
        matmul_smem(cfg) <= SMEM_LIMIT
        # Warp specialization with one warpgroup fails Triton 3.6's pass (H100, 2026-11-24).
        and not (cfg.warp_specialize and cfg.num_warps < 8)
        and acc <= 128
        and cfg.block_m >= 16 * cfg.num_warps
        and cfg.block_n % max(cfg.subtile, 1) == 0
        and cfg.block_n // max(cfg.subtile, 1) >= 32
    )


def matmul_grid() -> list:
    """The wide TMA GEMM space: tile shapes x K step x warps x pipeline depth (the deepest
    three that fit shared memory), epilogue chunks, plus warp specialization, loop
    flattening, group sizes and stream-K around the shipped candidates. Every shipped TMA
    candidate is in it."""
    from ..kernels.matmul import TMA_CONFIGS, MatmulConfig

    out: list = []
    tiles = [(64, 64, 4), (64, 128, 4), (64, 256, 4), (128, 64, 4), (128, 128, 4),
             (128, 128, 8), (128, 256, 8), (256, 128, 8), (256, 64, 8)]  # fmt: skip
    for bm, bn, w in tiles:
        for bk in (64, 128):
            fits = [
                s for s in (2, 3, 4, 5, 6)
                if _matmul_valid(MatmulConfig(bm, bn, bk, 8, w, s, subtile=2 if bn >= 256 else 1))
            ]  # fmt: skip
            for s in fits[-3:] if bk == 64 else fits[-2:]:
                out.append(MatmulConfig(bm, bn, bk, 8, w, s, subtile=2 if bn >= 256 else 1))
    extra = [
        MatmulConfig(128, 256, 64, 8, 8, 3, subtile=4),
        MatmulConfig(128, 256, 64, 8, 8, 3, warp_specialize=True, subtile=2),
        MatmulConfig(128, 256, 64, 8, 8, 4, flatten=True, subtile=2),
        MatmulConfig(128, 128, 64, 8, 8, 4, warp_specialize=True),
        MatmulConfig(128, 128, 64, 4, 8, 4),
        MatmulConfig(128, 128, 64, 16, 8, 4),
        MatmulConfig(64, 128, 64, 4, 4, 6, split_k=2),
        MatmulConfig(128, 128, 64, 8, 4, 5, split_k=2),
        MatmulConfig(128, 256, 64, 8, 8, 3, subtile=2, split_k=2),
        MatmulConfig(256, 128, 64, 8, 8, 3, subtile=2),
        MatmulConfig(128, 128, 64, 8, 8, 4, subtile=2),
        MatmulConfig(128, 128, 64, 8, 8, 4, flatten=True),
        MatmulConfig(128, 128, 64, 8, 4, 4, warp_specialize=True),
        MatmulConfig(128, 256, 64, 8, 8, 2, warp_specialize=True, subtile=2),
        MatmulConfig(128, 256, 64, 4, 8, 3, subtile=2),
        MatmulConfig(128, 256, 64, 16, 8, 3, subtile=2),
        MatmulConfig(64, 256, 64, 8, 4, 4, subtile=4),
        MatmulConfig(64, 128, 64, 8, 4, 5, split_k=2),
        MatmulConfig(64, 64, 128, 8, 4, 5, split_k=2),
    ]
    # The shipped candidates are kept as they are (known to compile and run).
    grid = [c for c in dict.fromkeys([*out, *extra]) if _matmul_valid(c)]
    return list(dict.fromkeys([*TMA_CONFIGS, *grid]))


def matmul_space(key: tuple) -> list:
    """The TMA GEMM space for a matmul tuner key (the same grid for every shape class)."""
    del key
    return list(_matmul_grid_cached())


_grid_cache: dict[str, list] = {}


def _matmul_grid_cached() -> list:
    if "mm" not in _grid_cache:
        _grid_cache["mm"] = matmul_grid()
    return _grid_cache["mm"]


def matmul_features(key: tuple) -> dict:
    """Shape features of a matmul key ``(m, n, k, dtype, a_t, b_t, batch, epilogue)``
    (the tuner's keys hold the M and batch buckets)."""
    m, n, k, dtype, a_t, b_t, batch, epi = (list(key) + [0] * 8)[:8]
    return {"m": int(m), "n": int(n), "k": int(k), "batch": int(batch or 1),
            "dtype": str(dtype).removeprefix("torch."), "a_t": int(a_t), "b_t": int(b_t),
            "epi": int(epi)}  # fmt: skip


def matmul_row(f: dict, c: dict) -> dict[str, float]:
    """Model inputs for one matmul (shape, config): see the module docstring."""
    m, n, k, batch = f["m"], f["n"], f["k"], f.get("batch", 1)
    es = _DTYPE_BYTES.get(f.get("dtype", "bfloat16"), 2)
    bm, bn, bk = c["block_m"], c["block_n"], c["block_k"]
    tm, tn, kt = _cdiv(m, bm), _cdiv(n, bn), _cdiv(k, bk)
    tiles = tm * tn * batch
    split = max(1, min(int(c.get("split_k", 1)), kt))
    progs = min(SMS, tiles * split) if split > 1 else min(SMS, tiles)
    waves = tiles / SMS
    full_waves = _cdiv(tiles, SMS)
    # Per-SM serial work (multiply-adds of its busiest program): stream-K spreads the K loops.
    if split > 1:
        steps = _cdiv(tiles * kt, progs)
    else:
        steps = full_waves * kt
    work = steps * bm * bn * bk
    smem = (c["num_stages"] * (bm + bn) * bk + bm * bn // max(c.get("subtile", 1), 1)) * es
    flops = 2.0 * m * n * k * batch
    moved = (m * k + k * n + m * n) * batch * es
    return {
        "log_m": _log2(m), "log_n": _log2(n), "log_k": _log2(k), "log_batch": _log2(batch),
        "es": es, "a_t": f.get("a_t", 0), "b_t": f.get("b_t", 0), "epi": f.get("epi", 0),
        "bm": bm, "bn": bn, "bk": bk, "warps": c["num_warps"], "stages": c["num_stages"],
        "group_m": c.get("group_m", 8), "ws": int(c.get("warp_specialize", False)),
        "flatten": int(c.get("flatten", False)), "subtile": c.get("subtile", 1),
        "split_k": c.get("split_k", 1),
        "log_tiles": _log2(tiles), "waves": min(waves, 64.0), "full_waves": min(full_waves, 64),
        "wave_eff": tiles / (full_waves * SMS), "log_k_tiles": _log2(kt),
        "pad_eff": (m * n) / (tm * bm * tn * bn), "k_pad_eff": k / (kt * bk),
        "log_work": _log2(work), "log_work_ratio": _log2(work) - _log2(flops / 2 / SMS),
        "smem_kb": smem / 1024, "tile_ai": bm * bn / (bm + bn),
        "acc_regs": bm * bn / (c["num_warps"] * 32),
        "log_flops": _log2(flops), "log_bytes": _log2(moved),
        "ai": flops / moved,
    }  # fmt: skip


# ---------------------------------------------------------------------------------- attention


def attention_smem(cfg, head_dim: int, es: int = 2) -> int:
    """Shared memory of a forward config (bytes): the Q tile plus the pipelined K and V."""
    bd = max(16, 1 << (int(head_dim) - 1).bit_length())
    return cfg.block_m * bd * es + cfg.num_stages * 2 * cfg.block_n * bd * es


def _attention_valid(cfg, head_dim: int) -> bool:
    """Shared memory within the limit; fp32 registers per thread (the O accumulator, the
    scores and their bf16 probabilities) within ~224; 16 rows per warp at least."""
    bd = max(16, 1 << (int(head_dim) - 1).bit_length())
    regs = (cfg.block_m * bd + 1.5 * cfg.block_m * cfg.block_n) / (cfg.num_warps * 32)
    # Ruled out by benchmarks/tuning.py on the H100 (2026-11-24): 64x32 tiles with 2 stages
    # fault (illegal address), and warp specialization of 64-row tiles gives inf outputs.
    if cfg.block_m == 64 and (cfg.warp_spec or (cfg.block_n == 32 and cfg.num_stages == 2)):
        return False
    return (
        attention_smem(cfg, head_dim) <= SMEM_LIMIT - 16384
        and regs <= 224
        and cfg.block_m >= 16 * cfg.num_warps
        and (cfg.tma or not cfg.warp_spec)
    )


def attention_grid(head_dim: int) -> list:
    """The wide forward space for one head dim: (BLOCK_M, warps) pairs x BLOCK_N x stages x
    pointer or TMA loads, filtered by shared memory and registers, plus warp-specialized TMA
    variants of the plain tiles; every shipped forward config for the head dim is in it."""
    from ..kernels.attention import FWD_CONFIGS, FwdConfig

    bd = max(64, max(16, 1 << (int(head_dim) - 1).bit_length()))
    out: list = [c for key, c in FWD_CONFIGS.items() if key[0] == bd]
    for bm, w in ((64, 4), (128, 4), (128, 8), (256, 8), (256, 16)):
        for bn in (32, 64, 128):
            # K/V tiles of 32 keys are small: more than 3 stages buys nothing there.
            for s in (2, 3) if bn == 32 else (2, 3, 4):
                for tma in (False, True):
                    out.append(FwdConfig(bm, bn, w, s, tma))
    for bm, bn, w in ((128, 64, 8), (128, 128, 8), (64, 64, 4), (64, 128, 4)):
        for s in (2, 3):
            out.append(FwdConfig(bm, bn, w, s, True, True))
    space = list(dict.fromkeys(out))
    return [c for c in space if _attention_valid(c, head_dim)]


def attention_space(key: tuple) -> list:
    """The forward space for an attention key (by its head dim)."""
    d = int(attention_features(key)["d"])
    cache = f"attn{d}"
    if cache not in _grid_cache:
        _grid_cache[cache] = attention_grid(d)
    return list(_grid_cache[cache])


def attention_key(batch: int, hq: int, hk: int, seq_q: int, seq_k: int, head_dim: int,
                  masked: bool, dtype: str) -> tuple:  # fmt: skip
    """The forward tuner's key: sizes (batch and sequences by bucket), head dim, mask, dtype."""
    from .tuner import bucket

    return (bucket(batch), int(hq), int(hk), bucket(seq_q), bucket(seq_k), int(head_dim),
            int(bool(masked)), str(dtype).removeprefix("torch."))  # fmt: skip


def attention_features(key: tuple) -> dict:
    """Shape features of an attention key (see :func:`attention_key`)."""
    b, hq, hk, sq, sk, d, masked, dtype = (list(key) + [0] * 8)[:8]
    return {"batch": int(b), "hq": int(hq), "hk": int(hk or hq), "seq_q": int(sq),
            "seq_k": int(sk), "d": int(d), "causal": int(masked),
            "dtype": str(dtype)}  # fmt: skip


def attention_row(f: dict, c: dict) -> dict[str, float]:
    """Model inputs for one attention forward (shape, config)."""
    b, hq, hk, sq, sk, d = f["batch"], f["hq"], f["hk"], f["seq_q"], f["seq_k"], f["d"]
    causal = f["causal"]
    bd = max(16, 1 << (int(d) - 1).bit_length())
    bm, bn, w, s = c["block_m"], c["block_n"], c["num_warps"], c["num_stages"]
    q_tiles = _cdiv(sq, bm)
    progs = q_tiles * b * hq
    full_waves = _cdiv(progs, SMS)
    kv = _cdiv(sk, bn)
    # Causal: a query block sees about half the keys on average; the last sees all.
    mean_kv = kv * (0.5 + 0.5 / max(q_tiles, 1)) if causal else kv
    work = full_waves * bm * kv * bn * bd
    pairs = sq * sk * (0.5 if causal else 1.0)
    flops = 4.0 * b * hq * pairs * d
    return {
        "log_batch": _log2(b), "log_hq": _log2(hq), "group": hq / max(hk, 1),
        "log_sq": _log2(sq), "log_sk": _log2(sk), "d": d, "bd": bd, "causal": causal,
        "bm": bm, "bn": bn, "warps": w, "stages": s, "tma": int(c.get("tma", False)),
        "ws": int(c.get("warp_spec", False)),
        "log_progs": _log2(progs), "waves": min(progs / SMS, 256.0), "full_waves": full_waves,
        "wave_eff": progs / (full_waves * SMS), "kv_steps": kv, "mean_kv": mean_kv,
        "pad_q": sq / (q_tiles * bm), "pad_k": sk / (kv * bn), "even_n": int(sk % bn == 0),
        "log_work": _log2(work), "log_work_ratio": _log2(work) - _log2(flops / 4 / SMS),
        "smem_kb": (bm * bd + s * 2 * bn * bd) * 2 / 1024,
        "regs": (bm * bd + 1.5 * bm * bn) / (w * 32), "log_flops": _log2(flops),
    }  # fmt: skip


def as_fields(cfg: Any) -> dict:
    """A config dataclass as its stored fields."""
    return dataclasses.asdict(cfg)


def config_in_space(tuner: str, fields: dict) -> Any | None:
    """The config of ``tuner``'s wide space with these fields (a remembered choice of a
    model-pruned tuning), else None."""
    fam = family_of(tuner)
    if fam is None:
        return None
    try:
        # Every shape of a family shares one grid per config type; the empty key reads it.
        for c in _all_spaces(fam):
            if dataclasses.asdict(c) == fields:
                return c
    except (ImportError, KeyError, ValueError, TypeError):
        return None
    return None


def _all_spaces(fam: Family) -> list:
    if fam.name == "attention_fwd":
        return [c for d in (64, 128, 256) for c in attention_space((1, 1, 1, 1, 1, d))]
    if fam.name == "matmul_tma":
        return matmul_space(())
    return []


# ---------------------------------------------------------------------------------- attention tuner

_attention_tuner: list = []


#: Attention keys found untuned in this process (no entry on disk, no model): the table's config.
_untuned: set[tuple] = set()


def attention_fwd_tuner():
    """The attention forward's Tuner: its short list is the shipped table's configs (what
    ``kernforge tune attention_fwd`` measures without a model), its wide space
    :func:`attention_space`."""
    if not _attention_tuner:
        from ..kernels.attention import FWD_CONFIGS
        from .tuner import Tuner

        _attention_tuner.append(
            Tuner("attention_fwd", list(dict.fromkeys(FWD_CONFIGS.values())), version="1")
        )
    return _attention_tuner[0]


def attention_fwd_config(q, k, masked: bool, layout: str, run: Callable[[Any], object],
                         default: Any) -> Any:  # fmt: skip
    """The forward config for dense inputs q, k ([B, S, H, D] for ``layout`` "bshd", else
    [B, H, S, D]): ``default`` (the shipped table's) unless tuning applies, i.e. under
    ``kernforge tune attention_fwd`` (:func:`kernforge.tune.forcing`), a choice remembered on
    disk, or a trained model for ``attention_fwd`` on this arch (which measures its top-k the
    first time a key is seen). Nothing changes for users who never tuned attention."""
    from .. import config, device
    from . import model, tuner

    if device.INTERPRET or not device.cuda_available():
        return default
    b, sq, hq = (q.shape[0], q.shape[1], q.shape[2]) if layout == "bshd" else (
        q.shape[0], q.shape[2], q.shape[1])  # fmt: skip
    sk, hk = (k.shape[1], k.shape[2]) if layout == "bshd" else (k.shape[2], k.shape[1])
    key = attention_key(b, hq, hk, sq, sk, q.shape[-1], masked, str(q.dtype))
    t = attention_fwd_tuner()
    if tuner._force:
        _untuned.discard(key)
        return t.pick(key, run, default)
    hit = t._memo.get(key)
    if hit is not None:
        return hit
    if key in _untuned:  # looked up before in this process: nothing on disk, no model
        return default
    hit = t._load(key)
    if hit is not None:
        t._memo[key] = hit
        return hit
    arch = device.arch() or "cpu"
    if config.settings.tune_model != "off" and model.model_path("attention_fwd", arch).exists():
        return t.pick(key, run, default)
    _untuned.add(key)  # every later call of this shape skips the file lookups
    return default


def _tune_attention_cli(shape: tuple[int, ...], dtype) -> None:
    """``kernforge tune attention_fwd --shapes BxHxSxD``: causal and not, [B, S, H, D]."""
    import torch

    from ..kernels import attention as A

    if len(shape) != 4:
        raise ArgumentError(f"attention_fwd shapes are BxHxSxD, got {'x'.join(map(str, shape))}")
    b, h, s, d = shape
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=dtype) for _ in range(3))
    for right in (-1, 0):

        def run(cfg, right=right):
            with A.force_config(fwd=cfg):
                return A.forward(q, k, v, None, None, 0, 0, d**-0.5, -1, right, 0.0, "bshd")

        default = A.fwd_config(d, right >= 0, s)
        run(attention_fwd_config(q, k, right >= 0, "bshd", run, default))


def _register_cli() -> None:
    from .tuner import register_cli

    shapes = [(1, 32, 4096, 128), (4, 16, 2048, 64), (8, 12, 1024, 128)]
    register_cli("attention_fwd", _tune_attention_cli, "BxHxSxD", default_shapes=shapes)


_register_cli()
