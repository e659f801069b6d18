"""``kernforge.patch`` / ``kernforge.unpatch``: run Hugging Face transformers models on kernforge.

Two forms (docs/hf.md):

- ``patch(model)``: converts a loaded model in place. RMSNorm and MLP instances get a
  kernforge class (``__class__`` swapped to a subclass mixing the kernforge layer into the
  transformers class: ``isinstance`` still holds, parameters, state-dict keys and optimizer
  references are untouched); attention goes through ``set_attn_implementation("kernforge")``;
  MoE experts through ``set_experts_implementation("kernforge")``; the modeling module's
  ``apply_rotary_pos_emb`` becomes kernforge's (a module global, shared by every model of that
  architecture: reference-counted, restored when the last patched model is unpatched); the
  loss function and the causal-LM forward are set on the instance.
- ``patch("llama")``: before models are built. The modeling module's RMSNorm/MLP classes and
  ``apply_rotary_pos_emb`` are replaced, the ``...ForCausalLM`` class gets the kernforge
  forward and loss, and ``"kernforge"`` becomes the default attention and experts
  implementation of the architecture (an explicit ``attn_implementation=`` still wins).

``unpatch`` undoes either exactly.
"""

from __future__ import annotations

import sys
import threading
import types
import weakref
from dataclasses import dataclass, field
from typing import Any

from .architectures import ARCHITECTURES, Architecture, by_name, of_model, unsupported

#: Attribute holding a patched model's :class:`_ModelPatch` (in the instance ``__dict__``).
_RECORD = "_kernforge_patch"
#: Class attribute of the mixed classes: the transformers class they extend.
_ORIGINAL = "_kernforge_original"

_lock = threading.RLock()
_mixed: dict[tuple[type, type], type] = {}


# --- mixed classes ------------------------------------------------------------------------------


def mixed_class(hf_cls: type, kf_cls: type) -> type:
    """The cached subclass of ``hf_cls`` that runs ``kf_cls``'s forward.

    Bases ``(kf_cls, hf_cls)``: kernforge's forward first, ``isinstance(m, hf_cls)`` holds.
    ``__init__`` and ``extra_repr`` are the transformers class's (so patch-by-name builds it
    from a config as before, and ``super().__init__()`` inside it skips kernforge's
    constructor). Named ``"Kernforge" + hf_cls.__name__`` and reachable as
    ``kernforge.hf.patching.<name>``, so pickled models load again.
    """
    key = (hf_cls, kf_cls)
    with _lock:
        cls = _mixed.get(key)
        if cls is None:
            name = f"Kernforge{hf_cls.__name__}"
            namespace = {
                "__init__": hf_cls.__init__,
                "extra_repr": hf_cls.extra_repr,
                "forward": kf_cls.forward,
                "__module__": __name__,
                "__qualname__": name,
                "__doc__": f"{hf_cls.__name__} running kernforge's {kf_cls.__name__}.forward.",
                _ORIGINAL: hf_cls,
            }
            cls = type(name, (kf_cls, hf_cls), namespace)
            _mixed[key] = cls
            setattr(sys.modules[__name__], name, cls)
        return cls


def original_class(cls: type) -> type:
    """The transformers class of a mixed class (``cls`` itself otherwise)."""
    return cls.__dict__.get(_ORIGINAL, cls)


def _kernforge_layers() -> dict[str, type]:
    from ..nn import RMSNorm
    from .layers import GatedMLP

    return {"rms_norms": RMSNorm, "mlps": GatedMLP}


def __getattr__(name: str) -> type:
    """Rebuild a mixed class by name (unpickling in a fresh process)."""
    if name.startswith("Kernforge"):
        hf_name = name[len("Kernforge") :]
        for arch in ARCHITECTURES.values():
            for kind, kf_cls in _kernforge_layers().items():
                if hf_name in getattr(arch, kind):
                    hf_cls = original_class(getattr(arch.module(), hf_name))
                    return mixed_class(hf_cls, kf_cls)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- module-global rope, reference-counted ------------------------------------------------------


