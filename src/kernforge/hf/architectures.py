"""The Hugging Face architectures :func:`kernforge.patch` knows: where their classes live and
which of them it replaces.

Each entry names classes by string inside ``transformers.models.<x>.modeling_<x>``; nothing
here imports transformers (that happens when a model is patched).
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from types import ModuleType

from ..errors import UnsupportedError


@dataclass(frozen=True)
class Architecture:
    """One decoder family of transformers 5.x.

    ``rms_norms``/``mlps``: the RMSNorm and gated-MLP classes whose instances become
    kernforge layers (Qwen2-MoE's shared expert is a plain MLP, so it is listed there);
    ``causal_lm``: the ``...ForCausalLM`` class whose forward gets the fused linear
    cross-entropy; ``pretrained``: the ``...PreTrainedModel`` base (patch-by-name sets the
    default attention and experts implementations there); ``experts``: the stacked-experts
    class of an MoE family (None for dense ones).
    """

    model_type: str
    prefix: str
    rms_norms: tuple[str, ...]
    mlps: tuple[str, ...]
    experts: str | None = None

    @property
    def module_name(self) -> str:
        return f"transformers.models.{self.model_type}.modeling_{self.model_type}"

    @property
    def causal_lm(self) -> str:
        return f"{self.prefix}ForCausalLM"

    @property
    def pretrained(self) -> str:
        return f"{self.prefix}PreTrainedModel"

    @property
    def moe(self) -> bool:
        return self.experts is not None

    def module(self) -> ModuleType:
        """The modeling module (imports transformers)."""
        return importlib.import_module(self.module_name)


def _arch(model_type: str, prefix: str, experts: bool = False, mlp: bool = True) -> Architecture:
    return Architecture(
        model_type=model_type,
        prefix=prefix,
        rms_norms=(f"{prefix}RMSNorm",),
        mlps=(f"{prefix}MLP",) if mlp else (),
        experts=f"{prefix}Experts" if experts else None,
    )


#: model_type -> Architecture, in the order :func:`supported_architectures` lists them.
ARCHITECTURES: dict[str, Architecture] = {
    a.model_type: a
    for a in (
        _arch("llama", "Llama"),
        _arch("mistral", "Mistral"),
        _arch("qwen2", "Qwen2"),
        _arch("qwen3", "Qwen3"),
        _arch("mixtral", "Mixtral", experts=True, mlp=False),  # every MLP is an expert
        _arch("qwen2_moe", "Qwen2Moe", experts=True),
        _arch("qwen3_moe", "Qwen3Moe", experts=True),
    )
}


def supported_architectures() -> list[str]:
    """The model types :func:`kernforge.patch` supports (``config.model_type`` values)."""
    return list(ARCHITECTURES)


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


#: Lookup keys: model_type, class prefix and every public class name, case- and
#: separator-insensitive ("qwen3_moe", "Qwen3-MoE", "Qwen3MoeForCausalLM").
_NAMES: dict[str, Architecture] = {}
for _a in ARCHITECTURES.values():
    for _n in (_a.model_type, _a.prefix, _a.causal_lm, f"{_a.prefix}Model"):
        _NAMES[_key(_n)] = _a


def unsupported(what: str) -> UnsupportedError:
    """The error for an architecture or name kernforge cannot patch."""
    return UnsupportedError(
        f"kernforge.patch: {what} is not supported; supported architectures (model_type): "
        f"{', '.join(supported_architectures())}. Pass one of these names, or a model whose "
        "config.model_type is one of them."
    )


def by_name(name: str) -> Architecture:
    """The architecture for a model_type or class name (case-insensitive), else
    UnsupportedError listing the supported ones."""
    arch = _NAMES.get(_key(name)) if isinstance(name, str) else None
    if arch is None:
        raise unsupported(f"{name!r}")
    return arch


def of_model(model: object) -> Architecture:
    """The architecture of a transformers model instance (by ``config.model_type``)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    arch = ARCHITECTURES.get(model_type) if isinstance(model_type, str) else None
    if arch is None:
        what = f"model_type {model_type!r}" if model_type else "an object with no config"
        raise unsupported(f"{what} ({type(model).__name__})")
    return arch
