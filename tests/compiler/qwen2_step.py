"""A tiny random-weight Hugging Face Qwen2 as a compilable decode step: HF's own modules, with
the KV cache passed in and returned (out-of-place ``index_copy``), so prefill and decode are
two programs of fixed shapes. Shared by test_qwen2.py and the GPU benchmark."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F  # noqa: N812

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny_qwen2(seed: int = 0, layers: int = 2):
    """A random Qwen2ForCausalLM: hidden 32, 4 query heads, 2 kv heads, head dim 8."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-6, attn_implementation="eager",
    )  # fmt: skip
    return Qwen2ForCausalLM(cfg).eval()


class Qwen2Step(torch.nn.Module):
    """``(ids [B, S], pos [S], k_cache, v_cache [L, B, Hk, T, D]) -> (logits, k_cache,
    v_cache)``: one prefill (S > 1) or decode (S = 1) step over a static cache of T rows."""

    def __init__(self, hf) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, ids, pos, k_cache, v_cache):
        from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

        m = self.hf.model
        b, s = ids.shape
        t = k_cache.shape[3]
        h = m.embed_tokens(ids)
        cos, sin = m.rotary_emb(h, pos[None].expand(b, s))
        mask = torch.arange(t, device=ids.device)[None, :] <= pos[:, None]  # [S, T]
        ks, vs = [], []
        for i, layer in enumerate(m.layers):
            a = layer.self_attn
            x = layer.input_layernorm(h)
            d = a.head_dim
            q = a.q_proj(x).view(b, s, -1, d).transpose(1, 2)
            k = a.k_proj(x).view(b, s, -1, d).transpose(1, 2)
            v = a.v_proj(x).view(b, s, -1, d).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            kc = k_cache[i].index_copy(2, pos, k)
            vc = v_cache[i].index_copy(2, pos, v)
            o = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, enable_gqa=True)
            h = h + a.o_proj(o.transpose(1, 2).reshape(b, s, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            ks.append(kc)
            vs.append(vc)
        return self.hf.lm_head(m.norm(h)), torch.stack(ks), torch.stack(vs)


def empty_cache(hf, batch: int, rows: int, dtype=torch.float32, device="cpu"):
    """Zeroed k and v caches [L, B, Hk, rows, D] for ``hf``."""
    c = hf.config
    d = c.hidden_size // c.num_attention_heads
    shape = (c.num_hidden_layers, batch, c.num_key_value_heads, rows, d)
    return torch.zeros(shape, dtype=dtype, device=device), torch.zeros(
        shape, dtype=dtype, device=device
    )
