"""Loss layers on kernforge's cross-entropy ops (docs/losses.md)."""

from __future__ import annotations

import torch
from torch import nn

from .. import ops


class CrossEntropyLoss(nn.Module):
    """``torch.nn.CrossEntropyLoss`` for logits with the classes last, on :func:`ops.cross_entropy`.

    ``forward(logits [..., V], target [...])``; adds PaLM's z-loss (``z_loss * lse**2`` per
    row) when ``z_loss > 0``. Unlike torch, the classes are the *last* dimension (LLM logits
    [batch, seq, vocab] need no transpose), "mean" over no targets is 0.0 rather than NaN, and
    class weights are not supported.
    """

    def __init__(self, ignore_index: int = -100, label_smoothing: float = 0.0,
                 z_loss: float = 0.0, reduction: str = "mean") -> None:  # fmt: skip
        super().__init__()
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of ``logits`` against class ids ``target`` (fp32)."""
        return ops.cross_entropy(logits, target, self.ignore_index, self.label_smoothing,
                                 self.z_loss, self.reduction)  # fmt: skip

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, "
                f"z_loss={self.z_loss}, reduction={self.reduction!r}")  # fmt: skip


class FusedLinearCrossEntropy(nn.Module):
    """The language-model head and its loss in one: ``cross_entropy(hidden @ weight.T + bias,
    target)`` without materialising the [tokens, vocab] logits
    (:func:`ops.fused_linear_cross_entropy`).

    Holds no parameters: ``forward(hidden [..., H], weight [V, H], target [...], bias=None)``
    takes the lm_head's weight (and bias) as arguments, so a model keeps its own (tied)
    ``lm_head``. ``chunk_size`` sets the tokens per chunk (None: logits chunks of <= 256 MB).
    """

    def __init__(self, ignore_index: int = -100, label_smoothing: float = 0.0,
                 z_loss: float = 0.0, reduction: str = "mean",
                 chunk_size: int | None = None) -> None:  # fmt: skip
        super().__init__()
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.reduction = reduction
        self.chunk_size = chunk_size

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """The loss (fp32) of the logits ``hidden @ weight.T + bias`` against ``target``."""
        return ops.fused_linear_cross_entropy(
            hidden,
            weight,
            target,
            bias,
            self.ignore_index,
            self.label_smoothing,
            self.z_loss,
            self.reduction,
            self.chunk_size,
        )

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, "
                f"z_loss={self.z_loss}, reduction={self.reduction!r}, "
                f"chunk_size={self.chunk_size}")  # fmt: skip
