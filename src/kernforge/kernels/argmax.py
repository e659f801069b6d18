"""The greedy step of LLM decoding in one kernel: ``tokens = argmax(logits, -1)`` and
``lens += 1``, written in place (the CUDA graph of a decode step feeds them to the next step).

``torch.argmax`` then a copy and an add are three to four kernels (about 13 us on an H100 for
one row of a 152k vocabulary); here programs take slices of each row, write their maximum and
its first index, and the last program of a row to finish (an atomic counter, reset after use)
reduces the slices in a fixed order: 3.3 us. Ties go to the lowest index, as ``torch.argmax``;
NaN counts as +inf.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import ShapeError
from .common import dependent_start, pdl_args, triton_reason

#: Logits each program reads (a larger block means fewer partial results, a longer program).
BLOCK = 4096


@triton.jit
def _greedy_kernel(X, V, stride, PV, PI, CNT, TOK, LENS,
                   BLOCK: tl.constexpr, P: tl.constexpr, PB: tl.constexpr,
                   PDL: tl.constexpr = False):  # fmt: skip
    pid = tl.program_id(0)
    row = tl.program_id(1)
    dependent_start(PDL)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + row.to(tl.int64) * stride + offs, mask=offs < V, other=float("-inf"))
    x = x.to(tl.float32)
    x = tl.where(x != x, float("inf"), x)
    m = tl.max(x, 0)
    tl.store(PV + row * P + pid, m)
    tl.store(PI + row * P + pid, tl.min(tl.where(x == m, offs, V), 0))
    tl.debug_barrier()  # every thread's stores are issued before the counter's release
    if tl.atomic_add(CNT + row, 1, sem="acq_rel") == P - 1:
        ps = tl.arange(0, PB)
        v = tl.load(PV + row * P + ps, mask=ps < P, other=float("-inf"), cache_modifier=".cg")
        i = tl.load(PI + row * P + ps, mask=ps < P, other=V, cache_modifier=".cg")
        best = tl.min(tl.where(v == tl.max(v, 0), i, V), 0)  # lowest index among the maxima
        tl.store(TOK + row, best.to(TOK.dtype.element_ty))
        tl.store(LENS + row, tl.load(LENS + row) + 1)
        tl.store(CNT + row, 0)  # ready for the next launch


class GreedyStep:
    """The buffers of one decode batch's greedy step (partial results, arrival counters).

    ``step(logits, tokens, lens)``: ``tokens[r] = argmax(logits[r])`` and ``lens[r] += 1`` for
    every row, in one launch. ``logits`` [rows, vocab] with unit stride along the vocabulary;
    ``tokens`` and ``lens`` contiguous [rows] integer tensors on its device. Where Triton cannot
    run on the logits' device, ``torch.argmax`` then a copy and an add do the same.
    """

    def __init__(self, rows: int, vocab: int, device: torch.device):
        self.rows, self.vocab = rows, vocab
        self.programs = triton.cdiv(vocab, BLOCK)
        self.values = torch.empty(rows, self.programs, dtype=torch.float32, device=device)
        self.index = torch.empty(rows, self.programs, dtype=torch.int32, device=device)
        self.counters = torch.zeros(rows, dtype=torch.int32, device=device)

    def __call__(self, logits: torch.Tensor, tokens: torch.Tensor, lens: torch.Tensor) -> None:
        if logits.shape != (self.rows, self.vocab) or logits.stride(-1) != 1:
            raise ShapeError(
                f"GreedyStep: logits must be [{self.rows}, {self.vocab}] with unit stride along "
                f"the vocabulary, got {tuple(logits.shape)} strides {logits.stride()}"
            )
        for name, t in (("tokens", tokens), ("lens", lens)):
            if t.shape != (self.rows,) or not t.is_contiguous() or t.device != logits.device:
                raise ShapeError(
                    f"GreedyStep: {name} must be contiguous [{self.rows}] on {logits.device}, "
                    f"got {tuple(t.shape)} on {t.device}"
                )
        if triton_reason(logits) is not None:  # e.g. a CPU model on a GPU host: torch
            tokens.copy_(torch.argmax(logits, dim=-1))
            lens.add_(1)
            return
        _greedy_kernel[(self.programs, self.rows)](
            logits, self.vocab, logits.stride(0), self.values, self.index, self.counters,
            tokens, lens, BLOCK=BLOCK, P=self.programs,
            PB=max(2, triton.next_power_of_2(self.programs)), num_warps=4, **pdl_args(),
        )  # fmt: skip
