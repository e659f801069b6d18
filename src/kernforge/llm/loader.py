"""Load a local Hugging Face model folder (``config.json`` + safetensors) into
:class:`~kernforge.llm.weights.DecoderWeights`, make random weights of a config, and map the
fused layout back to Hugging Face names.

Weights go shard by shard straight to the target device: every destination tensor (the fused
``qkv`` and ``gate_up`` included) is allocated first, then each stored tensor is read onto the
device and copied (cast) into its slot, so peak memory is the model plus one tensor and a fused
matrix whose parts sit in different shards loads the same as any other.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from ..errors import ConfigError, ShapeError, UnsupportedError
from ..progress import Progress
from .config import ModelConfig
from .weights import DecoderWeights, LayerWeights

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

#: Stored tensors that are not weights of the model (recomputed at run time): not loaded,
#: not warned about.
_KNOWN_EXTRAS = ("rotary_emb.inv_freq",)
#: Safetensors dtypes we cast from; anything else (int8/fp8/packed ints) is a quantized
#: checkpoint, which needs its own kernels.
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


def _folder(folder: str | os.PathLike) -> Path:
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ConfigError(
            f"llm: model folder {str(path)!r} does not exist or is not a folder; pass a local "
            "Hugging Face model folder (config.json + *.safetensors)"
        )
    return path


def load_config(folder: str | os.PathLike) -> ModelConfig:
    """The :class:`ModelConfig` of the Hugging Face model folder ``folder`` (its config.json)."""
    path = _folder(folder) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(
            f"llm: {str(path)!r} not found; a Hugging Face model folder has a config.json "
            "(save one with model.save_pretrained(folder))"
        )
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"llm: {str(path)!r} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"llm: {str(path)!r} holds a {type(cfg).__name__}, expected an object")
    return ModelConfig.from_hf(cfg)


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The safetensors files of ``folder`` in load order: the shards that
    ``model.safetensors.index.json`` names, else ``model.safetensors``, else every
    ``*.safetensors``. Raises ConfigError when there are none or a listed shard is missing."""
    root = _folder(folder)
    index = root / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ConfigError(
                f"llm: {str(index)!r} is not a safetensors index (expected JSON with a "
                f"'weight_map' object): {e}"
            ) from None
        names = list(dict.fromkeys(weight_map.values()))  # first-seen order, no repeats
        missing = [n for n in names if not (root / n).is_file()]
        if missing:
            raise ConfigError(
                f"llm: {INDEX_FILE} in {str(root)!r} names shard file(s) that do not exist: "
                f"{', '.join(missing)}; the download is incomplete (fetch the missing shards)"
            )
        return [root / n for n in names]
    if (root / WEIGHTS_FILE).is_file():
        return [root / WEIGHTS_FILE]
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise ConfigError(
            f"llm: no weight files in {str(root)!r}: expected {WEIGHTS_FILE}, {INDEX_FILE} with "
            "its shards, or *.safetensors (PyTorch .bin checkpoints are not read; re-save with "
            "save_pretrained(folder, safe_serialization=True))"
        )
    return files


def _empty_weights(config: ModelConfig, dtype: torch.dtype, device) -> DecoderWeights:
    """Uninitialised weights with every tensor in its final place (fused ones whole)."""
    c = config
    h, qkv_rows = c.hidden_size, c.q_size + 2 * c.kv_size

    def empty(*shape: int) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=device)

    layers = [
        LayerWeights(
            attn_norm=empty(h),
            qkv=empty(qkv_rows, h),
            qkv_bias=empty(qkv_rows) if c.attention_bias else None,
            q_norm=empty(c.head_dim) if c.qk_norm else None,
            k_norm=empty(c.head_dim) if c.qk_norm else None,
            o=empty(h, c.q_size),
            mlp_norm=empty(h),
            gate_up=empty(2 * c.intermediate_size, h),
            down=empty(h, c.intermediate_size),
        )
        for _ in range(c.num_layers)
    ]
    embed = empty(c.vocab_size, h)
    lm_head = embed if c.tie_word_embeddings else empty(c.vocab_size, h)
    return DecoderWeights(embed=embed, layers=layers, final_norm=empty(h), lm_head=lm_head)


