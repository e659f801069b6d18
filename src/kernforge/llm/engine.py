"""``LLM``: load a model, prefill a batch of prompts, decode with CUDA graphs, sample, stream.

The flow of one :meth:`LLM.generate` call:

1. The prompts are packed (no padding) and run through one varlen prefill; on the GPU the
   prefill is a CUDA graph per (token bucket, sequence bucket), padding tokens writing to the
   cache's scratch slot.
2. Each decode step is a CUDA graph per batch-size bucket (1, 2, 4, ... rows), captured once
   and replayed; the sampler runs after it and writes the next tokens into the graph's input,
   on the device. The host reads step t's tokens while the GPU runs step t + 1, so stop tokens
   and streaming cost no idle GPU time (a row that stopped runs to the end of the batch and its
   extra tokens are dropped).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .. import checks
from ..errors import ArgumentError, DeviceError
from ..kernels.argmax import GreedyStep
from ..kernels.common import dependent_launches
from .cache import KVCache
from .config import ModelConfig, preset
from .loader import load_config, load_weights, random_weights
from .model import Decoder
from .sampling import Sampler, SamplingParams, random_seed
from .tokenizer import ByteTokenizer, StreamDecoder, load_tokenizer

#: Fewest tokens of a prefill graph (buckets are powers of two, as are the decode batch sizes).
MIN_PREFILL_BUCKET = 16
#: The model of ``LLM()`` and of ``kernforge generate`` without ``--model``.
DEFAULT_MODEL = "random:tiny"


def bucket(n: int, least: int = 1) -> int:
    """The power of two at or above ``max(n, least)``."""
    return 1 << (max(n, least) - 1).bit_length()


@dataclass
class GenerationStats:
    """Timings of one generate call (seconds; tokens/s over every row)."""

    prompt_tokens: int
    new_tokens: int
    time_to_first_token_s: float
    decode_s: float
    decode_steps: int
    seed: int | None
    rows: int = 0

    @property
    def decode_tokens_per_s(self) -> float:
        """Decoded tokens (every row, after its first token) per second of decode."""
        tokens = self.new_tokens - self.rows
        return tokens / self.decode_s if self.decode_s > 0 else 0.0


@dataclass
class GenerationOutput:
    """New token ids per prompt (a stop token that ended a row is included), their text when a
    tokenizer is known, why each row ended ("stop" or "length") and the timings."""

    token_ids: list[list[int]]
    texts: list[str] | None
    finish_reasons: list[str]
    stats: GenerationStats
    logits: list[torch.Tensor] | None = field(default=None, repr=False)


class LLM:
    """A decoder-only language model on kernforge kernels.

    ``model``: a local Hugging Face folder (config.json + safetensors, tokenizer files when
    present; Llama, Mistral, Qwen2, Qwen3), ``"random:<preset>"`` (random weights of a built-in
    shape: ``tiny``, ``qwen2.5-1.5b``, ``llama3-8b``) or None (``random:tiny``). ``dtype``:
    bfloat16 on CUDA, float32 on the CPU by default. ``max_seq_len``: the longest prompt +
    generation (default: the model's limit, at most 4096). ``paged``: a paged KV cache
    (``page_size`` tokens a page, ``num_pages`` in the pool) instead of a contiguous one.
    ``cuda_graphs``: capture prefill and decode as CUDA graphs (default: on the GPU).
    ``warmup``: at load, compile the kernels of every batch and prompt bucket in worker
    processes and capture the first graphs (:func:`kernforge.llm.warmup`); ``True`` or the
    number of worker processes.
    """

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        max_seq_len: int | None = None,
        paged: bool = False,
        page_size: int = 64,
        num_pages: int | None = None,
        cuda_graphs: bool | None = None,
        seed: int = 0,
        progress: bool = True,
        warmup: bool | int = False,
    ):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise DeviceError("llm: device='cuda' was asked for, but CUDA is not available")
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        spec = DEFAULT_MODEL if model is None else str(model)
        self.name = spec
        if spec.startswith("random:"):
            self.config: ModelConfig = preset(spec.split(":", 1)[1])
            weights = random_weights(self.config, self.dtype, self.device, seed=seed)
            self.tokenizer = ByteTokenizer(
                self.config.vocab_size, self.config.eos_token_ids, self.config.bos_token_id
            )
        else:
            self.config = load_config(spec)
            weights = load_weights(spec, self.config, self.dtype, self.device, progress=progress)
            self.tokenizer = load_tokenizer(spec)
        limit = self.config.max_position_embeddings
        self.max_seq_len = int(max_seq_len or min(limit, 4096))
        if self.max_seq_len <= 0:
            raise ArgumentError(f"llm: max_seq_len={max_seq_len} must be positive")
        self.decoder = Decoder(self.config, weights, self.max_seq_len)
        self.paged, self.page_size, self.num_pages = paged, page_size, num_pages
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and self.device.type != "cuda":
            raise DeviceError("llm: cuda_graphs=True needs a CUDA device")
        self.cache: KVCache | None = None
        self._static: dict[tuple, list[torch.Tensor]] = {}  # prefill graphs' input buffers
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, object]] = {}
        self._greedy: dict[int, GreedyStep] = {}  # the in-graph greedy step's buffers, by rows
        self._pool = None
        self.warmup_report = None
        if warmup is not False:
            from ..tune.warmup import warmup_llm

            workers = None if warmup is True else int(warmup)
            self.warmup_report = warmup_llm(self, workers=workers, progress=progress)

    # --- cache and static buffers ---------------------------------------------------------------

    def _ensure_cache(self, rows: int) -> KVCache:
        """A cache with at least ``rows`` sequence rows, each of ``max_seq_len`` tokens (so a
        longer generation never re-captures graphs); growing it drops the captured graphs
        (they hold the old addresses)."""
        c, cache = self.config, self.cache
        if cache is not None and cache.rows >= rows:
            return cache
        rows, length = max(rows, cache.rows if cache else 0), self.max_seq_len
        self.cache = None  # free the old cache before the new one is allocated
        self._graphs.clear()
        self._pool = None
        self.cache = KVCache.allocate(c.num_layers, rows, length, c.num_kv_heads, c.head_dim,
                                      self.dtype, self.device, self.paged, self.page_size,
                                      self.num_pages)  # fmt: skip
        self._tokens = torch.zeros(rows, dtype=torch.long, device=self.device)
        self._lens = torch.zeros(rows, dtype=torch.int32, device=self.device)
        return self.cache

    def _run_graph(self, key: tuple, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``fn()`` through a CUDA graph captured on first use for ``key`` (its inputs are static
        buffers ``fn`` reads); eager without graphs. The first call runs ``fn`` eagerly (that
        warms the kernels up) and returns that result, then captures."""
        if not self.cuda_graphs:
            return fn()
        if key in self._graphs:
            graph, out = self._graphs[key]
            graph.replay()
            return out
        out = fn()
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):  # every graph shares the first's pool
            static_out = fn()
        if self._pool is None:
            self._pool = graph.pool()
        self._graphs[key] = (graph, static_out)
        return out

    # --- prompts ----------------------------------------------------------------------------------

    def _token_lists(self, prompts) -> list[list[int]]:
        if isinstance(prompts, (str, torch.Tensor)) or (
            isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        if not isinstance(prompts, Sequence) or not prompts:
            raise ArgumentError("llm: give a prompt, a list of prompts or of token-id lists")
        out = []
        for p in prompts:
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ArgumentError(
                        "llm: this model folder has no tokenizer files; pass token ids"
                    )
                ids = self.tokenizer.encode(p)
            elif isinstance(p, torch.Tensor):
                ids = [int(t) for t in p.reshape(-1).tolist()]
            else:
                ids = [int(t) for t in p]
            if not ids:
                raise ArgumentError("llm: a prompt is empty (no tokens)")
            bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise ArgumentError(
                    f"llm: token id {bad[0]} is outside the vocabulary [0, "
                    f"{self.config.vocab_size})"
                )
            out.append(ids)
        return out

    # --- the two passes ---------------------------------------------------------------------------

    def _prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        """Logits [n, vocab] of each prompt's last token; writes the prompts to cache rows
        0..n-1."""
        cache, dev, n = self.cache, self.device, len(prompts)
        lens = [len(p) for p in prompts]
        total = sum(lens)
        if self.cuda_graphs:  # pad to a bucket; the padding is one extra sequence
            t_cap, n_cap = bucket(total, MIN_PREFILL_BUCKET), bucket(n + 1)
        else:
            t_cap, n_cap = total, n
        tokens = torch.zeros(t_cap, dtype=torch.long)
        tokens[:total] = torch.tensor([t for p in prompts for t in p])
        positions = torch.zeros(t_cap, dtype=torch.long)
        positions[:total] = torch.cat([torch.arange(m) for m in lens])
        rows = torch.full((t_cap,), -1, dtype=torch.long)
        rows[:total] = torch.repeat_interleave(torch.arange(n), torch.tensor(lens))
        cu = torch.full((n_cap + 1,), total, dtype=torch.int32)
        cu[0] = 0
        cu[1 : n + 1] = torch.cumsum(torch.tensor(lens), 0)
        cu[-1] = t_cap
        last = torch.zeros(n_cap, dtype=torch.long)
        last[:n] = cu[1 : n + 1].long() - 1
        host = (tokens, positions.to(torch.int32), rows, cu, last)
        key = ("prefill", t_cap, n_cap)
        if self.cuda_graphs:
            bufs = self._graph_buffers(key, host)
        else:
            bufs = [t.to(dev) for t in host]
        max_len = t_cap if self.cuda_graphs else max(lens)

        def run() -> torch.Tensor:
            tok, pos, row, cu_d, last_d = bufs
            slots = cache.slots(row, pos)
            return self.decoder.prefill(tok, pos, cu_d, max_len, slots, last_d, cache)

        return self._run_graph(key, run)[:n]

    def _graph_buffers(self, key: tuple, host: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        """The static device inputs of graph ``key``, refilled from ``host``."""
        store = self._static
        if key not in store or key not in self._graphs:
            store[key] = [t.to(self.device) for t in host]
        else:
            for dst, src in zip(store[key], host, strict=True):
                dst.copy_(src, non_blocking=True)
        return store[key]

    def _decode(self, rows: int, greedy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One decode step of rows 0..rows-1 from the static token/length buffers: returns
        (logits, None), or with ``greedy`` (argmax, no logits processing) the whole step in
        the graph, the next tokens written to the inputs: (logits, tokens)."""
        cache, tokens, lens = self.cache, self._tokens[:rows], self._lens[:rows]

        def step() -> torch.Tensor:
            return self.decoder.decode(tokens, lens, cache)

        def greedy_step() -> tuple[torch.Tensor, torch.Tensor]:
            logits = step()
            greedy_kernel = self._greedy.get(rows)
            if greedy_kernel is None:
                greedy_kernel = self._greedy[rows] = GreedyStep(rows, logits.shape[1],
                                                                logits.device)  # fmt: skip
            with dependent_launches(self.decoder.dependent_launches):
                greedy_kernel(logits, tokens, lens)  # tokens = argmax, lens += 1, in place
            return logits, tokens

        if greedy:
            return self._run_graph(("decode", rows, "greedy"), greedy_step)
        return self._run_graph(("decode", rows), step), None

    # --- generation -------------------------------------------------------------------------------

    def generate(
        self,
        prompts,
        max_new_tokens: int = 32,
        sampling: SamplingParams | None = None,
        *,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
        ignore_eos: bool = False,
        on_token: Callable[[int, int], None] | None = None,
        return_logits: bool = False,
    ) -> GenerationOutput:
        """Generate up to ``max_new_tokens`` tokens after each prompt (a string, token ids, or a
        list of either). Sampling: ``sampling`` or the keywords (greedy by default; see
        :class:`SamplingParams`). Rows stop at ``stop_token_ids`` and, unless ``ignore_eos``,
        at the model's end-of-sequence tokens. ``on_token(row, token_id)`` is called as
        tokens are produced (streaming). ``return_logits`` keeps each step's logits [n, vocab]
        (tests)."""
        out = None
        for event in self._generate(prompts, max_new_tokens, sampling, temperature, top_k,
                                    top_p, repetition_penalty, seed, stop_token_ids,
                                    ignore_eos, return_logits):  # fmt: skip
            if isinstance(event, GenerationOutput):
                out = event
            elif on_token is not None:
                on_token(*event)
        assert out is not None
        return out

    def stream(self, prompt, max_new_tokens: int = 32, **kwargs) -> Iterator[str | int]:
        """Yield the new tokens of one prompt as they are produced: text pieces when the model
        has a tokenizer, else token ids. Keywords as :meth:`generate`."""
        decoder = StreamDecoder(self.tokenizer) if self.tokenizer is not None else None
        for event in self._generate(prompt, max_new_tokens, kwargs.pop("sampling", None),
                                    *(kwargs.pop(k, None) for k in (
                                        "temperature", "top_k", "top_p", "repetition_penalty",
                                        "seed", "stop_token_ids")),
                                    kwargs.pop("ignore_eos", False), False):  # fmt: skip
            if kwargs:
                raise ArgumentError(f"llm.stream: unknown arguments {sorted(kwargs)}")
            if isinstance(event, GenerationOutput):
                if decoder is not None and (rest := decoder.flush()):
                    yield rest
                return
            if decoder is None:
                yield event[1]
            elif piece := decoder.push(event[1]):
                yield piece

    def _params(self, sampling, temperature, top_k, top_p, penalty, seed, stop) -> SamplingParams:
        given = {k: v for k, v in dict(temperature=temperature, top_k=top_k, top_p=top_p,
                                       repetition_penalty=penalty, seed=seed).items()
                 if v is not None}  # fmt: skip
        if stop is not None:
            given["stop_token_ids"] = tuple(int(t) for t in stop)
        if sampling is not None and given:
            raise ArgumentError("llm: pass either sampling=SamplingParams(...) or keywords")
        return sampling or SamplingParams(**given)

    def _generate(self, prompts, max_new_tokens, sampling, temperature, top_k, top_p, penalty,
                  seed, stop, ignore_eos, return_logits):  # fmt: skip
        params = self._params(sampling, temperature, top_k, top_p, penalty, seed, stop)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ArgumentError(f"llm: max_new_tokens={max_new_tokens!r} must be an int >= 1")
        lists = self._token_lists(prompts)
        n = len(lists)
        longest = max(len(p) for p in lists) + max_new_tokens
        if longest > self.max_seq_len:
            raise ArgumentError(
                f"llm: prompt + max_new_tokens = {longest} tokens exceeds max_seq_len="
                f"{self.max_seq_len}; pass a larger max_seq_len to LLM(...)"
            )
        rows = bucket(n) if self.cuda_graphs else n
        cache = self._ensure_cache(rows)
        stops = set(params.stop_token_ids)
        if not ignore_eos:
            stops |= set(self.config.eos_token_ids)
            if self.tokenizer is not None:
                stops |= set(self.tokenizer.eos_token_ids)
        run_seed = params.seed if params.seed is not None else random_seed()
        sampler = Sampler(params, rows, self.config.vocab_size, self.device)
        sampler.reset(lists + [[] for _ in range(rows - n)],
                      seeds=[run_seed] * rows)  # fmt: skip
        for r, p in enumerate(lists):
            cache.assign(r, len(p) + max_new_tokens)
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda *a: None)
        try:
            with torch.inference_mode(), checks.trusted_indices():
                sync()
                start = time.perf_counter()
                logits = self._prefill(lists)
                padded = torch.zeros(rows, logits.shape[1], dtype=logits.dtype,
                                     device=self.device)  # fmt: skip
                padded[:n] = logits
                first = sampler.sample(padded)
                kept = [logits.float().clone()] if return_logits else None
                self._tokens[:rows].copy_(first)
                lens = torch.zeros(rows, dtype=torch.int32)
                lens[:n] = torch.tensor([len(p) for p in lists], dtype=torch.int32)
                self._lens[:rows].copy_(lens)
                host = first[:n].tolist()
                ttft = time.perf_counter() - start
                outs: list[list[int]] = [[t] for t in host]
                reasons = ["" for _ in range(n)]
                for r, t in enumerate(host):
                    yield (r, t)
                    if t in stops:
                        reasons[r] = "stop"
                # Greedy without a penalty needs no sampler state: argmax runs in the graph.
                in_graph = params.greedy and not params.penalized
                decode_start = time.perf_counter()
                steps = 0
                ring = torch.empty(
                    (2, rows), dtype=torch.long, pin_memory=self.device.type == "cuda"
                )
                events: list = [None, None]
                pending = None  # (slot, step) whose tokens are on their way to the host
                for step in range(1, max_new_tokens):
                    if all(reasons):
                        break
                    step_logits, tok = self._decode(rows, in_graph)
                    if tok is None:
                        tok = sampler.sample(step_logits)
                        self._tokens[:rows].copy_(tok)
                        self._lens[:rows].add_(1)
                    if kept is not None:
                        kept.append(step_logits[:n].float().clone())
                    slot = step % 2
                    ring[slot].copy_(tok, non_blocking=True)
                    if self.device.type == "cuda":
                        events[slot] = torch.cuda.Event()
                        events[slot].record()
                    steps += 1
                    if pending is not None:
                        yield from self._collect(ring, events, pending, outs, reasons, stops)
                    pending = slot
                if pending is not None:
                    yield from self._collect(ring, events, pending, outs, reasons, stops)
                sync()
                decode_s = time.perf_counter() - decode_start
        finally:
            for r in range(n):
                cache.release(r)
        new = sum(len(o) for o in outs)
        stats = GenerationStats(sum(len(p) for p in lists), new, ttft, decode_s, steps,
                                run_seed, rows=n)  # fmt: skip
        reasons = [r or "length" for r in reasons]
        texts = None
        if self.tokenizer is not None:
            texts = [self.tokenizer.decode(o) for o in outs]
        yield GenerationOutput(outs, texts, reasons, stats,
                               [k[:n] for k in kept] if kept is not None else None)  # fmt: skip

    @staticmethod
    def _collect(ring, events, slot, outs, reasons, stops):
        """Read one step's tokens from the host ring and append them to the unfinished rows."""
        if events[slot] is not None:
            events[slot].synchronize()
        for r, t in enumerate(ring[slot][: len(outs)].tolist()):
            if reasons[r]:
                continue
            outs[r].append(t)
            yield (r, t)
            if t in stops:
                reasons[r] = "stop"
