"""kernforge's flash attention as a transformers 5.x attention implementation.

:func:`register` adds ``"kernforge"`` to ``transformers.AttentionInterface`` (the attention
function) and to ``transformers.AttentionMaskInterface`` (the mask function: without it,
transformers would build no mask at all for an unknown implementation and padding would be
ignored). A model then runs it with ``model.set_attn_implementation("kernforge")`` or
``from_pretrained(..., attn_implementation="kernforge")`` (``kernforge.patch`` does either).

The mask function returns None exactly when the mask is the plain causal (or sliding-window
causal) pattern aligned bottom-right, which is what :func:`kernforge.ops.fmha` computes from its
``causal``/``window`` arguments. Anything else (a padding mask with zeros, packed sequences,
custom mask functions, a static cache's unfilled tail) gets sdpa's boolean mask, and the
attention call then runs transformers' own ``sdpa_attention_forward``: correct, not fused.
"""

from __future__ import annotations

import warnings

import torch

from .. import ops
from ..dispatch import FallbackWarning

#: The name under which kernforge registers with transformers' interfaces.
NAME = "kernforge"

_warned: set[str] = set()


def _fallback_warning(reason: str) -> None:
    # Not under torch.compile: a Python-side set mutation there would only cost a guard, but
    # warnings.warn is a graph break on some torch versions.
    if reason in _warned or torch.compiler.is_compiling():
        return
    _warned.add(reason)
    warnings.warn(
        f"kernforge attention: {reason}; this call runs transformers' sdpa_attention_forward "
        "instead of kernforge.ops.fmha (warned once).",
        FallbackWarning,
        stacklevel=3,
    )


def _unsupported(query, key, value, attention_mask, dropout, kwargs) -> str | None:
    """Why ops.fmha cannot run this call (None when it can)."""
    if attention_mask is not None:
        return "an explicit attention mask (padding, packed sequences or a custom mask)"
    if dropout > 0.0:
        return "attention dropout > 0"
    if kwargs.get("position_bias") is not None:
        return "a position bias"
    d = query.shape[-1]
    if key.shape[-1] != d or value.shape[-1] != d:
        return f"value head dim {value.shape[-1]} != query head dim {d}"
    if d % 8 or d > 256:
        return f"head dim {d} (ops.fmha takes multiples of 8 up to 256)"
    if key.shape[1] == 0 or query.shape[1] % key.shape[1]:
        return f"{query.shape[1]} query heads and {key.shape[1]} kv heads"
    return None


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-interface signature on :func:`kernforge.ops.fmha`.

    query [B, Hq, Sq, D], key/value [B, Hk, Sk, D] (transposed views of [B, S, H, D]
    projections, or the KV cache): handed to ``ops.fmha`` as ``.transpose(1, 2)`` in the
    ``"bshd"`` layout, so nothing is copied; GQA natively (no ``repeat_kv``). Causal when the
    module is (``module.is_causal``, or an ``is_causal`` keyword), aligned bottom-right as with
    a KV cache; ``sliding_window`` W keeps keys ``j >= i - (W - 1)`` (transformers'
    convention); ``softcap`` caps the scores. Returns ``(out [B, Sq, Hq, D], None)``: no
    attention weights, as with sdpa.

    With an attention mask (padding), dropout in training or a position bias, the call runs
    transformers' ``sdpa_attention_forward`` (warned once).
    """
    reason = _unsupported(query, key, value, attention_mask, dropout, kwargs)
    if reason is not None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        _fallback_warning(reason)
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    is_causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    window = sliding_window - 1 if sliding_window else None
    out = ops.fmha(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        causal=causal,
        scale=scaling,
        window=window,
        softcap=softcap or None,
        layout="bshd",
    )
    return out, None


def attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    allow_is_causal_skip: bool = True,
    allow_is_bidirectional_skip: bool = False,
    **kwargs,
) -> torch.Tensor | None:
    """transformers' mask-interface signature: None where :func:`attention_forward` computes
    the mask itself, else sdpa's boolean mask [B, 1, Sq, Sk].

    None needs: the plain causal or sliding-window pattern (transformers says so by
    ``allow_is_causal_skip``; it turns that off for packed sequences and custom masks); the
    last query at the last key (``kv_offset + kv_length == q_offset + q_length``: true for
    dynamic caches, false for a static cache's unfilled tail); and no padding: no 2-D mask, or
    (outside torch.compile, where the check would sync) a mask of all ones.
    """
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    if mask_function is None:
        mask_function = causal_mask_function
    aligned = (
        isinstance(q_offset, int)
        and isinstance(kv_offset, int)
        and kv_offset + kv_length == q_offset + q_length
    )
    if allow_is_causal_skip and aligned:
        if attention_mask is None:
            return None
        covers = attention_mask.shape[-1] >= kv_offset + kv_length  # else sdpa pads with False
        if covers and not torch.compiler.is_compiling() and bool(attention_mask.all()):
            return None
    return sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        local_size=local_size,
        allow_is_causal_skip=False,  # sdpa's skip assumes top-left alignment: not ours
        allow_is_bidirectional_skip=allow_is_bidirectional_skip,
        **kwargs,
    )


def register() -> None:
    """Register ``"kernforge"`` with transformers' attention and mask interfaces (idempotent;
    imports transformers)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, attention_mask)
