"""A decode loop over a paged KV cache with ``ops.append_kv`` and ``ops.fmha_decode`` (GQA),
the same step from a fused q/k/v projection in one kernel (``ops.rope_append_fmha_decode``)
and one MLA decode step (``ops.mla_decode``), each checked against the torch reference.

    python examples/decode_attention.py

On a GPU the Triton kernels run compiled (bf16, Llama-3-8B-like heads: 32 query / 8 KV heads
of 128); without one they run small through Triton's CPU interpreter.
"""

from __future__ import annotations

import torch

import kernforge as kf
from kernforge import ops

on_gpu = torch.cuda.is_available()
dev = "cuda" if on_gpu else "cpu"
dtype = torch.bfloat16
B, HQ, HK, D = (4, 32, 8, 128) if on_gpu else (2, 4, 2, 32)
PAGE, PAGES_PER_SEQ = (64, 64) if on_gpu else (16, 4)  # capacity: 4096 (GPU) / 64 tokens


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# A paged cache: pages of PAGE tokens, handed to sequences in a shuffled order (as a serving
# engine's allocator would), and a block table [B, pages per sequence] of int32 page ids.
num_pages = B * PAGES_PER_SEQ + 3
k_cache = torch.zeros(num_pages, PAGE, HK, D, device=dev, dtype=dtype)
v_cache = torch.zeros_like(k_cache)
block_table = torch.randperm(num_pages, device=dev)[: B * PAGES_PER_SEQ].view(B, -1).int()
lens = torch.zeros(B, dtype=torch.int32, device=dev)  # tokens held per sequence

# Prefill: write each sequence's prompt K/V (random here) into the cache in one kernel.
prompt = PAGE + 5
k_new = torch.randn(B, prompt, HK, D, device=dev).to(dtype)
ops.append_kv(k_new, torch.randn_like(k_new), k_cache, v_cache, lens, block_table)
lens += prompt

# Decode steps: append the new token's K/V, then attend with its query (1 token per step).
for step in range(3):
    k_new = torch.randn(B, 1, HK, D, device=dev).to(dtype)
    ops.append_kv(k_new, torch.randn_like(k_new), k_cache, v_cache, lens, block_table)
    lens += 1  # cache_seqlens for fmha_decode include the new token
    q = torch.randn(B, 1, HQ, D, device=dev).to(dtype)
    out = ops.fmha_decode(q, k_cache, v_cache, lens, block_table)
    with kf.backend("torch"):
        ref = ops.fmha_decode(q.float(), k_cache.float(), v_cache.float(), lens, block_table)
    print(f"decode step {step}: out {tuple(out.shape)}, rel err vs fp32 {rel_err(out, ref):.2e}")

# Speculative decoding: 3 draft tokens at once, causal among themselves.
k_new = torch.randn(B, 3, HK, D, device=dev).to(dtype)
ops.append_kv(k_new, torch.randn_like(k_new), k_cache, v_cache, lens, block_table)
lens += 3
q = torch.randn(B, 3, HQ, D, device=dev).to(dtype)
out = ops.fmha_decode(q, k_cache, v_cache, lens, block_table, softcap=50.0)
with kf.backend("torch"):
    ref = ops.fmha_decode(q.float(), k_cache.float(), v_cache.float(), lens, block_table,
                          softcap=50.0)  # fmt: skip
print(f"3 draft tokens (softcap 50): rel err vs fp32 {rel_err(out, ref):.2e}")

# A decoder's step starts from its fused q/k/v projection [B, (HQ + 2 HK) D]: one kernel
# rotates q and k by rope at each sequence's position, appends k and v, and attends.
cos, sin = (t.to(dtype) for t in kf.nn.RotaryEmbedding(D, 4096, 10000.0, None, device=dev)(
    q, torch.arange(4096, device=dev)))  # fmt: skip
cos, sin = cos[0], sin[0]  # [positions, D]
qkv = torch.randn(B, (HQ + 2 * HK) * D, device=dev).to(dtype)
k_ref, v_ref = k_cache.float(), v_cache.float()
out = ops.rope_append_fmha_decode(qkv, cos, sin, lens, k_cache, v_cache, HQ, block_table)
with kf.backend("torch"):
    ref = ops.rope_append_fmha_decode(qkv.float(), cos.float(), sin.float(), lens, k_ref, v_ref,
                                      HQ, block_table)  # fmt: skip
lens += 1
print(
    f"rope + append + attend: out {tuple(out.shape)}, rel err vs fp32 {rel_err(out, ref):.2e}, "
    f"cache rel err {rel_err(k_cache, k_ref):.2e}"
)

# MLA (DeepSeek-V2/V3): one latent cache of 512 + 64 rope features per token, shared by all
# heads; q_nope is the no-rope query already multiplied by W_UK (the "absorbed" form).
H, DC, DR = (16, 512, 64) if on_gpu else (4, 64, 16)
ctx = 1000 if on_gpu else 40
kv = torch.randn(B, ctx + 8, DC + DR, device=dev).to(dtype)  # one fused latent cache
ckv, kpe = kv[..., :DC], kv[..., DC:]  # views: read in place
q_nope = torch.randn(B, 1, H, DC, device=dev).to(dtype)
q_rope = torch.randn(B, 1, H, DR, device=dev).to(dtype)
mla_lens = torch.full((B,), ctx, dtype=torch.int32, device=dev)
scale = (128 + DR) ** -0.5  # DeepSeek's softmax scale (before its YaRN factor)
latent = ops.mla_decode(q_nope, q_rope, ckv, kpe, mla_lens, scale=scale)
with kf.backend("torch"):
    ref = ops.mla_decode(q_nope.float(), q_rope.float(), ckv.float(), kpe.float(), mla_lens,
                         scale=scale)  # fmt: skip
print(f"MLA decode: latent out {tuple(latent.shape)}, rel err vs fp32 {rel_err(latent, ref):.2e}")
