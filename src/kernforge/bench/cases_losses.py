"""Benchmark cases of the losses: ``ops.cross_entropy`` and ``ops.fused_linear_cross_entropy``.

- cross_entropy, bf16 logits [8192, 128256] (a Llama-3 vocabulary) and [16384, 32000], forward
  and forward+backward, against ``F.cross_entropy(logits.float(), t)`` in eager torch and under
  ``torch.compile``. Bytes: the logits read once forward; read twice and dlogits written once
  forward+backward (the per-row vectors are under 0.01%). Bar: 85% of a 3.0 TB/s copy.
- fused_linear_cross_entropy, [8192 tokens, hidden 4096] x [128256, 4096] bf16,
  forward+backward, against ``logits = h @ W.T; F.cross_entropy(logits.float(), t)`` (eager and
  compiled). FLOPs: ``6 * N * V * H`` (the logits GEMM and the two gradient GEMMs). Bar: no
  slower than eager.

:func:`measure_flce` adds the other half of the issue's bar, memory: it runs the fused loss
and the unfused reference forward+backward and records each one's extra peak memory.
``python -m kernforge.bench.cases_losses OUT.json [--sweep]`` runs it and the cases (and the
kernel launch and chunk-size sweeps).
"""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F

from .. import ops
from ..dispatch import backend
from .harness import Bar, Case, Result

#: Written after measuring (H100, bf16; docs/losses.md has the figures).
NOTES = (
    "fused_linear_cross_entropy at 8192 x 4096 x 128256: the bar is against eager torch "
    "(time <= 1.0x, extra peak memory <= 0.1x; measure_flce). torch.compile of the unfused "
    "reference is ~9% faster than kernforge: it runs the three GEMMs once over all 8192 tokens, "
    "while the chunked path re-reads and re-writes dW (1 GB) once per chunk of 1024 tokens in "
    "its accumulating GEMM (~0.7 ms a chunk), the price of not holding the logits; its memory "
    "is the unfused one's. Chunks of 2048 tokens run ~1 ms faster and hold 0.25 GB more."
)

CE_GPU_SHAPES = [(8192, 128256), (16384, 32000)]
CE_CPU_SHAPES = [(16, 1000)]
CE_TARGET_TBS = 0.85 * 3.0
#: (tokens, hidden, vocab).
FLCE_GPU_SHAPES = [(8192, 4096, 128256)]
FLCE_CPU_SHAPES = [(32, 64, 1000)]
FLCE_TARGET_VS = {"torch": 1.0}
#: The issue's memory bar: kernforge's extra peak at most this fraction of the reference's.
FLCE_MEMORY_RATIO = 0.1


def _rel_err(outs, refs) -> float:
    pairs = [(o.detach().double(), r.detach().double()) for o, r in zip(outs, refs, strict=True)]
    num = sum(float((o - r).norm()) ** 2 for o, r in pairs)
    den = sum(float(r.norm()) ** 2 for _, r in pairs)
    return (num / max(den, 1e-30)) ** 0.5


def _ce_make(n: int, v: int, dtype: torch.dtype, dev: torch.device, direction: str):
    def make():
        torch.manual_seed(0)
        x = (torch.randn(n, v, device=dev) * 2).to(dtype)
        t = torch.randint(0, v, (n,), device=dev)

        def kf_loss(a):
            with backend("triton"):
                return ops.cross_entropy(a, t)

        def torch_loss(a):
            return F.cross_entropy(a.float(), t)

        losses = {"kernforge": kf_loss, "torch": torch_loss,
                  "torch.compile": torch.compile(torch_loss, dynamic=False)}  # fmt: skip
        ref_dtype = torch.float32 if dev.type == "cuda" else torch.float64
        if direction == "fwd":
            calls = {name: (lambda f=f: f(x)) for name, f in losses.items()}

            def check() -> float:
                return _rel_err([kf_loss(x)], [F.cross_entropy(x.to(ref_dtype), t)])

            return calls, check

        xl = x.detach().requires_grad_()

        def fwd_bwd(f):
            return lambda: torch.autograd.grad(f(xl), [xl])

        calls = {name: fwd_bwd(f) for name, f in losses.items()}

        def check() -> float:
            xr = x.detach().to(ref_dtype).requires_grad_()
            want = F.cross_entropy(xr, t)
            (dx,) = torch.autograd.grad(want, [xr])
            loss = kf_loss(xl)
            (got,) = torch.autograd.grad(loss, [xl])
            return max(_rel_err([loss], [want]), _rel_err([got], [dx]))

        return calls, check

    return make


