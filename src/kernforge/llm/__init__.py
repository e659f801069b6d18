"""LLM generation on kernforge kernels: ``LLM(path).generate(prompts, max_new_tokens=...)``.

Loads a local Hugging Face folder (Llama, Mistral, Qwen2, Qwen3; config.json + safetensors) or
builds a random-weight model of a built-in shape (``"random:qwen2.5-1.5b"``), prefills a batch
of prompts in one varlen pass, decodes with CUDA graphs over a contiguous or paged KV cache, and
samples (greedy, temperature, top-k, top-p, repetition penalty, seeded). See docs/llm.md.
"""

from .cache import KVCache
from .config import PRESETS, ModelConfig, preset
from .engine import LLM, GenerationOutput, GenerationStats
from .sampling import Sampler, SamplingParams


def warmup(llm: LLM, shapes=None, workers: int | None = None, tune: bool = False):
    """Compile ``llm``'s prefill and decode kernels for ``shapes`` (batch x prompt tokens) in
    worker processes and capture its first graphs; returns the report
    (:func:`kernforge.tune.warmup.warmup_llm`)."""
    from ..tune.warmup import warmup_llm

    return warmup_llm(llm, shapes, workers, tune)


__all__ = [
    "LLM",
    "PRESETS",
    "GenerationOutput",
    "GenerationStats",
    "KVCache",
    "ModelConfig",
    "Sampler",
    "SamplingParams",
    "preset",
    "warmup",
]
