"""Token sampling for the generation loop: :class:`SamplingParams` and :class:`Sampler`.

The engine captures each decode step (model forward + sampling) in a CUDA graph and replays
it, so everything here is graph-capturable: fixed shapes, no host sync, no data-dependent
Python branches on tensor values and no ``torch.Generator`` state. Randomness comes from a
counter-based integer hash of (row seed, step, column) computed with torch integer ops, so
each replay draws fresh numbers (the step counter lives on the device and is bumped in place)
and a seed reproduces a run exactly, on the CPU and the GPU alike.

The logits processors follow Hugging Face's ``generate`` (same order, same semantics):
repetition penalty, then temperature, top-k and top-p (``min_tokens_to_keep=1``).
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import torch

from ..errors import ArgumentError, DeviceError, ShapeError

_MASK32 = 0xFFFFFFFF
# Odd multipliers below 2**31: a 32-bit value times one of them stays below 2**63, so the
# int64 products never overflow (signed overflow is not something to lean on in torch) and
# the low 32 bits are the exact product mod 2**32, identical on every device.
_MUL1 = 0x7FEB352D
_MUL2 = 0x6B4C9A73  # < 2**31 as well
_COL_MUL = 0x5BD1E995  # spreads column indices over 32 bits before the per-element hash
_STEP_MUL = 0x27D4EB2F
_UNIFORM_BITS = 23  # (v + 0.5) * 2**-23 is exact in fp32 and strictly inside (0, 1)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token.

    ``temperature`` 0 means greedy (argmax; top-k / top-p then have no effect, as in Hugging
    Face's ``generate`` without ``do_sample``). ``top_k`` 0 and ``top_p`` 1.0 switch those
    filters off. ``repetition_penalty`` 1.0 is off; it counts the prompt tokens too (Hugging
    Face semantics). ``seed`` None: a random seed is chosen once per generate call and
    reported back. ``stop_token_ids`` are the engine's business (the sampler ignores them).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ArgumentError(
                f"sampling: temperature={t!r}; expected a finite number >= 0 "
                "(0 for greedy decoding, e.g. 0.7 to sample)"
            )
        k = self.top_k
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ArgumentError(
                f"sampling: top_k={k!r}; expected an integer >= 0 (0 switches top-k off)"
            )
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 < p <= 1.0):
            raise ArgumentError(
                f"sampling: top_p={p!r}; expected a number in (0, 1] (1.0 switches top-p off)"
            )
        r = self.repetition_penalty
        if (
            isinstance(r, bool)
            or not isinstance(r, (int, float))
            or not math.isfinite(r)
            or not r > 0
        ):
            raise ArgumentError(
                f"sampling: repetition_penalty={r!r}; expected a finite number > 0 "
                "(1.0 is off, above 1 discourages repeats, e.g. 1.1)"
            )
        s = self.seed
        if s is not None and (isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**64):
            raise ArgumentError(
                f"sampling: seed={s!r}; expected None (a random seed) or an integer in [0, 2**64)"
            )
        stops = self.stop_token_ids
        if not isinstance(stops, (tuple, list)) or any(
            isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in stops
        ):
            raise ArgumentError(
                f"sampling: stop_token_ids={stops!r}; expected a tuple of token ids (ints >= 0)"
            )
        object.__setattr__(self, "stop_token_ids", tuple(stops))
        object.__setattr__(self, "temperature", float(t))
        object.__setattr__(self, "top_p", float(p))
        object.__setattr__(self, "repetition_penalty", float(r))

    @property
    def greedy(self) -> bool:
        """True when the next token is the argmax (temperature 0, or top_k 1): no randomness."""
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def penalized(self) -> bool:
        """True when the repetition penalty is on (it needs the seen-token mask)."""
        return self.repetition_penalty != 1.0


def _splitmix64(x: int) -> int:
    """SplitMix64 finaliser on Python ints (host side, used to derive row seeds)."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def row_seed(seed: int, row: int) -> int:
    """The 32-bit stream key of batch row ``row`` in a call seeded with ``seed``."""
    return _splitmix64(_splitmix64(seed) ^ row) & _MASK32


def random_seed() -> int:
    """A fresh seed for a generate call that was given none (report it back to the user)."""
    return secrets.randbits(63)


def _mix32_(x: torch.Tensor) -> torch.Tensor:
    """Hash int64 values in [0, 2**32) to [0, 2**32), in place (murmur3-style finaliser with
    multipliers below 2**31 so nothing overflows int64)."""
    x ^= x >> 16
    x.mul_(_MUL1).bitwise_and_(_MASK32)
    x ^= x >> 15
    x.mul_(_MUL2).bitwise_and_(_MASK32)
    x ^= x >> 16
    return x