@dataclass
class _RopeHold:
    original: Any
    models: weakref.WeakSet = field(default_factory=weakref.WeakSet)
    by_name: bool = False


_rope: dict[str, _RopeHold] = {}


def _take_rope(arch: Architecture, owner: Any | None) -> None:
    """Point the modeling module's ``apply_rotary_pos_emb`` at kernforge's; ``owner`` is a
    model (held weakly) or None for patch-by-name."""
    from ..nn import apply_rotary_pos_emb

    module = arch.module()
    with _lock:
        hold = _rope.get(arch.model_type)
        if hold is None:
            hold = _RopeHold(original=module.apply_rotary_pos_emb)
            _rope[arch.model_type] = hold
            module.apply_rotary_pos_emb = apply_rotary_pos_emb
        if owner is None:
            hold.by_name = True
        else:
            hold.models.add(owner)


def _drop_rope(arch: Architecture, owner: Any | None) -> None:
    """Release one hold; the last one restores transformers' function."""
    with _lock:
        hold = _rope.get(arch.model_type)
        if hold is None:
            return
        if owner is None:
            hold.by_name = False
        else:
            hold.models.discard(owner)
        if not hold.by_name and len(hold.models) == 0:
            arch.module().apply_rotary_pos_emb = hold.original
            del _rope[arch.model_type]


# --- patch options ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """Which parts :func:`patch` replaces (see docs/hf.md)."""

    rms_norm: bool = True
    rope: bool = True
    swiglu: bool = True
    attention: bool = True
    cross_entropy: bool = True
    fused_linear_cross_entropy: bool = True
    moe: bool = True


_MISSING = object()


@dataclass
class _ModelPatch:
    """What patch(model) changed, to undo it."""

    arch: str
    options: Options
    attn_implementation: str | None = None
    experts_implementation: str | None = None
    loss_function: Any = _MISSING  # the instance's own _loss_function before, if any
    forward: Any = _MISSING  # the instance's own forward before, if any
    rope: bool = False


_forwards: dict[str, Any] = {}


def _causal_lm_forward(arch: Architecture):
    from .loss import make_causal_lm_forward

    with _lock:
        fn = _forwards.get(arch.model_type)
        if fn is None:
            fn = make_causal_lm_forward(arch.module(), arch.moe)
            _forwards[arch.model_type] = fn
        return fn


def _register(options: Options) -> None:
    if options.attention:
        from .attention import register

        register()
    if options.moe:
        from .experts import register as register_experts

        register_experts()


def _swap_classes(model, arch: Architecture, options: Options) -> None:
    module = arch.module()
    swaps: dict[type, type] = {}
    for kind, kf_cls in _kernforge_layers().items():
        if getattr(options, "rms_norm" if kind == "rms_norms" else "swiglu"):
            for n in getattr(arch, kind):
                hf_cls = original_class(getattr(module, n))
                swaps[hf_cls] = mixed_class(hf_cls, kf_cls)
    for m in model.modules():
        mixed = swaps.get(type(m))  # a module already kernforge's is not in swaps
        if mixed is not None:
            m.__class__ = mixed


def _restore_classes(model) -> None:
    for m in model.modules():
        original = type(m).__dict__.get(_ORIGINAL)
        if original is not None:
            m.__class__ = original


