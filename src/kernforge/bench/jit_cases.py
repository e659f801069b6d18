"""Benchmark cases of ``kf.jit``: NumPy functions traced into one fused kernel each, raced
against torch eager and ``torch.compile`` of the same function written in torch.

Bar (issue 3): at [32768, 4096] bf16, >= 85% of the measured copy bandwidth and >= 1.0x
torch.compile. Also measured here: host time of a cached call, and first-call trace+compile.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
import torch

from ..frontend.jit import jit
from ..runtime import loader


def softmax_np(x):
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


def softmax_torch(x):
    e = torch.exp(x - torch.amax(x, dim=-1, keepdim=True))
    return e / torch.sum(e, dim=-1, keepdim=True)


def rms_norm_np(x, w):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6) * w


def rms_norm_torch(x, w):
    xf = x.float()
    return (xf * torch.rsqrt(torch.mean(xf * xf, dim=-1, keepdim=True) + 1e-6) * w).to(x.dtype)


def layer_norm_np(x, w, b):
    xc = x - np.mean(x, axis=-1, keepdims=True)
    return xc / np.sqrt(np.mean(xc * xc, axis=-1, keepdims=True) + 1e-5) * w + b


def layer_norm_torch(x, w, b):
    xf = x.float()
    xc = xf - xf.mean(dim=-1, keepdim=True)
    y = xc * torch.rsqrt((xc * xc).mean(dim=-1, keepdim=True) + 1e-5) * w + b
    return y.to(x.dtype)


def gelu_tanh_np(x):
    return 0.5 * x * (1 + np.tanh(0.7978845608028654 * (x + 0.044715 * x**3)))


def gelu_tanh_torch(x):
    xf = x.float()
    return (0.5 * xf * (1 + torch.tanh(0.7978845608028654 * (xf + 0.044715 * xf**3)))).to(x.dtype)


def rmsnorm_gate_np(x, w, g):
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6) * w
    return y * (g / (1 + np.exp(-g)))


def rmsnorm_gate_torch(x, w, g):
    xf, gf = x.float(), g.float()
    y = xf * torch.rsqrt(torch.mean(xf * xf, dim=-1, keepdim=True) + 1e-6) * w
    return (y * (gf / (1 + torch.exp(-gf)))).to(x.dtype)


def _x(shape, dtype, dev):
    return [torch.randn(shape, device=dev).to(dtype)]


def _xw(shape, dtype, dev):
    return [*_x(shape, dtype, dev), (1 + 0.1 * torch.randn(shape[-1:], device=dev)).to(dtype)]


def _xwb(shape, dtype, dev):
    return [*_xw(shape, dtype, dev), (0.1 * torch.randn(shape[-1:], device=dev)).to(dtype)]


def _xwg(shape, dtype, dev):
    return [*_xw(shape, dtype, dev), torch.randn(shape, device=dev).to(dtype)]


def specs():
    """(name, build, kernforge fn, torch fn, bytes(shape, elem bytes, direction)) per case."""
    mn = lambda s: s[0] * s[1]  # noqa: E731
    two = lambda s, e, d: 2 * mn(s) * e  # noqa: E731
    return [
        ("softmax", _x, jit(softmax_np), softmax_torch, two),
        ("rms_norm", _xw, jit(rms_norm_np), rms_norm_torch, two),
        ("layer_norm", _xwb, jit(layer_norm_np), layer_norm_torch, two),
        ("gelu_tanh", _x, jit(gelu_tanh_np), gelu_tanh_torch, two),
        ("rmsnorm_gate", _xwg, jit(rmsnorm_gate_np), rmsnorm_gate_torch,
         lambda s, e, d: 3 * mn(s) * e),
    ]  # fmt: skip


def host_overhead(on_gpu: bool, calls: int = 2000) -> dict[str, float]:
    """Host microseconds per call of a cached ``kf.jit`` function on small inputs (one fused
    kernel), next to a bare Triton launch of the same kernel and a torch eager op."""
    dev = "cuda" if on_gpu else "cpu"
    f = jit(rmsnorm_gate_np)
    x, w, g = _xwg((8, 128), torch.float32, dev)

    def per_call(fn, n=calls) -> float:
        fn()
        if on_gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if on_gpu:
            torch.cuda.synchronize()
        return round((time.perf_counter() - t0) / n * 1e6, 2)

    n = calls if on_gpu else 20
    f(x, w, g)
    (program,) = [e.program for e in f._cache.values()]
    (step,) = program.steps  # one fused kernel
    bufs = [x, w, g, torch.empty_like(x)]  # the kernel's arguments, in its order
    bare = lambda: step.fn[step.grid](*bufs, num_warps=step.num_warps)  # noqa: E731
    return {
        "kf_jit_call_us": per_call(lambda: f(x, w, g), n),
        "bare_triton_launch_us": per_call(bare, n),
        "torch_add_us": per_call(lambda: torch.add(x, g), n),
    }


def first_call_seconds(on_gpu: bool, shape=(32768, 4096)) -> dict[str, dict[str, float]]:
    """Seconds of the first call of each case: trace, passes, code generation and the Triton
    compile, with Triton's binary cache empty ("cold"), then in a fresh ``kf.jit`` whose
    Triton binary is cached on disk ("warm": what a second process pays)."""
    dev = "cuda" if on_gpu else "cpu"
    if not on_gpu:
        shape = (16, 256)
    out: dict[str, dict[str, float]] = {}
    saved = os.environ.get("TRITON_CACHE_DIR")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["TRITON_CACHE_DIR"] = tmp
        try:
            for name, build, kf_fn, _t, _b in specs():
                args = build(shape, torch.bfloat16, dev)
                out[name] = {}
                for label in ("cold", "warm"):
                    fn = jit(kf_fn.fn)  # a fresh trace cache
                    loader.forget()  # and no compiled kernels in memory
                    t0 = time.perf_counter()
                    fn(*args)
                    if on_gpu:
                        torch.cuda.synchronize()
                    out[name][label] = round(time.perf_counter() - t0, 3)
        finally:
            if saved is None:
                os.environ.pop("TRITON_CACHE_DIR", None)
            else:
                os.environ["TRITON_CACHE_DIR"] = saved
    return out


def notes(env: dict) -> str:
    """The host-time and first-call figures of a run, for the results' notes."""
    host, first = env.get("jit_host_us"), env.get("jit_first_call_s")
    if not host:
        return ""
    cold = ", ".join(f"{k} {v['cold']:.2f} s" for k, v in first.items())
    warm = max(v["warm"] for v in first.values())
    return (
        f"Host time of a cached kf.jit call (rmsnorm_gate on [8, 128] fp32, one kernel): "
        f"{host['kf_jit_call_us']:.1f} us, against {host['bare_triton_launch_us']:.1f} us for "
        f"launching the same Triton kernel through Triton's launcher and "
        f"{host['torch_add_us']:.1f} us for one torch.add (bar: <= 30 us). First call (trace, "
        f"passes, codegen, Triton compile) with Triton's binary cache empty: {cold}; with "
        f"the binary cached on disk (a second process): <= {warm:.3f} s."
    )
