"""The decoder's shape and options (:class:`ModelConfig`), read from a Hugging Face
``config.json`` or taken from the built-in presets (``random:<name>`` models).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError, UnsupportedError

#: Hugging Face ``architectures`` / ``model_type`` names -> our architecture family.
ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder: pre-norm RMSNorm, rotary GQA attention, SwiGLU MLP.

    ``attention_bias``: q/k/v projections have a bias (Qwen2). ``qk_norm``: per-head RMSNorm of
    q and k before rope (Qwen3). ``sliding_window``: a query sees the last ``sliding_window``
    keys, itself included (Mistral), or None. ``rope_scaling``: Hugging Face's rope parameters
    beyond theta (``{"rope_type": "llama3", ...}``) or None.
    """

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.arch not in MODEL_TYPES:
            raise UnsupportedError(
                f"llm: architecture {self.arch!r} is not supported; kernforge.llm runs "
                f"{', '.join(MODEL_TYPES)}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"llm: config {name}={value!r} must be a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"llm: num_attention_heads={self.num_heads} must be a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"llm: head_dim={self.head_dim} must be even (rotary embedding)")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_params(self) -> int:
        """Parameters of the model (the tied embedding counted once)."""
        h, i = self.hidden_size, self.intermediate_size
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        if self.attention_bias:
            attn += self.q_size + 2 * self.kv_size
        if self.qk_norm:
            attn += 2 * self.head_dim
        layer = attn + 3 * h * i + 2 * h
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + embed + h

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (``max_position_embeddings=...``)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Read a Hugging Face ``config.json`` dict (transformers 4.x or 5.x spelling)."""
        archs = cfg.get("architectures") or []
        arch = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
        if arch is None:
            arch = cfg.get("model_type")
        if arch not in MODEL_TYPES:
            raise UnsupportedError(
                f"llm: architecture {archs or cfg.get('model_type')!r} is not supported; "
                f"kernforge.llm runs {', '.join(sorted(ARCHITECTURES))}"
            )
        try:
            hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
            rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
            theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
            rope.pop("partial_rotary_factor", None)
            if rope.get("rope_type", rope.get("type", "default")) == "default":
                rope = {}
            window = cfg.get("sliding_window")
            if arch in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
                window = None
            eos = cfg.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
            return cls(
                arch=arch,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=theta,
                rope_scaling=rope or None,
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=bool(cfg.get("attention_bias", arch == "qwen2")),
                qk_norm=arch == "qwen3",
                sliding_window=int(window) if window else None,
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=eos_ids,
            )
        except KeyError as e:
            raise ConfigError(f"llm: config.json has no {e.args[0]!r}") from None


#: Built-in shapes for ``random:<name>`` models (random weights, no download).
PRESETS: dict[str, ModelConfig] = {
    # The embedded default of `kernforge generate`: small enough for the CPU interpreter.
    "tiny": ModelConfig(
        arch="qwen2", vocab_size=512, hidden_size=64, intermediate_size=160, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0,
        max_position_embeddings=1024, tie_word_embeddings=True, attention_bias=True,
        eos_token_ids=(),
    ),
    "qwen2.5-1.5b": ModelConfig(
        arch="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
        num_layers=28, num_heads=12, num_kv_heads=2, head_dim=128, rope_theta=1000000.0,
        max_position_embeddings=32768, tie_word_embeddings=True, attention_bias=True,
        bos_token_id=151643, eos_token_ids=(151645, 151643),
    ),
    "llama3-8b": ModelConfig(
        arch="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rms_eps=1e-5,
        rope_theta=500000.0, max_position_embeddings=8192, bos_token_id=128000,
        eos_token_ids=(128001, 128009),
    ),
}  # fmt: skip


def preset(name: str) -> ModelConfig:
    """The built-in config called ``name`` (see :data:`PRESETS`)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(
            f"llm: no built-in model {name!r}; choose one of {', '.join(sorted(PRESETS))}"
        ) from None
