"""Benchmark cases of flash attention (``ops.fmha``, ``ops.fmha_varlen``).

The issue's bars (H100, bf16): forward at batch * seq = 16k tokens, seq in {1k, 4k, 16k}, head
dim 128 (16 heads) and 64 (32 heads): hidden 2048, causal and not, >= 1.3x torch SDPA's flash
backend and reported against its cuDNN backend; the backward (``autograd.grad`` of the forward's
output, retain_graph) >= 1.2x SDPA flash's backward; the varlen forward on a mix of lengths at
>= 0.9x the dense kernel's TFLOP/s (varlen counted on its real tokens, the dense kernel on the
same sequences padded to the longest, counted on all it computes). SDPA runs [B, H, S, D]; so
does kernforge here (``layout="bhsd"``). FLOPs: 4 * B * H * Sq * Sk * D forward (halved when
causal), 2.5x that backward.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .. import ops
from ..dispatch import backend
from ..kernels.attention import attention_math
from .harness import Bar, Case, Result, geomean

FAMILY = "attention"
TOKENS = 16384
SEQS = (1024, 4096, 16384)
HEADS = {128: 16, 64: 32}  # head dim -> heads (hidden 2048)
FWD_VS = {"sdpa_flash": 1.3}
BWD_VS = {"sdpa_flash": 1.2}
VARLEN_BAR = 0.9
#: Sequence lengths of the varlen cases: a mix summing to about 16k tokens.
VARLEN_LENS = (4096, 517, 2048, 1, 3000, 1000, 2200, 1523, 777, 1202)
#: Heads checked against the fp32 reference (the whole batch would need S^2 memory per head).
CHECK_HEADS = 2


def _flops(b: int, h: int, sq: int, sk: int, d: int, causal: bool) -> int:
    f = 4 * b * h * sq * sk * d
    return f // 2 if causal else f


def _sdpa(kind: str, q, k, v, causal: bool) -> Callable[[], torch.Tensor]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    which = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[kind]

    def run():
        with sdpa_kernel([which]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return run


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def _dense_case(b: int, h: int, s: int, d: int, causal: bool, direction: str, on_gpu: bool,
                dtype: torch.dtype) -> Case:  # fmt: skip
    dev = "cuda" if on_gpu else "cpu"
    flops = _flops(b, h, s, s, d, causal) * (5 if direction == "bwd" else 2) // 2
    nbytes = 4 * b * h * s * d * dtype.itemsize * (2 if direction == "bwd" else 1)
    op = "fmha_causal" if causal else "fmha"

    def make():
        grad = direction == "bwd"
        q, k, v = (torch.randn(b, h, s, d, device=dev, dtype=dtype).requires_grad_(grad)
                   for _ in range(3))  # fmt: skip

        def ours():
            with backend("triton"):
                return ops.fmha(q, k, v, causal=causal, layout="bhsd")

        fwd = {"kernforge": ours}
        if on_gpu:
            for kind in ("flash", "cudnn"):
                fn = _sdpa(kind, q, k, v, causal)
                try:  # a backend that refuses these inputs is left out, not fatal to the case
                    fn()
                except RuntimeError:
                    continue
                fwd[f"sdpa_{kind}"] = fn
        else:
            fwd["torch"] = lambda: attention_math(q, k, v, 1 / math.sqrt(d), -1,
                                                  0 if causal else -1, 0.0)[0]  # fmt: skip
        if not grad:
            impls = fwd
        else:
            outs = {name: fn() for name, fn in fwd.items()}
            dout = torch.randn_like(outs["kernforge"])
            impls = {
                name: (lambda o=o: torch.autograd.grad(o, (q, k, v), dout, retain_graph=True))
                for name, o in outs.items()
            }

        def check() -> float:
            hs = slice(0, min(CHECK_HEADS, h))
            qs, ks, vs = (t.detach()[:1, hs].float().requires_grad_(grad) for t in (q, k, v))
            ref, _ = attention_math(qs, ks, vs, 1 / math.sqrt(d), -1, 0 if causal else -1, 0.0)
            out = ours()
            if not grad:
                return _rel(out[:1, hs], ref)
            dout_s = torch.randn_like(ref)
            full = torch.zeros_like(out)
            full[:1, hs] = dout_s.to(out.dtype)
            got = torch.autograd.grad(out, (q, k, v), full)
            want = torch.autograd.grad(ref, (qs, ks, vs), dout_s)
            return max(_rel(g[:1, hs], w) for g, w in zip(got, want, strict=True))

        return impls, check

    target = (BWD_VS if direction == "bwd" else FWD_VS) if on_gpu else None
    return Case(FAMILY, op, direction, (b, h, s, d), dtype, nbytes, make, flops=flops,
                target_vs=target)  # fmt: skip


def _varlen_case(lens: tuple[int, ...], h: int, d: int, causal: bool, on_gpu: bool,
                 dtype: torch.dtype) -> Case:  # fmt: skip
    """Varlen forward on ``lens``, raced against the dense kernel on the same sequences padded
    to the longest ("dense_padded"); the shape records (heads, head dim, *lengths)."""
    dev = "cuda" if on_gpu else "cpu"
    total, longest = sum(lens), max(lens)
    flops = sum(_flops(1, h, n, n, d, causal) for n in lens)

    def make():
        q, k, v = (torch.randn(total, h, d, device=dev, dtype=dtype) for _ in range(3))
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32,
                          device=dev)  # fmt: skip
        pad = [torch.zeros(len(lens), longest, h, d, device=dev, dtype=dtype) for _ in range(3)]
        for i, (a, n) in enumerate(zip(cu.tolist()[:-1], lens, strict=True)):
            for p, t in zip(pad, (q, k, v), strict=True):
                p[i, :n] = t[a : a + n]
        pq, pk, pv = (p.transpose(1, 2) for p in pad)  # bhsd views, as the dense cases

        def ours():
            return ops.fmha_varlen(q, k, v, cu, cu, longest, longest, causal=causal)

        def dense():
            return ops.fmha(pq, pk, pv, causal=causal, layout="bhsd")

        def check() -> float:
            i = max(range(len(lens)), key=lambda j: lens[j])  # the longest sequence, 2 heads
            a, n = cu.tolist()[i], lens[i]
            sl = [t[a : a + n, :CHECK_HEADS].transpose(0, 1)[None].float() for t in (q, k, v)]
            ref, _ = attention_math(*sl, 1 / math.sqrt(d), -1, 0 if causal else -1, 0.0)
            return _rel(ours()[a : a + n, :CHECK_HEADS].transpose(0, 1)[None], ref)

        return {"kernforge": ours, "dense_padded": dense}, check

    op = "fmha_varlen_causal" if causal else "fmha_varlen"
    return Case(FAMILY, op, "fwd", (h, d, *lens), dtype, 4 * total * h * d * dtype.itemsize,
                make, flops=flops)  # fmt: skip


def cases(on_gpu: bool, quick: bool = False) -> list[Case]:
    """The attention cases (see the module docs); without a GPU, tiny shapes through the
    interpreter, checked against the fp32 reference."""
    if not on_gpu:
        dt = torch.bfloat16
        out = [_dense_case(1, 2, 40, 64, c, dr, False, dt) for c in (False, True)
               for dr in ("fwd", "bwd")]  # fmt: skip
        out += [_varlen_case((17, 1, 30), 2, 64, True, False, dt)]
        return out
    dt = torch.bfloat16
    out = []
    seqs = SEQS[1:2] if quick else SEQS
    for direction in ("fwd", "bwd"):
        for d, h in HEADS.items():
            for s in seqs:
                for causal in (False, True):
                    out.append(_dense_case(TOKENS // s, h, s, d, causal, direction, True, dt))
    for causal in (False, True):
        out.append(_varlen_case(VARLEN_LENS, HEADS[128], 128, causal, True, dt))
    return out


def _varlen_ratio(r: Result) -> float | None:
    """Varlen TFLOP/s on real tokens over the dense kernel's TFLOP/s on the padded batch."""
    if "kernforge" not in r.ms or "dense_padded" not in r.ms:
        return None
    h, d, *lens = r.shape
    causal = r.op.endswith("causal")
    padded = _flops(len(lens), h, max(lens), max(lens), d, causal)
    dense_tflops = padded / (r.ms["dense_padded"] * 1e-3) / 1e12
    return r.tflops["kernforge"] / dense_tflops


