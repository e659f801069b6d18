"""Causal-LM losses for transformers models on kernforge's cross-entropy kernels.

- :func:`causal_lm_loss`: a drop-in for transformers' ``ForCausalLMLoss`` (the model's
  ``loss_function``) on :func:`kernforge.ops.cross_entropy`. Same value, same
  ``num_items_in_batch`` handling, but the logits are read in their own dtype: no fp32 copy of
  the [tokens, vocab] logits is made (transformers upcasts them first).
- :func:`make_causal_lm_forward`: a ``...ForCausalLM.forward`` that, when labels are given and
  autograd is recording, computes the loss with :func:`kernforge.ops.fused_linear_cross_entropy`
  straight from the final hidden states and ``lm_head.weight`` and returns ``logits=None``
  (the [tokens, vocab] logits are never materialised, as Liger-Kernel does); otherwise it
  computes the logits as transformers does and the loss with the model's ``loss_function``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import contextmanager
from types import ModuleType

import torch
import torch.nn.functional as F

from .. import ops
from ..kernels.fused_linear_ce import default_chunk

#: Bytes of logits per chunk of the fused loss in a training forward: twice the op's default
#: (:data:`kernforge.kernels.fused_linear_ce.CHUNK_BYTES`, which keeps the loss alone under
#: 0.1x the memory of the unfused one). In a whole step the chunk is small beside the
#: activations, and half as many chunks re-read and re-write dW half as often: on an H100
#: (benchmarks/training.py, Llama-1B shape, 8192 tokens x 128256 vocabulary) 2048-token chunks
#: instead of 1024 took the fused loss from 21.6 to 19.9 ms for 0.22 GB more peak memory.
CHUNK_BYTES = 512 << 20


def _shifted_labels(labels: torch.Tensor | None, shift_labels: torch.Tensor | None,
                    ignore_index: int) -> torch.Tensor:  # fmt: skip
    """Next-token targets as transformers makes them: labels shifted left by one, the last
    position of each row ignored (padding with ignore_index keeps the [B, S] shape, so the
    logits or hidden states need no slicing)."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return shift_labels.reshape(-1)