class Sampler:
    """Picks the next token of every row of a batch, capturable in a CUDA graph.

    ``Sampler(params, batch, vocab, device)`` allocates its static tensors once: ``seeds``
    (int64 [batch], one 32-bit stream key per row), ``step`` (int64 [1], bumped by every
    :meth:`sample`) and ``seen`` (bool [batch, vocab], only when the repetition penalty is on).
    :meth:`reset` refills them in place between generate calls, so a captured graph that reads
    them stays valid.
    """

    def __init__(
        self, params: SamplingParams, batch: int, vocab: int, device: torch.device | str = "cpu"
    ) -> None:
        if not isinstance(params, SamplingParams):
            raise ArgumentError(
                f"Sampler: params must be a SamplingParams, got {type(params).__name__}"
            )
        for name, value in (("batch", batch), ("vocab", vocab)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ArgumentError(f"Sampler: {name}={value!r}; expected a positive integer")
        self.params = params
        self.batch = batch
        self.vocab = vocab
        self.device = torch.device(device)
        # The effective filters, as Hugging Face's generate builds them: temperature 0 (no
        # do_sample) applies no warpers; temperature 1 and top_k >= vocab are no-ops.
        sampling = params.temperature > 0
        self._temperature = params.temperature if sampling and params.temperature != 1.0 else None
        self._top_k = min(params.top_k, vocab) if sampling and params.top_k else 0
        if self._top_k == vocab:
            self._top_k = 0
        self._top_p = params.top_p if sampling and params.top_p < 1.0 else None
        self._penalty = params.repetition_penalty if params.penalized else None

        self.seeds = torch.zeros(batch, dtype=torch.int64, device=self.device)
        self.device = self.seeds.device  # "cuda" -> "cuda:N", to compare with the logits'
        self.step = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.seen = (
            torch.zeros(batch, vocab, dtype=torch.bool, device=self.device)
            if self._penalty is not None
            else None
        )
        # Token keys of the whole vocabulary for the noise hash, made once (top-k makes the
        # keys of its k candidates on the fly).
        full_width = not params.greedy and not self._top_k
        self._col_keys = _token_keys(
            torch.arange(vocab if full_width else 0, dtype=torch.int64, device=self.device)
        )
        #: The seed of the last :meth:`reset` call (None when per-row seeds were given).
        self.seed: int | None = None

    # ----------------------------------------------------------------------------- state
    def reset(self, prompts: list[list[int]], seeds: list[int] | None = None) -> int | None:
        """Start a generate call, in place: step 0, seen = the prompts' tokens, fresh seeds.

        ``prompts[r]`` is row r's prompt (rows beyond ``len(prompts)`` are padding). With
        ``seeds`` None, the call seed is ``params.seed`` (or a random one) and row r draws from
        the stream :func:`row_seed` (seed, r); with ``seeds`` given (one int per prompt), row r
        draws from ``row_seed(seeds[r], 0)``, so a prompt reproduces whatever its place in the
        batch. Returns the call seed (None when ``seeds`` were given), also kept in ``.seed``.
        """
        if len(prompts) > self.batch:
            raise ShapeError(
                f"Sampler.reset: {len(prompts)} prompts for a sampler of batch {self.batch}; "
                "build the Sampler with batch >= the number of prompts"
            )
        if seeds is None:
            call_seed = self.params.seed if self.params.seed is not None else random_seed()
            keys = [row_seed(call_seed, r) for r in range(self.batch)]
        else:
            if len(seeds) != len(prompts) or any(
                isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds
            ):
                raise ArgumentError(
                    f"Sampler.reset: seeds={seeds!r}; expected one integer >= 0 per prompt "
                    f"({len(prompts)} prompts)"
                )
            call_seed = None
            keys = [row_seed(s, 0) for s in seeds]
            keys += [row_seed(r, 1) for r in range(len(seeds), self.batch)]  # padding rows
        self.seeds.copy_(torch.tensor(keys, dtype=torch.int64))
        self.step.zero_()
        if self.seen is not None:
            self.seen.zero_()
            rows = [r for r, p in enumerate(prompts) for _ in p]
            cols = [t for p in prompts for t in p]
            if cols:
                bad = [t for t in cols if not 0 <= t < self.vocab]
                if bad:
                    raise ArgumentError(
                        f"Sampler.reset: token id {bad[0]} is outside the vocabulary "
                        f"[0, {self.vocab})"
                    )
                index = torch.tensor([rows, cols], dtype=torch.int64).to(self.device)
                self.seen[index[0], index[1]] = True
        self.seed = call_seed
        return call_seed

    # ------------------------------------------------------------------------ processors
    def _check(self, logits: torch.Tensor) -> None:
        if not isinstance(logits, torch.Tensor):
            raise TypeError(f"Sampler: logits must be a torch.Tensor, got {type(logits).__name__}")
        if tuple(logits.shape) != (self.batch, self.vocab):
            raise ShapeError(
                f"Sampler: logits have shape {tuple(logits.shape)}, expected "
                f"({self.batch}, {self.vocab}) (batch, vocab) as the Sampler was built"
            )
        if not logits.is_floating_point():
            raise ArgumentError(f"Sampler: logits have dtype {logits.dtype}; expected floats")
        if logits.device != self.device:
            raise DeviceError(
                f"Sampler: logits are on {logits.device}, the sampler's state on {self.device}; "
                "build the Sampler on the logits' device"
            )

    def _penalized(self, logits: torch.Tensor) -> torch.Tensor:
        """fp32 logits with the repetition penalty applied (HF: score < 0 -> score * p,
        else score / p, on seen tokens)."""
        x = logits.to(torch.float32)
        if self._penalty is not None:
            p = self._penalty
            x = torch.where(self.seen, torch.where(x < 0, x * p, x / p), x)
        return x

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """Hugging Face's logits processors on ``logits`` [B, V]: repetition penalty,
        temperature, top-k, top-p (filtered entries -inf); returns fp32 [B, V].

        Temperature 0 applies the penalty only (as ``generate`` without ``do_sample``).
        """
        self._check(logits)
        x = self._penalized(logits)
        if self._temperature is not None:
            x = x / self._temperature
        if self._top_k:
            kth = torch.topk(x, self._top_k, dim=-1).values[:, -1:]
            x = x.masked_fill(x < kth, -math.inf)
        if self._top_p is not None:
            sorted_x, order = torch.sort(x, dim=-1, descending=False)
            remove = _top_p_remove(sorted_x, self._top_p)
            x = x.masked_fill(remove.scatter(1, order, remove), -math.inf)
        return x

    # -------------------------------------------------------------------------- sampling
    def _gumbel(self, col_keys: torch.Tensor) -> torch.Tensor:
        """Gumbel noise -log(-log(u)), [B, n], with u hashed from (row seed, step, token).

        ``col_keys`` ([n] or [B, n]) are the tokens' ids spread by :func:`_token_keys`; keying
        the noise on the token id (not on a position) makes a draw independent of the order in
        which topk / sort return tied candidates, so the CPU and the GPU agree.
        """
        step_key = _mix32_((self.step * _STEP_MUL + 1) & _MASK32)  # [1]
        row_key = _mix32_(self.seeds ^ step_key)  # [B]
        x = row_key[:, None] + col_keys  # [B, n], below 2**33
        _mix32_(x.bitwise_and_(_MASK32))
        u = (x >> (32 - _UNIFORM_BITS)).to(torch.float32).add_(0.5).mul_(2.0**-_UNIFORM_BITS)
        return u.log_().neg_().log_().neg_()

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token of every row, int64 [B]; marks it seen and bumps the step counter.

        Greedy: argmax of the penalized logits (ties: the lowest id, as torch.argmax).
        Otherwise Gumbel-max over the processed logits, with noise hashed from (row seed,
        step, token id). Top-k draws among ``torch.topk``'s k candidates only (where the kth
        value is tied beyond k, Hugging Face keeps the tied tokens too, this keeps k); top-p
        sorts the vocabulary (only the k candidates when top-k is on too) and keeps the tokens
        at or above the cut-off value (ties with the cut-off all kept).
        """
        self._check(logits)
        if self.params.greedy:
            x = self._penalized(logits) if self._penalty is not None else logits
            tokens = torch.argmax(x, dim=-1)
        elif self._top_k:
            x = self._penalized(logits)
            # Temperature after topk: dividing by T > 0 keeps the order, and it is k-wide here.
            values, index = torch.topk(x, self._top_k, dim=-1)  # descending
            if self._temperature is not None:
                values = values / self._temperature
            if self._top_p is not None:
                ascending = values.flip(-1)  # HF's top-p works on ascending scores
                remove = _top_p_remove(ascending, self._top_p).flip(-1)
                values = values.masked_fill(remove, -math.inf)
            noisy = values + self._gumbel(_token_keys(index))
            tokens = index.gather(1, torch.argmax(noisy, dim=-1, keepdim=True)).squeeze(1)
        else:
            x = self._penalized(logits)
            if self._temperature is not None:
                x = x / self._temperature
            if self._top_p is not None:
                ascending = torch.sort(x, dim=-1).values
                removed = _top_p_remove(ascending, self._top_p).sum(dim=-1, keepdim=True)
                cutoff = ascending.gather(1, removed)  # the smallest kept score
                x = x.masked_fill(x < cutoff, -math.inf)
            tokens = torch.argmax(x + self._gumbel(self._col_keys), dim=-1)
        if self.seen is not None:
            self.seen.scatter_(1, tokens[:, None], True)
        self.step.add_(1)
        return tokens


def _token_keys(token_ids: torch.Tensor) -> torch.Tensor:
    """Token ids spread over 32 bits (an odd multiplier: distinct ids stay distinct)."""
    return (token_ids * _COL_MUL) & _MASK32


def _top_p_remove(sorted_asc: torch.Tensor, top_p: float) -> torch.Tensor:
    """HF's TopPLogitsWarper on ascending-sorted scores: True where a token is filtered out
    (cumulative probability from the bottom <= 1 - top_p), the largest always kept."""
    cumulative = sorted_asc.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p)
    remove[..., -1:] = False
    return remove