def _patch_model(model, options: Options):
    arch = of_model(model)
    if _RECORD in model.__dict__:
        return model  # patching twice is a no-op (unpatch first to change the options)
    _register(options)
    record = _ModelPatch(arch=arch.model_type, options=options)
    _swap_classes(model, arch, options)
    if options.attention:
        record.attn_implementation = model.config._attn_implementation
        model.set_attn_implementation("kernforge")
    if options.moe and arch.moe:
        from .experts import supports

        experts = [m for m in model.modules() if type(m).__name__ == arch.experts]
        if experts and all(supports(e) for e in experts):
            record.experts_implementation = model.config._experts_implementation
            model.set_experts_implementation("kernforge")
    if options.rope:
        _take_rope(arch, model)
        record.rope = True
    causal_lm = type(model).__name__ == arch.causal_lm
    if options.cross_entropy and causal_lm:
        from .loss import causal_lm_loss

        record.loss_function = model.__dict__.get("_loss_function", _MISSING)
        model.loss_function = causal_lm_loss
    if options.fused_linear_cross_entropy and causal_lm:
        record.forward = model.__dict__.get("forward", _MISSING)
        model.forward = types.MethodType(_causal_lm_forward(arch), model)
    model.__dict__[_RECORD] = record
    return model


def _unpatch_model(model) -> Any:
    arch = of_model(model)
    record: _ModelPatch | None = model.__dict__.pop(_RECORD, None)
    _restore_classes(model)
    if record is None:
        # Built while its architecture was patched by name: put transformers' defaults back.
        if model.config._attn_implementation == "kernforge":
            model.set_attn_implementation("sdpa")
        if getattr(model.config, "_experts_implementation", None) == "kernforge":
            model.set_experts_implementation("grouped_mm")
        return model
    if record.attn_implementation is not None:
        model.set_attn_implementation(record.attn_implementation)
    if record.experts_implementation is not None:
        model.set_experts_implementation(record.experts_implementation)
    if record.rope:
        _drop_rope(arch, model)
    for attr, before in (("_loss_function", record.loss_function), ("forward", record.forward)):
        if attr == "_loss_function" and not record.options.cross_entropy:
            continue
        if attr == "forward" and not record.options.fused_linear_cross_entropy:
            continue
        if before is _MISSING:
            model.__dict__.pop(attr, None)
        else:
            model.__dict__[attr] = before
    return model


# --- patch by name ------------------------------------------------------------------------------


@dataclass
class _NamePatch:
    """What patch(name) replaced: (owner, attribute) -> the value before (_MISSING: absent)."""

    arch: str
    options: Options
    saved: dict[tuple[Any, str], Any] = field(default_factory=dict)


_by_name: dict[str, _NamePatch] = {}


def _default_attn(original):
    def _check_and_adjust_attn_implementation(self, attn_implementation=None, *args, **kwargs):
        # transformers' default (None) becomes kernforge's; an explicit choice is kept.
        if attn_implementation is None:
            attn_implementation = "kernforge"
        return original(self, attn_implementation, *args, **kwargs)

    return _check_and_adjust_attn_implementation


def _default_experts(original):
    def _check_and_adjust_experts_implementation(self, experts_implementation=None):
        if experts_implementation is None:
            experts_implementation = "kernforge"
        return original(self, experts_implementation)

    return _check_and_adjust_experts_implementation


def _set(record: _NamePatch, owner: Any, attr: str, value: Any) -> None:
    """Set ``owner.attr`` (a module or class), remembering what was there."""
    before = owner.__dict__.get(attr, _MISSING) if isinstance(owner, type) else getattr(owner, attr)
    record.saved[(owner, attr)] = before
    setattr(owner, attr, value)


def _patch_name(arch: Architecture, options: Options) -> None:
    if arch.model_type in _by_name:
        return
    _register(options)
    module = arch.module()
    record = _NamePatch(arch=arch.model_type, options=options)
    for kind, kf_cls in _kernforge_layers().items():
        if getattr(options, "rms_norm" if kind == "rms_norms" else "swiglu"):
            for n in getattr(arch, kind):
                _set(record, module, n, mixed_class(getattr(module, n), kf_cls))
    pretrained = getattr(module, arch.pretrained)
    if options.attention:
        _set(record, pretrained, "_check_and_adjust_attn_implementation",
             _default_attn(pretrained._check_and_adjust_attn_implementation))  # fmt: skip
    if options.moe and arch.moe:
        _set(record, pretrained, "_check_and_adjust_experts_implementation",
             _default_experts(pretrained._check_and_adjust_experts_implementation))  # fmt: skip
    causal_lm = getattr(module, arch.causal_lm)
    if options.cross_entropy:
        from .loss import causal_lm_loss

        _set(record, causal_lm, "_loss_function", staticmethod(causal_lm_loss))
    if options.fused_linear_cross_entropy:
        _set(record, causal_lm, "forward", _causal_lm_forward(arch))
    if options.rope:
        _take_rope(arch, None)
    _by_name[arch.model_type] = record


