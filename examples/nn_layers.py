"""kernforge.nn layers: a small pre-norm decoder block built from them, forward and backward.

    PYTHONPATH=src python examples/nn_layers.py           # the block (GPU, or CPU interpreter)
    PYTHONPATH=src python examples/nn_layers.py --bench   # GPU: SwiGLUMLP vs transformers'
                                                          # LlamaMLP, time and memory

The layers keep the parameter names of their Hugging Face / torch counterparts, so a state dict
moves between them as it is (shown with transformers' LlamaMLP when transformers is installed).
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from kernforge import nn as knn

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class Block(torch.nn.Module):
    """Llama's decoder layer: x + attn(norm(x)), then h + mlp(norm(h)) (the second residual add
    fused into the norm)."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, intermediate: int) -> None:
        super().__init__()
        self.input_layernorm = knn.RMSNorm(hidden)
        self.self_attn = knn.Attention(hidden, heads, kv_heads)
        self.post_attention_layernorm = knn.RMSNorm(hidden)
        self.mlp = knn.SwiGLUMLP(hidden, intermediate)

    def forward(self, x, position_embeddings):
        a = self.self_attn(self.input_layernorm(x), position_embeddings)
        y, h = self.post_attention_layernorm(a, residual=x)  # y = norm(x + a), h = x + a
        return h + self.mlp(y)


def demo() -> None:
    """Run the block on random tokens, then swap state dicts with transformers' LlamaMLP."""
    hidden, heads, kv, inter, dt = 64, 4, 2, 96, torch.bfloat16
    block = Block(hidden, heads, kv, inter).to(DEVICE, dt)
    rotary = knn.RotaryEmbedding(hidden // heads, base=10000.0, device=DEVICE)
    x = torch.randn(2, 16, hidden, device=DEVICE, dtype=dt, requires_grad=True)
    pos = torch.arange(16, device=DEVICE)[None].expand(2, 16)
    y = block(x, rotary(x, pos))
    y.float().square().mean().backward()
    print(f"block: y {tuple(y.shape)} {y.dtype}, |dx| = {x.grad.float().norm():.3f}")
    print("state dict:", sorted(block.state_dict())[:6], "...")
    try:
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaMLP
    except ImportError:
        return
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter)
    hf = LlamaMLP(cfg).to(DEVICE, dt)
    block.mlp.load_state_dict(hf.state_dict(), strict=True)  # the same keys
    h = torch.randn(32, hidden, device=DEVICE, dtype=dt)
    diff = (block.mlp(h).float() - hf(h).float()).abs().max().item()
    print(f"SwiGLUMLP vs transformers LlamaMLP, same weights: max |diff| = {diff:.2e}")


def bench(tokens: int, hidden: int, inter: int, compile_hf: bool) -> dict:
    """Forward+backward of SwiGLUMLP against transformers' LlamaMLP (and its torch.compile):
    median ms, TFLOP/s, the memory held from the forward to the backward, and the peak."""
    import triton
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    dt = torch.bfloat16
    torch.manual_seed(0)
    hf = LlamaMLP(LlamaConfig(hidden_size=hidden, intermediate_size=inter)).to("cuda", dt)
    ours = knn.SwiGLUMLP(hidden, inter, device="cuda", dtype=dt)
    ours.load_state_dict(hf.state_dict())
    x = torch.randn(tokens, hidden, device="cuda", dtype=dt, requires_grad=True)
    dy = torch.randn(tokens, hidden, device="cuda", dtype=dt)
    flops = 3 * 3 * 2 * tokens * hidden * inter  # 3 GEMMs forward, 6 backward
    models = {"kernforge SwiGLUMLP": ours, "HF LlamaMLP eager": hf}
    if compile_hf:
        models["HF LlamaMLP torch.compile"] = torch.compile(hf)
    # Correctness at this shape first: the two against each other, outputs and dx.
    y0 = hf(x)
    (dx0,) = torch.autograd.grad(y0, x, dy)
    y1 = ours(x)
    (dx1,) = torch.autograd.grad(y1, x, dy)
    rel = [((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in
           ((y1, y0), (dx1, dx0))]  # fmt: skip
    del y0, dx0, y1, dx1
    rows = {}
    for name, m in models.items():
        params = list(m.parameters())

        def step(m=m, params=params):
            m(x).backward(dy)

        for p in [x, *params]:
            p.grad = None
        step()  # warm-up: compiles, cuBLAS handles
        for p in [x, *params]:
            p.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        y = m(x)
        held = torch.cuda.memory_allocated() - base - y.numel() * y.element_size()
        torch.cuda.reset_peak_memory_stats()
        y.backward(dy)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del y
        ms = triton.testing.do_bench(step, warmup=50, rep=300, grad_to_none=[x, *params],
                                     return_mode="median")  # fmt: skip
        rows[name] = {"ms": ms, "tflops": flops / ms * 1e-9, "held_mb": held / 2**20,
                      "peak_mb": peak / 2**20}  # fmt: skip
    print(f"SwiGLU MLP fwd+bwd, tokens {tokens}, hidden {hidden}, intermediate {inter}, bf16, "
          f"{torch.cuda.get_device_name()}")  # fmt: skip
    print(f"kernforge vs HF eager: rel err y {rel[0]:.2e}, dx {rel[1]:.2e}")
    ref = rows["HF LlamaMLP eager"]
    print(f"{'':28s} {'ms':>8s} {'TFLOP/s':>8s} {'held MB':>9s} {'peak MB':>9s} {'speedup':>8s}")
    for name, r in rows.items():
        print(f"{name:28s} {r['ms']:8.3f} {r['tflops']:8.1f} {r['held_mb']:9.0f} "
              f"{r['peak_mb']:9.0f} {ref['ms'] / r['ms']:7.2f}x")  # fmt: skip
    return {"shape": [tokens, hidden, inter], "rel_err": rel, "rows": rows}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", action="store_true", help="time the MLP (needs a GPU)")
    parser.add_argument("--shape", type=int, nargs=3, default=[8192, 2048, 8192],
                        metavar=("TOKENS", "HIDDEN", "INTER"))  # fmt: skip
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of HF's")
    parser.add_argument("--json", help="write the bench numbers to this file")
    args = parser.parse_args()
    if not args.bench:
        demo()
    elif not torch.cuda.is_available():
        raise SystemExit("--bench needs a CUDA GPU")
    else:
        result = bench(*args.shape, compile_hf=not args.no_compile)
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