def _flce_inputs(n: int, h: int, v: int, dtype: torch.dtype, dev: torch.device):
    torch.manual_seed(0)
    hidden = torch.randn(n, h, device=dev).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, device=dev) * h**-0.5).to(dtype).requires_grad_()
    target = torch.randint(0, v, (n,), device=dev)
    return hidden, weight, target


def flce_reference(hidden, weight, target):
    """The unfused loss the issue compares against: bf16 logits, an fp32 cross-entropy."""
    return F.cross_entropy((hidden @ weight.t()).float(), target)


def flce_kernforge(hidden, weight, target, chunk_size=None):
    """ops.fused_linear_cross_entropy on the Triton backend."""
    with backend("triton"):
        return ops.fused_linear_cross_entropy(hidden, weight, target, chunk_size=chunk_size)


def _flce_make(n: int, h: int, v: int, dtype: torch.dtype, dev: torch.device):
    def make():
        hidden, weight, target = _flce_inputs(n, h, v, dtype, dev)
        compiled = torch.compile(flce_reference, dynamic=False)
        losses = {"kernforge": flce_kernforge, "torch": flce_reference, "torch.compile": compiled}

        def fwd_bwd(f):
            return lambda: torch.autograd.grad(f(hidden, weight, target), [hidden, weight])

        calls = {name: fwd_bwd(f) for name, f in losses.items()}

        def check() -> float:
            ref_dtype = torch.float32 if dev.type == "cuda" else torch.float64
            hr, wr = (a.detach().to(ref_dtype).requires_grad_() for a in (hidden, weight))
            want = flce_reference(hr, wr, target)
            want_g = torch.autograd.grad(want, [hr, wr])
            loss = flce_kernforge(hidden, weight, target)
            got = torch.autograd.grad(loss, [hidden, weight])
            return max(_rel_err([loss], [want]), _rel_err(got, want_g))

        return calls, check

    return make


def cases(on_gpu: bool, quick: bool = False) -> list[Case]:
    """cross_entropy (fwd, fwd+bwd) and fused_linear_cross_entropy (fwd+bwd) at the issue's
    shapes on the GPU, tiny ones through the interpreter on the CPU."""
    dtype = torch.bfloat16
    dev = torch.device("cuda" if on_gpu else "cpu")
    ce_shapes = CE_GPU_SHAPES if on_gpu else CE_CPU_SHAPES
    flce_shapes = FLCE_GPU_SHAPES if on_gpu else FLCE_CPU_SHAPES
    directions = ("fwd", "fwd+bwd")
    if quick:
        ce_shapes, flce_shapes, directions = ce_shapes[:1], [], ("fwd",)
    e = dtype.itemsize
    out = []
    for n, v in ce_shapes:
        for direction in directions:
            reads_writes = 1 if direction == "fwd" else 3
            out.append(Case("losses", "cross_entropy", direction, (n, v), dtype,
                            reads_writes * n * v * e, _ce_make(n, v, dtype, dev, direction),
                            target_tbs=CE_TARGET_TBS))  # fmt: skip
    for n, h, v in flce_shapes:
        out.append(Case("losses", "fused_linear_cross_entropy", "fwd+bwd", (n, h, v), dtype,
                        (n * h + 2 * v * h + n * h) * e, _flce_make(n, h, v, dtype, dev),
                        flops=6 * n * v * h, target_vs=dict(FLCE_TARGET_VS)))  # fmt: skip
    return out


def bars(results: list[Result]) -> list[Bar]:
    """No family-level bar beyond the cases' own (the memory bar is :func:`measure_flce`'s)."""
    return []