def _unpatch_name(arch: Architecture) -> None:
    record = _by_name.pop(arch.model_type, None)
    if record is None:
        return
    for (owner, attr), before in reversed(list(record.saved.items())):
        if before is _MISSING:
            delattr(owner, attr)
        else:
            setattr(owner, attr, before)
    if record.options.rope:
        _drop_rope(arch, None)


# --- public API ---------------------------------------------------------------------------------


def _is_model(obj: Any) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is what is being patched
        return False
    return isinstance(obj, PreTrainedModel)


def patch(
    model_or_name,
    rms_norm: bool = True,
    rope: bool = True,
    swiglu: bool = True,
    attention: bool = True,
    cross_entropy: bool = True,
    fused_linear_cross_entropy: bool = True,
    moe: bool = True,
):
    """Run a Hugging Face transformers model on kernforge's kernels; returns its argument.

    ``model_or_name``: a model instance (``PreTrainedModel`` of a supported architecture),
    patched in place; or a name (a ``model_type`` such as ``"llama"`` or a class name such as
    ``"Qwen3ForCausalLM"``, case-insensitive) to patch the architecture before models are
    built. Flags: ``rms_norm`` (RMSNorm layers, Qwen3's q/k norms included), ``rope``
    (``apply_rotary_pos_emb``), ``swiglu`` (the gated MLPs, silu or gelu), ``attention``
    (``attn_implementation="kernforge"``: ``ops.fmha``), ``cross_entropy`` (the loss
    function), ``fused_linear_cross_entropy`` (the causal-LM forward: when training with labels
    the loss comes straight from the hidden states and ``logits`` is None), ``moe`` (the MoE
    experts: grouped GEMMs). Patching again is a no-op; :func:`unpatch` undoes it.
    Unsupported architectures raise :class:`kernforge.UnsupportedError` listing the supported
    ones (:func:`supported_architectures`).
    """
    options = Options(rms_norm, rope, swiglu, attention, cross_entropy,
                      fused_linear_cross_entropy, moe)  # fmt: skip
    with _lock:
        if isinstance(model_or_name, str):
            _patch_name(by_name(model_or_name), options)
            return model_or_name
        if not _is_model(model_or_name):
            raise unsupported(f"an object of type {type(model_or_name).__name__}")
        return _patch_model(model_or_name, options)


def unpatch(model_or_name):
    """Undo :func:`patch` on a model instance or an architecture name; returns its argument.

    A model: its classes, attention and experts implementation, loss function and forward are
    restored, and its hold on the module-global rope released. A name: the modeling module
    and classes are restored (models built while it was patched keep their kernforge layers
    until they are unpatched themselves). Unpatching what is not patched does nothing.
    """
    with _lock:
        if isinstance(model_or_name, str):
            _unpatch_name(by_name(model_or_name))
            return model_or_name
        if not _is_model(model_or_name):
            raise unsupported(f"an object of type {type(model_or_name).__name__}")
        return _unpatch_model(model_or_name)


def is_patched(model_or_name) -> bool:
    """Whether :func:`patch` is in effect on this model instance or architecture name."""
    if isinstance(model_or_name, str):
        return by_name(model_or_name).model_type in _by_name
    return _RECORD in getattr(model_or_name, "__dict__", {})


__all__ = ["Options", "is_patched", "mixed_class", "original_class", "patch", "unpatch"]