def _hf_items(weights: DecoderWeights, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, view into ``weights``) for every tensor a checkpoint stores;
    ``lm_head.weight`` only when untied. The fused tensors are split into row views."""
    c = config
    q, kv = c.q_size, c.kv_size
    yield "model.embed_tokens.weight", weights.embed
    for i, layer in enumerate(weights.layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", layer.attn_norm
        yield p + "self_attn.q_proj.weight", layer.qkv[:q]
        yield p + "self_attn.k_proj.weight", layer.qkv[q : q + kv]
        yield p + "self_attn.v_proj.weight", layer.qkv[q + kv :]
        if layer.qkv_bias is not None:
            yield p + "self_attn.q_proj.bias", layer.qkv_bias[:q]
            yield p + "self_attn.k_proj.bias", layer.qkv_bias[q : q + kv]
            yield p + "self_attn.v_proj.bias", layer.qkv_bias[q + kv :]
        if layer.q_norm is not None:
            yield p + "self_attn.q_norm.weight", layer.q_norm
        if layer.k_norm is not None:
            yield p + "self_attn.k_norm.weight", layer.k_norm
        yield p + "self_attn.o_proj.weight", layer.o
        yield p + "post_attention_layernorm.weight", layer.mlp_norm
        yield p + "mlp.gate_proj.weight", layer.gate_up[0::2]  # rows interleaved (weights.py)
        yield p + "mlp.up_proj.weight", layer.gate_up[1::2]
        yield p + "mlp.down_proj.weight", layer.down
    yield "model.norm.weight", weights.final_norm
    if not c.tie_word_embeddings:
        yield "lm_head.weight", weights.lm_head


def _scan(files: list[Path], shapes: dict[str, tuple[int, ...]], config: ModelConfig) -> list[str]:
    """Check every shard's header against ``shapes`` (HF name -> expected shape) before any
    memory is allocated or tensor read, so a bad folder fails in milliseconds, not after
    minutes of loading; returns the names of stored tensors the model does not use."""
    from safetensors import safe_open

    found: set[str] = set()
    unknown: list[str] = []
    for path in files:
        try:
            f = safe_open(str(path), framework="pt", device="cpu")  # header only: no data read
        except Exception as e:  # safetensors raises its own error type for a corrupt header
            raise ConfigError(f"llm: cannot read {str(path)!r} as safetensors: {e}") from None
        with f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                expected = shapes.get(name)
                if expected is None:
                    tied_head = name == "lm_head.weight" and config.tie_word_embeddings
                    if not tied_head and not name.endswith(_KNOWN_EXTRAS):
                        unknown.append(name)
                    continue
                info = f.get_slice(name)
                shape, dtype = tuple(info.get_shape()), info.get_dtype()
                if shape != expected:
                    raise ShapeError(
                        f"llm: tensor {name!r} in {path.name} has shape {list(shape)}, expected "
                        f"{list(expected)} from config.json; the checkpoint and its config "
                        "do not match"
                    )
                if dtype not in _FLOAT_DTYPES:
                    raise UnsupportedError(
                        f"llm: tensor {name!r} in {path.name} is stored as {dtype}; kernforge.llm "
                        "loads float checkpoints (F32/F16/BF16), not quantized ones"
                    )
                found.add(name)
    missing = [n for n in shapes if n not in found]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        where = files[0].name if len(files) == 1 else f"{len(files)} shards in {files[0].parent}"
        raise ConfigError(
            f"llm: {len(missing)} tensor(s) missing from {where}: "
            f"{shown}; the checkpoint is incomplete or not a "
            f"{config.arch} model with this config.json"
        )
    return unknown


def load_weights(
    folder: str | os.PathLike,
    config: ModelConfig,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cuda",
    progress: bool = True,
) -> DecoderWeights:
    """Load the safetensors weights of ``folder`` into the fused layout, cast to ``dtype``, on
    ``device``, shard by shard (a progress line per shard on stderr when ``progress``).

    Every tensor's name, shape and dtype is checked against ``config`` before anything is
    loaded: a mis-shaped tensor raises ShapeError, missing tensors or shard files ConfigError.
    Stored tensors the model does not use are skipped with one warning listing them.
    """
    from safetensors import safe_open

    files = weight_files(folder)
    device = torch.device(device)
    layout = _empty_weights(config, dtype, "meta")  # shapes only, no memory
    unknown = _scan(files, {n: tuple(t.shape) for n, t in _hf_items(layout, config)}, config)
    if unknown:
        shown = ", ".join(unknown[:8]) + (", ..." if len(unknown) > 8 else "")
        warnings.warn(
            f"llm: {len(unknown)} tensor(s) in {str(folder)!r} are not used by the "
            f"{config.arch} decoder and were skipped: {shown}",
            stacklevel=2,
        )
    weights = _empty_weights(config, dtype, device)
    dests = dict(_hf_items(weights, config))
    bar = Progress(len(files), "load") if progress else None
    with bar or contextlib.nullcontext(), torch.no_grad():
        for path in files:
            # Straight to the device: the host never holds more than safetensors' mmap view.
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    dest = dests.get(name)
                    if dest is not None:
                        dest.copy_(f.get_tensor(name))  # casts to dtype
            if bar is not None:
                bar.step(path.name)
    return weights


def random_weights(
    config: ModelConfig,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cuda",
    seed: int = 0,
) -> DecoderWeights:
    """Random weights for ``config`` made on ``device``; the same ``seed`` gives the same
    weights on the same device kind in the same dtype (draws in different dtypes may differ),
    tied when the config says so.

    Scales keep activations O(1) at any size and depth: a projection reading ``n`` features has
    std ``1/sqrt(n)``, and the two that write into the residual stream (o, down) a further
    ``1/sqrt(2 * num_layers)``; embeddings and an untied head have std ``1/sqrt(hidden)`` (logits
    O(1)); norm weights are ``1 + 0.1 * N(0, 1)``, biases ``0.02 * N(0, 1)``. Values are drawn in
    place in ``dtype`` (no float32 copy of the model).
    """
    device = torch.device(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    weights = _empty_weights(config, dtype, device)
    residual = 1.0 / math.sqrt(2 * config.num_layers)
    with torch.no_grad():
        for name, t in _hf_items(weights, config):
            kind = name.rsplit(".", 1)[-1]
            if kind == "bias":
                t.normal_(0.0, 0.02, generator=gen)
            elif t.dim() == 1:  # every 1-D weight is a norm scale
                t.normal_(1.0, 0.1, generator=gen)
            else:
                std = 1.0 / math.sqrt(t.shape[1])
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    std *= residual
                t.normal_(0.0, std, generator=gen)
    return weights


def hf_state_dict(weights: DecoderWeights, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The Hugging Face state dict of ``weights`` (views into them, fused tensors split), for
    ``model.load_state_dict(...)``. ``lm_head.weight`` is always present (the embedding itself
    when tied), as a ``*ForCausalLM`` state dict has it."""
    out = dict(_hf_items(weights, config))
    out["lm_head.weight"] = weights.lm_head
    return out
