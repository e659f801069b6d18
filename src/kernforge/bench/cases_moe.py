"""Benchmark cases of the full MoE layer (``kernforge.nn.MoE``) against the naive torch loop.

Shapes (bf16): Mixtral-8x7B (8 experts, hidden 4096, intermediate 14336, top-2) and
Qwen1.5-MoE-A2.7B-like (64 experts, hidden 2048, intermediate 1408, top-8), 8192 tokens each.
The reference ``torch_loop`` is Hugging Face's eager experts loop
(:func:`kernforge.nn.torch_loop_moe`: for each expert, ``torch.where`` its tokens, run its MLP,
weight, ``index_add_``), router included in both. Bar: kernforge >= 3x the loop.

FLOPs count the expert GEMMs of the routed tokens only: ``6 * T * k * H * I`` forward (gate|up
and down projections), three times that forward+backward; the router (``2 * T * H * E``) is
left out. The loop synchronises with the host (``nonzero``/``torch.where``), so it cannot be
captured in a CUDA graph: it refuses capture up front, and the harness then times every
implementation of the case with CUDA events, host time included, the same for both.
"""

from __future__ import annotations

import torch

from ..dispatch import backend
from ..nn import MoE, torch_loop_moe
from .harness import Bar, Case, Result

#: Why the Mixtral bar is missed (from the H100 run of benchmarks/results/gemm.json).
NOTES = (
    "MoE layer: 8.7x (forward) and 19.1x (forward+backward) the HF-style torch loop at the "
    "64-expert Qwen-MoE shape; 1.50x and 2.05x at Mixtral, where the 3x bar cannot be met: with "
    "8 experts and top-2, each expert's 2048 tokens make large GEMMs that the loop already runs "
    "at 422 TFLOP/s (284 with backward), so 3x would be 1.27 PFLOP/s (852 with backward), above "
    "the H100's dense bf16 peak of 989 TFLOP/s and far above cuBLAS's measured ~700. The layer "
    "runs at 632 TFLOP/s forward there; its two grouped GEMMs are ~93% of the time."
)

#: (name, tokens, hidden, intermediate, experts, top_k).
GPU_SHAPES = [("mixtral", 8192, 4096, 14336, 8, 2), ("qwen-moe", 8192, 2048, 1408, 64, 8)]
CPU_SHAPES = [("mixtral", 24, 32, 48, 8, 2), ("qwen-moe", 24, 32, 24, 16, 4)]
TARGET_VS = {"torch_loop": 3.0}
DIRECTIONS = ("fwd", "fwd+bwd")


def _flops(t: int, h: int, i: int, k: int, direction: str) -> int:
    fwd = 6 * t * k * h * i
    return fwd if direction == "fwd" else 3 * fwd


def _nbytes(t: int, h: int, i: int, e: int, elem: int) -> int:
    """Weights read once, x read and y written once (forward)."""
    return (3 * e * h * i + e * h + 2 * t * h) * elem


def _rel_err(outs, refs) -> float:
    pairs = [(o.detach().double(), r.detach().double()) for o, r in zip(outs, refs, strict=True)]
    num = sum(float((o - r).norm()) ** 2 for o, r in pairs)
    den = sum(float(r.norm()) ** 2 for _, r in pairs)
    return (num / max(den, 1e-30)) ** 0.5


def _loop(m: MoE, x: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
    e = m.experts
    return torch_loop_moe(x, m.gate.weight, e.gate_up_proj, e.down_proj, m.top_k, m.scoring,
                          m.renormalize, m.activation, logits=logits)  # fmt: skip


def _refuse_capture() -> None:
    # Fail before any GPU work so that an aborted capture leaves nothing half-recorded.
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("the torch loop syncs with the host (torch.where): not capturable")


def _make(t: int, h: int, i: int, e: int, k: int, dtype: torch.dtype, dev: torch.device,
          direction: str):  # fmt: skip
    def make():
        torch.manual_seed(0)
        m = MoE(h, i, e, k, dtype=dtype, device=dev)
        x = torch.randn(t, h, device=dev, dtype=dtype)
        params = [m.gate.weight, m.experts.gate_up_proj, m.experts.down_proj]
        ref_dtype = torch.float32 if dev.type == "cuda" else torch.float64

        if direction == "fwd":

            @torch.no_grad()
            def kernforge():
                with backend("auto"):
                    return m(x)

            @torch.no_grad()
            def loop():
                _refuse_capture()
                return _loop(m, x)

        else:
            xg = x.detach().requires_grad_()
            gy = torch.randn(t, h, device=dev, dtype=dtype)

            def kernforge():
                with backend("auto"):
                    return torch.autograd.grad(m(xg), [xg, *params], gy)

            def loop():
                _refuse_capture()
                return torch.autograd.grad(_loop(m, xg), [xg, *params], gy)

        def check() -> float:
            # The reference routes on the layer's own (bf16) logits, so that a near tie that
            # rounding resolves differently does not pick another expert; its gradient still
            # flows to x and the router weight through the float32 logits.
            ref = MoE(h, i, e, k, dtype=ref_dtype, device=dev)
            ref.load_state_dict({n: p.detach().to(ref_dtype) for n, p in m.state_dict().items()})
            xr = x.detach().to(ref_dtype).requires_grad_(direction != "fwd")
            with torch.no_grad():
                got_logits = m.gate(x).to(ref_dtype)
            lr = torch.nn.functional.linear(xr, ref.gate.weight)
            lr = lr + (got_logits - lr).detach()
            want = _loop(ref, xr, logits=lr)
            if direction == "fwd":
                return _rel_err([kernforge()], [want])
            rparams = [ref.gate.weight, ref.experts.gate_up_proj, ref.experts.down_proj]
            want_g = torch.autograd.grad(want, [xr, *rparams], gy.to(ref_dtype))
            return _rel_err(kernforge(), want_g)

        return {"kernforge": kernforge, "torch_loop": loop}, check

    return make


def cases(on_gpu: bool, quick: bool = False) -> list[Case]:
    """The MoE layer at the issue's shapes (GPU) or tiny ones through the interpreter (CPU)."""
    dtype = torch.bfloat16
    dev = torch.device("cuda" if on_gpu else "cpu")
    shapes = GPU_SHAPES if on_gpu else CPU_SHAPES
    directions = DIRECTIONS
    if quick:
        shapes, directions = shapes[:1], ("fwd",)
    out = []
    for name, t, h, i, e, k in shapes:
        for direction in directions:
            out.append(Case(
                "gemm", f"moe_layer[{name}]", direction, (t, h, i, e, k), dtype,
                _nbytes(t, h, i, e, dtype.itemsize), _make(t, h, i, e, k, dtype, dev, direction),
                flops=_flops(t, h, i, k, direction), target_vs=dict(TARGET_VS),
            ))  # fmt: skip
    return out


def bars(results: list[Result]) -> list[Bar]:
    """The issue's bar: the full MoE layer (forward) >= 3x the torch loop, at every shape."""
    fwd = [r for r in results if r.op.startswith("moe_layer") and r.direction == "fwd"]
    vs = [r.vs["torch_loop"] for r in fwd if "torch_loop" in r.vs]
    if not vs or len(vs) != len(fwd):
        return []
    return [Bar("MoE layer fwd vs the torch loop (worst shape)", min(vs), TARGET_VS["torch_loop"])]
