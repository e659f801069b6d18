"""Benchmark cases of decode attention (``ops.fmha_decode``, ``ops.mla_decode``).

The issue's bar: bf16, head dim 128, 32 query / 8 KV heads, batch in {1, 16, 64}, context in
{1k, 8k, 32k}, contiguous and paged caches (pages of 64, shuffled; pages of 16 at batch 16 as
well): >= 80% of the HBM copy bandwidth counting the KV bytes read (2.4 TB/s of the H100's
measured 3.0), and >= 2x torch SDPA's best backend on the same decode step. SDPA runs
q [B, 32, 1, 128] against K/V [B, 8, ctx, 128] with ``enable_gqa=True``, in its own best
layout (contiguous [B, H, S, D]; for paged cases, the contiguous equivalent), once per backend
(flash, efficient, cudnn, math) that accepts it: each is raced, and ``sdpa_best`` is the one
that was fastest in a quick probe. MLA cases (DeepSeek-V2/V3 shapes: 512 latent + 64 rope)
have no bar; they are raced against the torch reference.

``python -m kernforge.bench.cases_decode [--sweep] [--out DIR]`` runs these cases alone (and
with ``--sweep`` times every candidate launch config per shape: how the defaults were chosen).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .. import ops
from ..dispatch import backend
from ..kernels import decode
from .harness import Bar, Case, geomean

FAMILY = "attention"
HQ, HK, D = 32, 8, 128
BATCHES = (1, 16, 64)
CONTEXTS = (1024, 8192, 32768)
#: Page sizes of the paged cases: 64 everywhere, 16 too at batch 16.
PAGES = {1: (64,), 16: (64, 16), 64: (64,)}
TARGET_TBS = 0.8 * 3.0  # 80% of the H100's measured copy bandwidth
TARGET_VS = {"sdpa_best": 2.0}
#: MLA cases (batch, context, heads, page size): DeepSeek-V2/V3 per-GPU head counts.
MLA_CASES = [(16, 8192, 16, 64), (64, 4096, 16, 64), (1, 32768, 128, 64), (16, 8192, 128, 64)]
DC, DR = 512, 64
SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")
#: The math backend materialises K/V expanded to every query head: skipped above this many
#: bytes of K+V (it is never the fastest there, and would take tens of GB).
MATH_MAX_BYTES = 1 << 30
#: The SDPA backend that won each case's probe, by case label (for the notes).
CHOSEN: dict[str, str] = {}


def _sdpa_fn(name: str, q, k, v) -> Callable[[], object]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    which = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }[name]
    gqa = q.shape[1] != k.shape[1]

    def run():
        with sdpa_kernel([which]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)

    return run


def _sdpa_impls(q, k, v, label: str, on_gpu: bool) -> dict[str, Callable[[], object]]:
    """Every SDPA backend that runs this decode step, and ``sdpa_best``: the fastest of them in
    a quick probe (event-timed on the GPU)."""
    import warnings

    impls, probe = {}, {}
    for name in SDPA_BACKENDS:
        if name == "math" and on_gpu and 2 * k.numel() * k.element_size() > MATH_MAX_BYTES:
            continue
        fn = _sdpa_fn(name, q, k, v)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "backend not available" warnings
                for _ in range(3):  # first calls build plans (cuDNN): not part of the probe
                    fn()
                if on_gpu:
                    import triton.testing

                    torch.cuda.synchronize()
                    probe[name] = triton.testing.do_bench(fn, warmup=10, rep=50,
                                                          return_mode="median")  # fmt: skip
                else:
                    probe[name] = 0.0
        except RuntimeError:
            continue  # this backend does not take these inputs (e.g. no enable_gqa)
        impls[f"sdpa_{name}"] = fn
    if probe:
        best = min(probe, key=probe.get)
        CHOSEN[label] = best
        impls["sdpa_best"] = impls[f"sdpa_{best}"]
    return impls


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def _paged(cache_bshd: torch.Tensor, page: int,
           table: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The same keys in shuffled pages: ([pages, page, H, D], block_table [B, S / page]);
    pass ``table`` to reuse another cache's shuffle (K and V share one block table)."""
    bsz, s = cache_bshd.shape[:2]
    n = bsz * (s // page)
    if table is None:
        table = torch.randperm(n, device=cache_bshd.device).view(bsz, s // page).to(torch.int32)
    pages = torch.empty((n, page, *cache_bshd.shape[2:]), dtype=cache_bshd.dtype,
                        device=cache_bshd.device)  # fmt: skip
    pages[table.flatten().long()] = cache_bshd.reshape(n, page, *cache_bshd.shape[2:])
    return pages, table


def _decode_case(bsz: int, ctx: int, page: int, dtype: torch.dtype, on_gpu: bool,
                 hq: int = HQ, hk: int = HK, d: int = D) -> Case:  # fmt: skip
    dev = torch.device("cuda" if on_gpu else "cpu")
    shape = (bsz, ctx, hq, hk, d, page)
    label = f"fmha_decode fwd [{'x'.join(map(str, shape))}] {str(dtype).removeprefix('torch.')}"

    def make():
        q = torch.randn(bsz, hq, 1, d, device=dev).to(dtype)  # SDPA layout [B, H, 1, D]
        k_sdpa = torch.randn(bsz, hk, ctx, d, device=dev).to(dtype)
        v_sdpa = torch.randn(bsz, hk, ctx, d, device=dev).to(dtype)
        q_bshd = q.transpose(1, 2)  # [B, 1, Hq, D] view
        k = k_sdpa.transpose(1, 2).contiguous()  # [B, ctx, Hk, D]: the documented layout
        v = v_sdpa.transpose(1, 2).contiguous()
        bt = None
        if page:
            k, bt = _paged(k, page)
            v, _ = _paged(v, page, bt)
        lens = torch.full((bsz,), ctx, dtype=torch.int32, device=dev)

        def kernforge():
            with backend("triton"):
                return ops.fmha_decode(q_bshd, k, v, lens, bt)

        impls = {"kernforge": kernforge, **_sdpa_impls(q, k_sdpa, v_sdpa, label, on_gpu)}

        def check() -> float:
            # Against the fp32 reference on the first and last sequences (all of a 32k x 64
            # batch in fp32 would not fit); the torch impl upcasts after its gather.
            out = kernforge()
            rows = sorted({0, bsz - 1})
            bt_r = bt[rows] if bt is not None else None
            kr, vr = (k, v) if bt is not None else (k[rows], v[rows])
            want = decode.fmha_decode_torch(q_bshd[rows].float(), kr, vr, lens[rows], bt_r)
            return _rel(out[rows], want)

        return impls, check

    nbytes = 2 * bsz * ctx * hk * d * dtype.itemsize
    return Case(FAMILY, "fmha_decode", "fwd", shape, dtype, nbytes, make,
                target_tbs=TARGET_TBS if on_gpu else None,
                target_vs=TARGET_VS if on_gpu else None)  # fmt: skip


def _mla_case(bsz: int, ctx: int, heads: int, page: int, dtype: torch.dtype,
              on_gpu: bool, dc: int = DC, dr: int = DR) -> Case:  # fmt: skip
    dev = torch.device("cuda" if on_gpu else "cpu")
    shape = (bsz, ctx, heads, dc, dr, page)

    def make():
        qn = torch.randn(bsz, 1, heads, dc, device=dev).to(dtype)
        qr = torch.randn(bsz, 1, heads, dr, device=dev).to(dtype)
        kv = torch.randn(bsz, ctx, 1, dc + dr, device=dev).to(dtype)
        cache, bt = _paged(kv, page) if page else (kv, None)
        ckv, kpe = cache[:, :, 0, :dc], cache[:, :, 0, dc:]  # one fused [.., 576] cache
        lens = torch.full((bsz,), ctx, dtype=torch.int32, device=dev)
        scale = (128 + dr) ** -0.5

        def kernforge():
            with backend("triton"):
                return ops.mla_decode(qn, qr, ckv, kpe, lens, bt, scale=scale)

        def torch_ref():
            with backend("torch"):
                return ops.mla_decode(qn, qr, ckv, kpe, lens, bt, scale=scale)

        def check() -> float:
            rows = sorted({0, bsz - 1})
            bt_r = bt[rows] if bt is not None else None
            c, p = (ckv, kpe) if bt is not None else (ckv[rows], kpe[rows])
            want = decode.mla_decode_torch(qn[rows].float(), qr[rows].float(), c, p, lens[rows],
                                           bt_r, scale=scale)  # fmt: skip
            return _rel(kernforge()[rows], want)

        impls = {"kernforge": kernforge}
        if 4 * bsz * heads * ctx * 4 < (1 << 31):  # the reference's fp32 scores fit
            impls["torch"] = torch_ref
        return impls, check

    nbytes = bsz * ctx * (dc + dr) * dtype.itemsize
    return Case(FAMILY, "mla_decode", "fwd", shape, dtype, nbytes, make)


def cases(on_gpu: bool, quick: bool = False) -> list[Case]:
    """The decode cases: the issue's sizes on a GPU, tiny shapes through the interpreter."""
    dtype = torch.bfloat16
    if not on_gpu:
        return [
            _decode_case(2, 64, 0, dtype, False, hq=4, hk=2, d=32),
            _decode_case(2, 64, 16, dtype, False, hq=4, hk=2, d=32),
            _mla_case(2, 48, 4, 16, dtype, False, dc=64, dr=16),
        ]
    if quick:
        return [_decode_case(16, 8192, 0, dtype, True), _decode_case(16, 8192, 64, dtype, True)]
    out = []
    for bsz in BATCHES:
        for ctx in CONTEXTS:
            out.append(_decode_case(bsz, ctx, 0, dtype, True))
            out += [_decode_case(bsz, ctx, p, dtype, True) for p in PAGES[bsz]]
    out += [_mla_case(b, s, h, p, dtype, True) for b, s, h, p in MLA_CASES]
    return out


def _vs_sdpa(r) -> float | None:
    """kernforge's speed-up over the fastest SDPA backend *as timed by the harness* (the probe
    that names ``sdpa_best`` is short and can misjudge a close race)."""
    times = [ms for name, ms in r.ms.items() if name.startswith("sdpa_") and name != "sdpa_best"]
    return min(times) / r.ms["kernforge"] if times else None


def bars(results) -> list[Bar]:
    """Family-level bars of the fmha_decode cases: the geometric means of bandwidth and of the
    speed-up over SDPA's fastest backend, and the worst case of each."""
    rows = [r for r in results if r.op == "fmha_decode" and not r.error and r.tbs]
    if not rows or not rows[0].target_vs:
        return []
    tbs = [r.tbs["kernforge"] for r in rows]
    vs = [v for v in map(_vs_sdpa, rows) if v is not None]
    out = [
        Bar("fmha_decode: geomean TB/s over the cases", geomean(tbs), TARGET_TBS, "TB/s"),
        Bar("fmha_decode: worst case TB/s", min(tbs), TARGET_TBS, "TB/s"),
    ]
    if vs:
        best = TARGET_VS["sdpa_best"]
        out += [
            Bar("fmha_decode: geomean x fastest SDPA backend", geomean(vs), best),
            Bar("fmha_decode: worst case x fastest SDPA backend", min(vs), best),
        ]
    return out


#: Notes for the attention family's results (measured on an H100, docs/decode.md): why the
#: decode bars are missed where they are.
NOTES = (
    "Decode (fmha_decode): >= 2.4 TB/s in the 12 cases that read >= 268 MB (2.46-3.12 TB/s), "
    "missed at batch 1 and at 16 x 1k, where no implementation measured gets there either "
    "(cuDNN 0.34-2.09 TB/s at batch 1; 1 x 1k reads 4.2 MB, 1.4 us at copy speed, below one "
    "kernel launch). 2x SDPA is physically impossible in 17 of 21 cases: SDPA's cuDNN "
    "backend already runs at 1.81-3.10 TB/s there, and 2x would pass the 3.0 TB/s copy "
    "bandwidth; kernforge is 0.86-1.02x cuDNN (contiguous 0.95-1.02x, paged 0.86-0.99x) and "
    "0.94-1.24x SDPA's flash backend. MLA decode has no bar: 1.2-1.7 TB/s at 16 heads, "
    "0.35-0.4 TB/s at 128 heads (compute-bound on warp-level MMAs)."
)


# ----------------------------------------------------------------------------------------------
# Config sweep (how the defaults were chosen) and a stand-alone runner
# ----------------------------------------------------------------------------------------------


def sweep(shapes=None, configs=None, split_choices=(None,), rep_ms: int = 50) -> list[dict]:
    """Time configs and forced split counts at each (batch, ctx, page) shape in CUDA-graph
    replays; returns (and prints) one row per (shape, config, splits)."""
    from .harness import time_graph

    shapes = shapes or [(b, c, p) for b in BATCHES for c in CONTEXTS for p in (0, 64)]
    configs = configs or [decode.DEFAULT_MHA]
    dev = torch.device("cuda")
    stream = torch.cuda.Stream()
    rows = []
    for bsz, ctx, page in shapes:
        q = torch.randn(bsz, 1, HQ, D, device=dev).to(torch.bfloat16)
        k = torch.randn(bsz, ctx, HK, D, device=dev).to(torch.bfloat16)
        v = torch.randn(bsz, ctx, HK, D, device=dev).to(torch.bfloat16)
        bt = None
        if page:
            k, bt = _paged(k, page)
            v, _ = _paged(v, page, bt)
        lens = torch.full((bsz,), ctx, dtype=torch.int32, device=dev)
        a = decode._Attn(q, None, k, None, v, lens, bt, D**-0.5, None, None, False)
        nbytes = 2 * bsz * ctx * HK * D * 2
        for cfg in configs:
            for splits in split_choices:
                try:
                    ms = time_graph(lambda a=a, c=cfg, s=splits: decode._launch(a, c, s), stream,
                                    rep_ms)  # fmt: skip
                    err = ""
                except Exception as exc:  # noqa: BLE001  (a config that fails is recorded)
                    ms, err = math.nan, f"{type(exc).__name__}: {exc}"[:120]
                row = {"bsz": bsz, "ctx": ctx, "page": page, "config": cfg.__dict__,
                       "splits": splits, "ms": ms, "tbs": nbytes / (ms * 1e-3) / 1e12,
                       "error": err}  # fmt: skip
                rows.append(row)
                print(f"sweep B={bsz} ctx={ctx} page={page} splits={splits} {cfg}: "
                      f"{ms * 1e3:.1f} us {row['tbs']:.3f} TB/s {err}", flush=True)  # fmt: skip
        del q, k, v
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> None:
    """Run the decode cases (and optionally the split sweep); print tables, write JSON."""
    import argparse
    import json
    from dataclasses import asdict
    from pathlib import Path

    from .harness import bars_table, environment, run_cases, table

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep", action="store_true", help="time forced split counts instead")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="bench-out/decode")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    on_gpu = torch.cuda.is_available()
    if args.sweep:
        shapes = [(b, c, p) for b in (1, 16) for c in CONTEXTS for p in (0, 64)]
        splits = (None, 1, 2, 4, 8, 16, 32, 64, 128)
        rows = sweep(shapes, split_choices=splits)
        (out / "decode_sweep.json").write_text(json.dumps(rows, indent=1))
        return
    results, copy_tbs = run_cases(cases(on_gpu, args.quick), on_gpu=on_gpu, with_compile=False)
    env = environment(copy_tbs, on_gpu)
    payload = {"environment": env, "chosen_sdpa": CHOSEN,
               "results": [asdict(r) for r in results]}  # fmt: skip
    (out / "decode.json").write_text(json.dumps(payload, indent=1, default=str))
    print(table(results, on_gpu))
    print(bars_table(bars(results)))
    print("sdpa_best backend per case:", CHOSEN)


if __name__ == "__main__":
    main()