def _normalise(loss: torch.Tensor, num_items_in_batch) -> torch.Tensor:
    """transformers' ``fixed_cross_entropy`` division of a summed loss."""
    if num_items_in_batch is None:
        return loss
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    vocab_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` on :func:`kernforge.ops.cross_entropy`.

    logits [B, S, V] (any float dtype, read as they are), labels [B, S] (shifted here) or
    ``shift_labels`` [B, S] (already shifted). Mean over the non-ignored targets, or, with
    ``num_items_in_batch`` (gradient accumulation), the sum divided by it. Returns an fp32
    scalar. One difference: a batch with every target ignored gives 0.0 where
    transformers' mean gives NaN.
    """
    targets = _shifted_labels(labels, shift_labels, ignore_index).to(logits.device)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = ops.cross_entropy(
        logits.reshape(-1, vocab_size), targets, ignore_index=ignore_index, reduction=reduction
    )
    return _normalise(loss, num_items_in_batch)


def fused_causal_lm_loss(
    hidden_states: torch.Tensor,
    lm_head: torch.nn.Module,
    labels: torch.Tensor | None,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """The value of ``causal_lm_loss(lm_head(hidden_states), labels, ...)`` without the
    logits: :func:`kernforge.ops.fused_linear_cross_entropy` over hidden_states [B, S, H] and
    ``lm_head.weight`` [V, H] (+ ``lm_head.bias``), with gradients for both."""
    h = hidden_states.reshape(-1, hidden_states.shape[-1])
    targets = _shifted_labels(labels, shift_labels, ignore_index).to(h.device)
    v = lm_head.weight.shape[0]
    chunk = default_chunk(h.shape[0], v, h.element_size(), CHUNK_BYTES)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = ops.fused_linear_cross_entropy(
        h,
        lm_head.weight,
        targets,
        bias=lm_head.bias,
        ignore_index=ignore_index,
        reduction=reduction,
        chunk_size=chunk,
    )
    return _normalise(loss, num_items_in_batch)


def use_fused_loss(labels, shift_labels, skip_logits: bool | None) -> bool:
    """Whether the forward takes the fused path: asked for by ``skip_logits``, else whenever
    there are labels and autograd is recording (a training step)."""
    if labels is None and shift_labels is None:
        return False
    if skip_logits is not None:
        return bool(skip_logits)
    return torch.is_grad_enabled()


_positions = threading.local()
_packed_lock = threading.Lock()


def _skip_packed_check(original: Callable) -> Callable:
    """transformers' ``find_packed_sequence_indices`` that answers None (no packed sequences)
    without looking, inside :func:`_arange_positions` on this thread."""

    def find_packed_sequence_indices(position_ids):
        if getattr(_positions, "arange", 0):
            return None
        return original(position_ids)

    find_packed_sequence_indices._kernforge_original = original
    return find_packed_sequence_indices


def install_packed_check_skip() -> None:
    """Wrap ``transformers.masking_utils.find_packed_sequence_indices`` (idempotent).

    With no cache and no attention mask, transformers looks for packed sequences in the
    position ids, and outside tracing asks the device whether it found any: a host sync at the
    start of every forward, which stops the CPU from queueing the step while the GPU still runs
    the previous one (benchmarks/training.py on an H100: 146-151 ms a step with it, 143 ms
    without). The fused-loss forward builds no cache, so it would meet that check on every
    step; when it also had no ``position_ids``, the model makes them as ``arange``, which is
    never packed, and the wrapper answers so without the sync. Everywhere else the wrapper
    calls transformers' function unchanged.
    """
    from transformers import masking_utils

    with _packed_lock:
        fn = masking_utils.find_packed_sequence_indices
        if not hasattr(fn, "_kernforge_original"):
            masking_utils.find_packed_sequence_indices = _skip_packed_check(fn)


@contextmanager
def _arange_positions(on: bool):
    """Inside (when ``on``), this thread's model forward makes its own arange position ids."""
    if not on:
        yield
        return
    _positions.arange = getattr(_positions, "arange", 0) + 1
    try:
        yield
    finally:
        _positions.arange -= 1


def _own_positions(position_ids, attention_mask, past_key_values, use_cache) -> bool:
    """Whether the base model will make arange position ids and check them for packing: none
    given, no mask, no cache, eager (under torch.compile transformers skips the check)."""
    return (
        position_ids is None
        and attention_mask is None
        and past_key_values is None
        and use_cache is False
        and not torch.compiler.is_compiling()
    )


def make_causal_lm_forward(module: ModuleType, moe: bool) -> Callable:
    """A ``forward`` for the ``...ForCausalLM`` classes of transformers' modeling ``module``
    (Llama-like: ``self.model``, ``self.lm_head``; MoE variants with ``output_router_logits``
    and the load-balancing loss), with the fused loss (see the module docs).

    Same signature and outputs as transformers' forward plus one keyword, ``skip_logits``
    (None: fused when labels are given and grad is enabled; True/False forces it). On the
    fused path the output's ``logits`` is None.
    """
    from transformers.modeling_outputs import CausalLMOutputWithPast, MoeCausalLMOutputWithPast
    from transformers.utils import can_return_tuple

    install_packed_check_skip()

    def _cache(use_cache, past_key_values, labels, skip_logits, kwargs):
        # The fused-loss (training) path returns no logits to continue from, so unless asked,
        # it builds no KV cache: transformers would copy every layer's K and V into one.
        fused = use_fused_loss(labels, kwargs.get("shift_labels"), skip_logits)
        return False if use_cache is None and past_key_values is None and fused else use_cache

    def _base(self, input_ids, attention_mask, position_ids, past_key_values, inputs_embeds,
              use_cache, labels, skip_logits, kwargs, **extra):  # fmt: skip
        # The base model's outputs; on the fused path without a cache, position ids or mask
        # the base model makes arange positions, and their packing check is skipped.
        use_cache = _cache(use_cache, past_key_values, labels, skip_logits, kwargs)
        own = _own_positions(position_ids, attention_mask, past_key_values, use_cache)
        with _arange_positions(own):
            return self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                inputs_embeds=inputs_embeds,
                use_cache=use_cache,
                **extra,
                **kwargs,
            )

    def _loss_and_logits(self, hidden_states, labels, logits_to_keep, skip_logits, kwargs):
        shift_labels = kwargs.get("shift_labels")
        if use_fused_loss(labels, shift_labels, skip_logits):
            if isinstance(logits_to_keep, int):
                hidden_states = (
                    hidden_states[:, -logits_to_keep:, :] if logits_to_keep else (hidden_states)
                )
            else:
                hidden_states = hidden_states[:, logits_to_keep, :]
            return fused_causal_lm_loss(hidden_states, self.lm_head, labels, **kwargs), None
        # transformers' own path: logits only where asked, in the model's dtype.
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None or shift_labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs
            )
        return loss, logits

    if not moe:

        @can_return_tuple
        def forward(
            self,
            input_ids: torch.LongTensor | None = None,
            attention_mask: torch.Tensor | None = None,
            position_ids: torch.LongTensor | None = None,
            past_key_values=None,
            inputs_embeds: torch.FloatTensor | None = None,
            labels: torch.LongTensor | None = None,
            use_cache: bool | None = None,
            logits_to_keep: int | torch.Tensor = 0,
            skip_logits: bool | None = None,
            **kwargs,
        ) -> CausalLMOutputWithPast:
            """kernforge's causal-LM forward (kernforge.hf.loss): fused linear cross-entropy
            when training with labels (logits=None), else transformers' computation."""
            outputs = _base(self, input_ids, attention_mask, position_ids, past_key_values,
                            inputs_embeds, use_cache, labels, skip_logits, kwargs)  # fmt: skip
            loss, logits = _loss_and_logits(
                self, outputs.last_hidden_state, labels, logits_to_keep, skip_logits, kwargs
            )
            return CausalLMOutputWithPast(
                loss=loss,
                logits=logits,
                past_key_values=outputs.past_key_values,
                hidden_states=outputs.hidden_states,
                attentions=outputs.attentions,
            )

        return forward

    load_balancing_loss_func = module.load_balancing_loss_func

    @can_return_tuple
    def moe_forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        skip_logits: bool | None = None,
        **kwargs,
    ) -> MoeCausalLMOutputWithPast:
        """kernforge's causal-LM forward for MoE models (kernforge.hf.loss): fused linear
        cross-entropy when training with labels (logits=None), plus the router's
        load-balancing loss as transformers adds it."""
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        outputs = _base(self, input_ids, attention_mask, position_ids, past_key_values,
                        inputs_embeds, use_cache, labels, skip_logits, kwargs,
                        output_router_logits=output_router_logits)  # fmt: skip
        loss, logits = _loss_and_logits(
            self, outputs.last_hidden_state, labels, logits_to_keep, skip_logits, kwargs
        )
        aux_loss = None
        if output_router_logits:
            aux_loss = load_balancing_loss_func(
                outputs.router_logits, self.num_experts, self.num_experts_per_tok, attention_mask
            )
            if loss is not None:
                loss = loss + self.router_aux_loss_coef * aux_loss.to(loss.device)
        return MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
        )

    return moe_forward
