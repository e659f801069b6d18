"""The decoder forward passes, on catalog ops only: a varlen prefill of packed prompts and a
decode step of one new token per sequence, both writing keys and values to a :class:`KVCache`.

Per layer, on the residual stream ``h``: ``fused_linear`` for q/k/v (the attention norm and
the bias fused); for prefill ``rope``, the cache write and ``fmha_varlen``; for decode
``rope_append_fmha_decode`` (qk-norm, rope, the cache write and attention in one kernel); then
``fused_linear`` o (the residual add fused), ``fused_linear`` gate/up (the MLP norm and SwiGLU
fused: gate and up rows interleaved in the weight) and ``fused_linear`` down (the residual
add); at the end ``fused_linear`` for the head (the final norm). With at most 16 rows (decode)
each ``fused_linear`` is one launch of kernforge's CUDA GEMV (but for the norm before the
GEMVs too large to carry it, ``kernels.linear.norm_mode``); prefill runs the norm, cuBLAS,
SwiGLU and the add one after another.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops
from ..kernels.common import dependent_launches
from ..nn.rotary import RotaryEmbedding
from .cache import KVCache
from .config import ModelConfig
from .weights import DecoderWeights, LayerWeights


def rope_tables(config: ModelConfig, length: int, dtype: torch.dtype,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """cos/sin [length, head_dim] in ``dtype`` for positions 0..length-1, from
    :class:`kernforge.nn.RotaryEmbedding` (fp32 math, as Hugging Face's)."""
    rotary = RotaryEmbedding(config.head_dim, length, config.rope_theta, config.rope_scaling,
                             device=device)  # fmt: skip
    like = torch.empty(0, dtype=dtype, device=device)
    cos, sin = rotary(like, torch.arange(length, device=device))
    return cos[0], sin[0]


class Decoder:
    """A loaded model: its config, weights and rope tables; stateless between calls."""

    def __init__(self, config: ModelConfig, weights: DecoderWeights, max_seq_len: int):
        self.config, self.weights = config, weights
        self.dtype, self.device = weights.embed.dtype, weights.embed.device
        self.cos, self.sin = rope_tables(config, max_seq_len, self.dtype, self.device)
        #: Launch the decode step's kernels as programmatic dependent launches (sm_90+).
        self.dependent_launches = True
        w = config.sliding_window
        self.window = None if w is None else (w - 1, 0)  # HF: keys p - w < j <= p

    def _qkv(self, h: torch.Tensor, layer: LayerWeights, shape: tuple[int, ...]):
        """q [*shape, Hq, D], k and v [*shape, Hk, D] (views of one projection's output) of the
        normed residual stream ``h``."""
        c = self.config
        qkv = ops.fused_linear(h, layer.qkv, layer.qkv_bias, layer.attn_norm, c.rms_eps)
        q = qkv[..., : c.q_size].view(*shape, c.num_heads, c.head_dim)
        k = qkv[..., c.q_size : c.q_size + c.kv_size].view(*shape, c.num_kv_heads, c.head_dim)
        v = qkv[..., c.q_size + c.kv_size :].view(*shape, c.num_kv_heads, c.head_dim)
        if c.qk_norm:
            q = ops.rms_norm(q, layer.q_norm, c.rms_eps)
            k = ops.rms_norm(k, layer.k_norm, c.rms_eps)
        return q, k, v

    def _mlp(self, h: torch.Tensor, layer: LayerWeights) -> torch.Tensor:
        """``h + down(swiglu(gate_up(rms_norm(h))))``: the MLP block on the residual stream."""
        act = ops.fused_linear(h, layer.gate_up, None, layer.mlp_norm, self.config.rms_eps,
                               swiglu=True)  # fmt: skip
        return ops.fused_linear(act, layer.down, residual=h)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        w = self.weights
        return ops.fused_linear(h, w.lm_head, None, w.final_norm, self.config.rms_eps)

    def prefill(self, tokens: torch.Tensor, positions: torch.Tensor, cu_seqlens: torch.Tensor,
                max_len: int, slots: torch.Tensor, last: torch.Tensor,
                cache: KVCache) -> torch.Tensor:  # fmt: skip
        """Run packed prompts: ``tokens``/``positions`` [T] (sequence b is rows
        ``cu_seqlens[b]:cu_seqlens[b+1]``), their keys/values written to cache ``slots`` [T];
        returns the logits [n, vocab] of the rows ``last`` [n] (each prompt's last token)."""
        c, n_tok = self.config, tokens.shape[0]
        h = F.embedding(tokens, self.weights.embed)
        for i, layer in enumerate(self.weights.layers):
            q, k, v = self._qkv(h, layer, (1, n_tok))
            q, k = ops.rope(q, k, self.cos, self.sin, position_ids=positions[None])
            k_cache, v_cache = cache.layer(i)
            flat = (-1, c.num_kv_heads, c.head_dim)
            k_cache.view(flat).index_copy_(0, slots, k[0])
            v_cache.view(flat).index_copy_(0, slots, v[0])
            o = ops.fmha_varlen(q[0], k[0], v[0], cu_seqlens, cu_seqlens, max_len, max_len,
                                causal=True, window=self.window)  # fmt: skip
            h = self._mlp(ops.fused_linear(o.reshape(n_tok, c.q_size), layer.o, residual=h), layer)
        return self._logits(h[last])

    def decode(self, tokens: torch.Tensor, lens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One new token per sequence row: ``tokens`` [B] at positions ``lens`` [B] (int32,
        the cached length of each row before this token); returns logits [B, vocab]. The
        caller advances ``lens``. On Hopper its kernels are programmatic dependent launches
        (``dependent_launches``): each starts while the previous one finishes."""
        with dependent_launches(self.dependent_launches):
            return self._decode(tokens, lens, cache)

    def _decode(self, tokens: torch.Tensor, lens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        c, rows = self.config, tokens.shape[0]
        h = F.embedding(tokens, self.weights.embed)
        table = cache.table(rows)
        for i, layer in enumerate(self.weights.layers):
            qkv = ops.fused_linear(h, layer.qkv, layer.qkv_bias, layer.attn_norm, c.rms_eps)
            k_cache, v_cache = cache.layer(i)
            if table is None:
                k_cache, v_cache = k_cache[:rows], v_cache[:rows]
            o = ops.rope_append_fmha_decode(qkv, self.cos, self.sin, lens, k_cache, v_cache,
                                            c.num_heads, table, layer.q_norm, layer.k_norm,
                                            c.rms_eps, window=self.window)  # fmt: skip
            h = self._mlp(ops.fused_linear(o.view(rows, c.q_size), layer.o, residual=h), layer)
        return self._logits(h)
