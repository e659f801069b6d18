"""The KV cache: contiguous (one [rows, max_seq_len] slab per layer) or paged (a pool of
fixed-size pages and a block table per sequence row), the layouts ``ops.append_kv`` and
``ops.fmha_decode`` read.

Row ``rows`` of a contiguous cache (one past the last sequence row), or page 0 of a paged one,
is scratch: padding tokens of a CUDA-graph bucket write there, so they never touch a sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import ArgumentError


@dataclass
class KVCache:
    """Keys and values of every layer: ``k``/``v`` [layers, rows + 1, max_seq_len, Hk, D]
    (contiguous) or [layers, num_pages, page_size, Hk, D] with ``block_table`` [rows,
    pages_per_row] int32 (paged)."""

    k: torch.Tensor
    v: torch.Tensor
    rows: int
    max_seq_len: int
    block_table: torch.Tensor | None = None
    page_size: int = 0
    free_pages: list[int] = field(default_factory=list)

    @classmethod
    def allocate(cls, layers: int, rows: int, max_seq_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, paged: bool = False,
                 page_size: int = 64, num_pages: int | None = None) -> KVCache:  # fmt: skip
        """A cache for ``rows`` sequences of up to ``max_seq_len`` tokens. Paged: a pool of
        ``num_pages`` pages (default: enough for every row at full length) plus the scratch
        page."""
        if paged:
            per_row = math.ceil(max_seq_len / page_size)
            pages = (num_pages or rows * per_row) + 1
            shape = (layers, pages, page_size, kv_heads, head_dim)
            table = torch.zeros(rows, per_row, dtype=torch.int32, device=device)
            k = torch.empty(shape, dtype=dtype, device=device)
            return cls(k, torch.empty_like(k), rows, max_seq_len, table, page_size,
                       list(range(pages - 1, 0, -1)))  # fmt: skip
        shape = (layers, rows + 1, max_seq_len, kv_heads, head_dim)
        k = torch.empty(shape, dtype=dtype, device=device)
        return cls(k, torch.empty_like(k), rows, max_seq_len)

    @property
    def paged(self) -> bool:
        return self.block_table is not None

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``i``'s (k, v) caches, as ``ops.fmha_decode`` takes them."""
        return self.k[i], self.v[i]

    def table(self, rows: int) -> torch.Tensor | None:
        """The block table of the first ``rows`` sequence rows (None when contiguous)."""
        return None if self.block_table is None else self.block_table[:rows]

    def assign(self, row: int, length: int) -> None:
        """Give sequence row ``row`` pages for ``length`` tokens (paged; contiguous rows hold
        ``max_seq_len`` already). Raises when the pool is exhausted."""
        if length > self.max_seq_len:
            raise ArgumentError(
                f"llm: a sequence of {length} tokens (prompt + max_new_tokens) exceeds "
                f"max_seq_len={self.max_seq_len}; pass a larger max_seq_len to LLM(...)"
            )
        if self.block_table is None:
            return
        need = math.ceil(length / self.page_size)
        if need > len(self.free_pages):
            raise ArgumentError(
                f"llm: the paged KV cache has {len(self.free_pages)} free pages of "
                f"{self.page_size} tokens, {need} are needed; pass a larger num_pages"
            )
        pages = [self.free_pages.pop() for _ in range(need)]
        row_pages = torch.zeros(self.block_table.shape[1], dtype=torch.int32)
        row_pages[:need] = torch.tensor(pages, dtype=torch.int32)
        self.block_table[row].copy_(row_pages)

    def release(self, row: int) -> None:
        """Return row ``row``'s pages to the pool (its table then points at the scratch page)."""
        if self.block_table is None:
            return
        pages = [p for p in self.block_table[row].tolist() if p > 0]
        self.free_pages.extend(reversed(pages))
        self.block_table[row].zero_()

    def slots(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Flat token slots (into ``k[layer].view(-1, Hk, D)``) of ``positions`` in sequence
        ``rows`` (int64 tensors on the cache's device); row -1 means the scratch slot."""
        rows, positions = rows.long(), positions.long()
        if self.block_table is None:
            scratch = self.rows * self.max_seq_len
            return torch.where(rows < 0, scratch, rows * self.max_seq_len + positions)
        page = self.block_table[rows.clamp(min=0), positions // self.page_size].long()
        slot = page * self.page_size + positions % self.page_size
        return torch.where(rows < 0, 0, slot)
