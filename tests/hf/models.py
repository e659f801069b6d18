"""Tiny random-weight transformers models for the kernforge.patch tests (no downloads)."""

from __future__ import annotations

import torch

from tests.helpers import DEVICE

#: Shared shape of the CPU models: 2 layers, 4 query heads and 2 KV heads of dim 16 (GQA), an
#: odd vocabulary. Small enough for Triton's interpreter.
TINY = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=128,
    vocab_size=101,
    max_position_embeddings=64,
)

#: The GPU models (bf16): Llama-like blocks at a size where the kernels take their real paths.
BIG = dict(
    hidden_size=1024,
    num_hidden_layers=4,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=64,
    intermediate_size=2816,
    vocab_size=32000,
    max_position_embeddings=1024,
)

#: Per-architecture extras: sliding windows shorter than the test sequences (Mistral on every
#: layer, Qwen2 on its second layer only), MoE sizes, a dense MLP layer in Qwen3-MoE, and
#: Qwen2-MoE's shared expert.
EXTRA: dict[str, dict] = {
    "llama": {},
    "mistral": {"sliding_window": 8},
    "qwen2": {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1},
    "qwen3": {},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 48,
    },
    "qwen3_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "mlp_only_layers": [1],
    },
}

BIG_EXTRA: dict[str, dict] = {
    "llama": {},
    "mistral": {"sliding_window": 256},
    "qwen3": {},
    "mixtral": {"num_local_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 1408},
    "qwen3_moe": {"num_experts": 16, "num_experts_per_tok": 4, "moe_intermediate_size": 512},
}

ARCHS = list(EXTRA)
MOE_ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe"]


def config(model_type: str, big: bool = False, **overrides):
    """A transformers config of the tiny (or big) model of ``model_type``."""
    from transformers import AutoConfig

    base, extra = (BIG, BIG_EXTRA) if big else (TINY, EXTRA)
    kw = {**base, **extra[model_type], **overrides}
    return AutoConfig.for_model(model_type, **kw)


def model(model_type: str, dtype: torch.dtype = torch.float32, big: bool = False,
          device: torch.device | str = DEVICE, **overrides):  # fmt: skip
    """A random-weight ``AutoModelForCausalLM`` (sdpa attention) in ``dtype`` on ``device``
    (the GPU where there is one, as every kernel test; else the CPU and the interpreter)."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_config(config(model_type, big, **overrides))
    return m.to(device=device, dtype=dtype)


def tokens(batch: int, seq: int, vocab: int, device=DEVICE) -> torch.Tensor:
    """Random token ids [batch, seq], never 0 (the tests' pad token: generate() would take a 0
    in a prompt for padding)."""
    return torch.randint(1, vocab, (batch, seq), device=device)