def bars(results: list[Result]) -> list[Bar]:
    """Geometric means of the speed-ups over SDPA flash (forward 1.3x, backward 1.2x) and over
    cuDNN (the aim: 1.0x), and the varlen-over-dense TFLOP/s ratio (0.9) per varlen case."""
    out = []
    for direction, target in (("fwd", FWD_VS["sdpa_flash"]), ("bwd", BWD_VS["sdpa_flash"])):
        rs = [r for r in results if r.direction == direction and r.op.startswith("fmha")
              and not r.op.startswith("fmha_varlen") and not r.error]  # fmt: skip
        flash = [r.vs["sdpa_flash"] for r in rs if "sdpa_flash" in r.vs]
        if flash:
            out.append(Bar(f"fmha {direction}: geomean x SDPA flash", geomean(flash), target))
        cudnn = [r.vs["sdpa_cudnn"] for r in rs if "sdpa_cudnn" in r.vs]
        if cudnn:
            out.append(Bar(f"fmha {direction}: geomean x SDPA cuDNN (aim)", geomean(cudnn), 1.0))
    for r in results:
        if r.op.startswith("fmha_varlen") and not r.error:
            ratio = _varlen_ratio(r)
            if ratio is not None:
                name = f"{r.op}: real-token TFLOP/s / dense kernel TFLOP/s"
                out.append(Bar(name, ratio, VARLEN_BAR))
    return out