def _extra_peak(step) -> int:
    """Bytes allocated at the peak of ``step()`` beyond what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def measure_flce(tokens: int = 8192, vocab: int = 128256, hidden: int = 4096,
                 dtype: torch.dtype = torch.bfloat16, chunk_size: int | None = None,
                 rep_ms: int = 2000, fp32_check: bool = True) -> dict:  # fmt: skip
    """Forward+backward of the unfused reference and of ``ops.fused_linear_cross_entropy``.

    The reference is user code: ``logits = h @ W.T; loss = F.cross_entropy(logits.float(), t);
    loss.backward()``, with ``logits`` still referenced during the backward (as a Hugging Face
    model's output holds them): the issue's ~14.7 GB. Its extra peak with the logits freed
    before the backward is recorded too (``reference_logits_freed``, 2.1 GB less at the
    issue's shape), and the memory ratio against either.

    Records each one's median time (ms, triton.testing.do_bench) and extra peak memory (bytes
    allocated at the peak beyond those held before: h, W and t are allocated, and every
    ``.grad`` is None at the start of each run, so both allocate their dh and dW alike), the
    losses, how far kernforge's loss and gradients are from the reference's and, with
    ``fp32_check``, how far both are from an fp32 computation on the same inputs. Needs CUDA.
    """
    import triton.testing

    dev = torch.device("cuda")
    h, w, t = _flce_inputs(tokens, hidden, vocab, dtype, dev)

    def reference():
        h.grad = w.grad = None
        logits = h @ w.t()
        loss = F.cross_entropy(logits.float(), t)
        loss.backward()
        return loss.detach()

    def reference_logits_freed():
        h.grad = w.grad = None
        loss = flce_reference(h, w, t)
        loss.backward()
        return loss.detach()

    def kernforge():
        h.grad = w.grad = None
        loss = flce_kernforge(h, w, t, chunk_size)
        loss.backward()
        return loss.detach()

    out: dict = {"tokens": tokens, "vocab": vocab, "hidden": hidden,
                 "dtype": str(dtype).replace("torch.", ""),
                 "device": torch.cuda.get_device_name(), "chunk_size": chunk_size,
                 "ms": {}, "extra_peak_bytes": {}, "loss": {}}  # fmt: skip
    if chunk_size is None:
        from ..kernels.fused_linear_ce import default_chunk

        out["chunk_size"] = default_chunk(tokens, vocab, dtype.itemsize)
    grads: dict[str, list[torch.Tensor]] = {}
    steps = {"reference": reference, "reference_logits_freed": reference_logits_freed,
             "kernforge": kernforge}  # fmt: skip
    for name, step in steps.items():
        step()  # warm-up: Triton compile, cuBLAS workspace
        h.grad = w.grad = None
        torch.cuda.empty_cache()
        out["extra_peak_bytes"][name] = _extra_peak(step)
        if name == "reference_logits_freed":
            continue  # the same computation as the reference: memory only
        out["loss"][name] = step().item()
        grads[name] = [h.grad.detach().clone(), w.grad.detach().clone()]
        h.grad = w.grad = None
        torch.cuda.empty_cache()
        out["ms"][name] = float(triton.testing.do_bench(step, warmup=200, rep=rep_ms,
                                                        return_mode="median"))  # fmt: skip
        h.grad = w.grad = None
        torch.cuda.empty_cache()
    kf, ref = grads["kernforge"], grads["reference"]
    out["rel_diff_vs_reference"] = {
        "loss": abs(out["loss"]["kernforge"] - out["loss"]["reference"])
        / abs(out["loss"]["reference"]),
        "dhidden": _rel_err([kf[0]], [ref[0]]),
        "dweight": _rel_err([kf[1]], [ref[1]]),
    }
    if fp32_check:
        hr, wr = (a.detach().float().requires_grad_() for a in (h, w))
        want = flce_reference(hr, wr, t)
        want_g = torch.autograd.grad(want, [hr, wr])
        exact = want.item()
        out["rel_err_vs_fp32"] = {
            name: {"loss": abs(out["loss"][name] - exact) / abs(exact),
                   "dhidden": _rel_err([g[0]], [want_g[0]]),
                   "dweight": _rel_err([g[1]], [want_g[1]])}
            for name, g in grads.items()
        }  # fmt: skip
        del hr, wr, want, want_g
    del grads
    torch.cuda.empty_cache()
    mem = out["extra_peak_bytes"]
    out["memory_ratio"] = mem["kernforge"] / mem["reference"]
    out["memory_ratio_vs_logits_freed"] = mem["kernforge"] / mem["reference_logits_freed"]
    out["time_ratio"] = out["ms"]["kernforge"] / out["ms"]["reference"]
    out["bars"] = {
        f"extra peak memory <= {FLCE_MEMORY_RATIO}x reference": out["memory_ratio"]
        <= FLCE_MEMORY_RATIO,
        "time <= 1.0x reference": out["time_ratio"] <= 1.0,
    }
    return out


def sweep_ce(n: int = 8192, v: int = 128256, dtype: torch.dtype = torch.bfloat16,
             blocks=(4096, 8192, 16384), warps=(8, 16)) -> list[dict]:  # fmt: skip
    """Time the cross-entropy kernel's three passes (forward, backward, fused in place) at each
    launch size (tile, warps): ms and TB/s per pass. Needs CUDA."""
    import triton.testing

    from ..kernels import cross_entropy as ce

    x = (torch.randn(n, v, device="cuda") * 2).to(dtype)
    t = torch.randint(0, v, (n,), device="cuda")
    losses = torch.empty(n, device="cuda")
    lse = torch.empty(n, device="cuda")
    g = torch.full((1,), 1.0 / n, device="cuda")
    dx = torch.empty_like(x)
    scratch = torch.empty_like(x)
    saved = dict(ce.LAUNCH)
    rows = []
    passes = {
        "fwd": (lambda: ce.launch_ce(x, None, t, losses, lse, None, -100, 0.0, 0.0), 1),
        "bwd": (lambda: ce.launch_ce(x, dx, t, None, lse, g, -100, 0.0, 0.0), 2),
        "fused": (lambda: ce.launch_ce(scratch, scratch, t, losses, lse, g, -100, 0.0, 0.0), 3),
    }
    try:
        for block in blocks:
            for nw in warps:
                for kind, (fn, moves) in passes.items():
                    ce.LAUNCH[kind] = ce.CELaunch(block, nw)
                    if kind == "fused":
                        scratch.copy_(x)  # fused overwrites its input: time it on a copy
                    ms = float(triton.testing.do_bench(fn, warmup=25, rep=200,
                                                       return_mode="median"))  # fmt: skip
                    tbs = moves * n * v * x.element_size() / (ms * 1e-3) / 1e12
                    rows.append({"pass": kind, "block_v": block, "num_warps": nw,
                                 "ms": round(ms, 4), "tbs": round(tbs, 3)})  # fmt: skip
    finally:
        ce.LAUNCH.clear()
        ce.LAUNCH.update(saved)
    return rows


def _main(path: str, sweep: bool) -> None:
    """GPU run: measure_flce at the default chunk, (with ``sweep``) the kernel launch sweep and
    the chunk sweep, then the cases; the record is rewritten after each stage (a cut-off run
    keeps its part)."""
    from .harness import copy_bandwidth, run_cases, table

    record: dict = {"flce": []}

    def save() -> None:
        with open(path, "w") as fh:
            json.dump(record, fh, indent=1, default=str)

    def flce(chunk: int | None, fp32_check: bool) -> None:
        r = measure_flce(chunk_size=chunk, rep_ms=1000, fp32_check=fp32_check)
        record["flce"].append(r)
        save()
        mem = {k: round(v / 2**30, 3) for k, v in r["extra_peak_bytes"].items()}
        print(f"flce chunk={r['chunk_size']}: ms={r['ms']} extra GiB={mem} "
              f"mem x{r['memory_ratio']:.3f} (x{r['memory_ratio_vs_logits_freed']:.3f} vs "
              f"logits freed) time x{r['time_ratio']:.3f} diff={r['rel_diff_vs_reference']} "
              f"vs fp32={r.get('rel_err_vs_fp32')}", flush=True)  # fmt: skip

    flce(None, True)
    if sweep:
        record["ce_sweep"] = sweep_ce()
        save()
        for kind in ("fwd", "bwd", "fused"):
            rows = [r for r in record["ce_sweep"] if r["pass"] == kind]
            print(f"best {kind}: {max(rows, key=lambda r: r['tbs'])}", flush=True)
        for chunk in (512, 2048):
            flce(chunk, False)
    copy_tbs = copy_bandwidth(True)
    record["copy_tbs"] = copy_tbs
    results, _ = run_cases(cases(True), on_gpu=True, with_compile=True, copy_tbs=copy_tbs)
    record["cases"] = [r.__dict__ for r in results]
    save()
    print(table(results, True), flush=True)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--sweep"]
    _main(args[0] if args else "losses_gpu.json", "--sweep" in sys.argv[1:])
